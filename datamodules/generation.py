"""Sampling many answers per question, cached, resumable and sharded: `HFGenerator.sample -> Candidates`.

Each chunk of questions is sampled by `lightning_modules/candidates.sample` (the decode loop with the task's prefix
KV cache shared, one prefill per prompt repeated `n` times, finished rows dropped; greedy equals `model.generate`
token for token); this module adds caching, resumption and sharding. Each candidate keeps the log-probability of
each of its tokens at temperature 1 (for entropy signals without a second pass).

Caching: `Candidates` live under `<cache_dir>/<key>/chunk-NNNNN/` as `datasets` Arrow tables (`FEATURES`), one
per chunk of `chunk_size` questions, written to a temporary directory and renamed (atomic). The key hashes what the
candidates depend on (`cache_key`): the content of the model and adapter weights, every task setting and the
exemplars' text, the questions' ids, texts and options, the sampling parameters and the seed, so an interrupted
run generates only the missing chunks, a finished one is reused, and nothing is reused for other data. Each
chunk has its own seed (seed, chunk index), so a resumed run gives the same candidates as an uninterrupted one.

Distributed: chunk i belongs to rank i % world_size; ranks exchange their rows with `all_gather_object`
and every rank returns all candidates in question order. Generation needs whole weights on each rank: under
FSDP / ZeRO-3 call it from a separate predict pass on a gathered (unsharded) copy of the policy.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import datasets
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tqdm.auto import tqdm

from datamodules.tasks.base import Question, Task
from lightning_modules.candidates import FEATURES, Candidates, chunk_generator, prompts
from lightning_modules.candidates import sample as sample_candidates
from lightning_modules.distributed import dist_info, gather_objects
from lightning_modules.progress import ProgressLog, phase
from lightning_modules.sampling import SamplingParams
from lightning_modules.storage import cache_key as storage_key
from lightning_modules.storage import content_hash, fsync_directory, move_aside, write_atomically

log = logging.getLogger(__name__)
ENGINE_VERSION = 3  # 2: answers read with math-verify; 3: as a human grader reads them, unfinished unparsed


class Generator(Protocol):
    """What every generation backend offers (this HF engine is the default)."""

    def sample(self, policy, questions: Sequence[Question], task: Task, params: SamplingParams) -> Candidates:
        ...


# ---------------------------------------------------------------------------------------------- cache + chunks
def cache_key(policy, task: Task, questions: Sequence[Question], params: SamplingParams, chunk_size: int) -> str:
    """What the candidates depend on: the weights, every task setting and exemplar text, the questions' ids, texts
    and options, the sampling parameters and the chunking (each chunk has its own seed)."""
    payload = {
        "engine": ENGINE_VERSION, "model": policy.fingerprint(), "task": task.fingerprint(),
        "params": asdict(params), "chunk_size": chunk_size,
        "questions": [(q.id, q.question, q.options) for q in questions],
    }
    return storage_key(payload)


CHECKSUM = "content.sha256"  # in each chunk: the hash of its other files, written with them


def _digest(chunk: Path) -> str:
    files = sorted(p for p in chunk.iterdir() if p.name != CHECKSUM)
    return content_hash(*(p.name.encode() + b"\0" + p.read_bytes() for p in files))


def _write_chunk(directory: Path, index: int, rows: list[dict]) -> None:
    """The chunk as an Arrow table with its content hash, written under a temporary name, flushed to disk, then
    renamed whole."""
    final = directory / f"chunk-{index:05d}"
    tmp = directory / f".tmp-chunk-{index:05d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_list(rows, features=FEATURES).save_to_disk(str(tmp))
    for f in tmp.iterdir():
        with open(f, "rb+") as handle:
            os.fsync(handle.fileno())
    write_atomically(tmp / CHECKSUM, _digest(tmp))
    if final.exists():  # another rank or an earlier run wrote it first: identical content, keep that one
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
        fsync_directory(directory)


def _read_chunk(directory: Path, index: int) -> list[dict] | None:
    """The chunk's rows when its files match the hash written with them; a chunk that fails the check or cannot be
    read is named in a warning, moved aside and generated again (None)."""
    path = directory / f"chunk-{index:05d}"
    if not path.exists():
        return None
    try:
        expected = (path / CHECKSUM).read_text().strip()
        if _digest(path) != expected:
            raise ValueError("its content does not match the hash written with it")
        return datasets.load_from_disk(str(path)).to_list()
    except Exception as e:  # noqa: BLE001 - any unreadable chunk is regenerated, never trusted
        move_aside(path, e)
        return None


def _clean_leftovers(directory: Path) -> None:
    """Temporary chunks of processes that are gone (killed mid-write, a full disk) are removed."""
    for tmp in directory.glob(".tmp-chunk-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------- the engine
class HFGenerator:
    """The default engine: batched, prefix-shared, resumable sampling with a Hugging Face model.

    Args:
        batch_size: questions per forward batch (each brings `n` rows after the prefill).
        chunk_size: questions per cached chunk (the unit of resumption and of sharding over ranks).
        cache_dir: where chunks are written; None keeps everything in memory (no resume).
        progress: show a progress bar with generated tokens/s.
        should_stop: asked after each chunk (e.g. "did the run receive SIGTERM?"); when it says so, sampling ends
            there with `SIGTERMException`, the chunks written so far kept for the next run.
        check_chunk: called with the first chunk's table rows (`FEATURES`) as soon as they exist (cached or new); it
            may raise to stop early (the signal-quality report refuses a model whose first chunk has no readable vote).
    """

    def __init__(self, batch_size: int = 8, chunk_size: int = 32, cache_dir: str | None = None,
                 progress: bool = True, should_stop: Callable[[], bool] | None = None,
                 check_chunk: Callable[[list[dict]], None] | None = None) -> None:
        self.batch_size, self.chunk_size, self.cache_dir, self.progress = batch_size, chunk_size, cache_dir, progress
        self.should_stop, self.check_chunk = should_stop, check_chunk
        self.stats: dict[str, float] = {}

    @phase("generation")
    def sample(self, policy, questions: Sequence[Question], task: Task, params: SamplingParams) -> Candidates:
        """`params.n` candidates per question (every rank returns all of them, in question order)."""
        questions = list(questions)
        if not questions:
            raise ValueError("no questions to sample answers for")
        rank, world = dist_info()
        directory = None
        if self.cache_dir is not None:
            directory = Path(self.cache_dir) / cache_key(policy, task, questions, params, self.chunk_size)
            directory.mkdir(parents=True, exist_ok=True)
            _clean_leftovers(directory)
        chunks = [questions[i : i + self.chunk_size] for i in range(0, len(questions), self.chunk_size)]
        mine = [i for i in range(len(chunks)) if i % world == rank]
        done = {i: rows for i in mine if directory is not None and (rows := _read_chunk(directory, i)) is not None}
        todo = [i for i in mine if i not in done]
        if self.check_chunk is not None and done:
            self.check_chunk(done[min(done)])
        if done:
            log.info("generation: reusing %d of %d chunks from %s", len(done), len(mine), directory)
        tasks = [task] * len(questions)
        prefix_ids, suffix_ids = prompts(policy.tokenizer, questions, tasks)
        with policy.inference():
            total = sum(len(chunks[i]) for i in todo)
            bar = tqdm(total=total, desc="generate", unit="q", disable=not self.progress or not sys.stderr.isatty())
            lines = ProgressLog("generate", total) if self.progress else None  # a log file gets lines, not a bar
            start, generated = time.perf_counter(), 0
            for i in todo:
                first = i * self.chunk_size
                generator = chunk_generator(params.seed, i)
                rows = sample_candidates(
                    policy, chunks[i], tasks[: len(chunks[i])], params, generator,
                    suffix_ids[first : first + len(chunks[i])], prefix_ids, self.batch_size).table_rows()
                if self.check_chunk is not None and not done:
                    self.check_chunk(rows)
                generated += sum(r["num_tokens"] for r in rows)
                if directory is not None:
                    _write_chunk(directory, i, rows)
                done[i] = rows
                bar.update(len(chunks[i]))
                bar.set_postfix(tok_per_s=f"{generated / (time.perf_counter() - start):.0f}")
                if lines is not None:
                    lines.update(len(chunks[i]), sum(r["num_tokens"] for r in rows))
                if self.should_stop is not None and self.should_stop():
                    log.warning("generation: stopped after chunk %d (%d of %d done); %s", i, len(done), len(mine),
                                f"the chunks written are in {directory}, a rerun reuses them" if directory else
                                "nothing is cached (no cache_dir)")
                    raise SIGTERMException
            bar.close()
            self.stats = {"generated_tokens": generated, "seconds": time.perf_counter() - start}
        all_rows = {i: rows for part in gather_objects(done) for i, rows in part.items()}
        return Candidates.from_table([r for i in range(len(chunks)) for r in all_rows[i]], questions, tasks,
                                     suffix_ids, prefix_ids)


def shared_cache(trainer, name: str) -> Path:
    """`<experiment dir>/<name>`: a cache shared by every version of a run (the log directory's parent), safe to
    share because what it holds is keyed by what it depends on. Every rank must ask (the log directory is a
    broadcast under DDP)."""
    return Path(trainer.log_dir or trainer.default_root_dir).parent / name


def cached_sampler(cache_dir: str) -> Callable[..., Candidates]:
    """`lightning_modules.candidates.sample` through this engine's cache: the questions as one chunk (so the draws
    are what `sample` draws with `chunk_generator(params.seed, 0)`, the generator `evaluate` gives it), read from
    `cache_dir` when an earlier call sampled them with the same weights, task, questions and settings."""
    def draw(policy, questions: Sequence[Question], tasks: Sequence[Task], params: SamplingParams,
             generator=None, batch_size: int | None = None) -> Candidates:
        questions = list(questions)
        engine = HFGenerator(batch_size=batch_size or len(questions), chunk_size=len(questions), cache_dir=cache_dir,
                             progress=False)
        return engine.sample(policy, questions, tasks[0], params)

    return draw


def sample(
    policy, questions: Sequence[Question], task: Task, n: int = 8, temperature: float = 0.7, top_p: float = 1.0,
    max_new_tokens: int = 128, seed: int = 0, **engine_kwargs,
) -> Candidates:
    """`n` candidates per question with the default engine; see `HFGenerator` for `engine_kwargs`."""
    params = SamplingParams(n, temperature, top_p, max_new_tokens, seed)
    return HFGenerator(**engine_kwargs).sample(policy, questions, task, params)
