"""SelfGeneratedDataModule: the model writes its own training data (SPEC §1–4).

Each round: sample `n` candidates per unlabeled question with the current policy (cached and resumable),
compute the label-free signals the selectors need, apply the selectors, and serve the kept candidates as
weighted SFT batches to `WeightedSFTModule`. Rounds follow the trainer's epochs: round r covers epochs
[r * epochs_per_round, (r + 1) * epochs_per_round) and needs `trainer.reload_dataloaders_every_n_epochs =
epochs_per_round` (checked), so round r + 1 samples from the model trained in round r.

Training samples use the zero-shot format (the question as the user turn, the candidate's completion as the
answer), whatever the few-shot prompt used for sampling. Gold answers never reach training; where the task
has them they feed the pseudo-label audit only: the precision (kept candidates whose answer is right) and
recall (right candidates that were kept) after each selector, logged as `select/...`.

Signals: each selector names the signal objects it reads (`lightning_modules/signals/`); only those are computed,
costly ones on the candidates still in play only. A signal that needs labeled data (the DS weight's valid set)
says how many questions of which split; they are loaded at setup, disjoint from the unlabeled questions, and each
signal checks that it can run, before any generation. The votes and the response NLL are always computed (they
are cheap) and written beside the kept rows. Options: a labeled set mixed into training (`labeled_questions`,
SemiEvol), optionally alone in a warm-up round (`labeled_warmup`). Under DDP each rank scores its share of the
questions, percentiles are global, and every rank gets all kept samples (its batches are then sharded).
Per round, `<log_dir>/round-<r>/selected.jsonl` (prompt, completion, weight, every signal) and `report.json`.
Candidates are cached under `<experiment dir>/candidates/` (shared by the experiment's versions), so a run
interrupted during generation continues where it stopped when started again.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.collate import LengthBucketSampler, SFTExample, collate, tokenize_example
from datamodules.generation import HFGenerator, shared_cache
from datamodules.io import check_at_least, write_atomically
from datamodules.labeled import TokenizedDataset
from datamodules.selection import Selector, load_with_labeled, select
from datamodules.tasks.base import Question, Task
from lightning_modules.candidates import Candidates
from lightning_modules.distributed import dist_info, gather_objects, global_sum
from lightning_modules.model_store import DEFAULT_MODEL
from lightning_modules.policy import format_prompt, load_tokenizer, model_context
from lightning_modules.progress import phase
from lightning_modules.sampling import SamplingParams
from lightning_modules.signals import Signal

SAMPLES = 4  # kept samples a round report carries (TensorBoard text)


@dataclass
class RoundReport:
    """One round of self-training, what callbacks read (`SelectionReport`) and `round-<r>/report.json` holds (all
    but the values): questions, candidates, the parsed share, the answers cut off by the token limit, the audit after
    each selection stage (kept, precision, recall against gold, read for the audit only), what was kept, every
    signal's values on this rank's candidates (`labeled_<name>`: on the labeled set) and the first kept samples as
    (weight, completion)."""

    round: int
    questions: int
    candidates: int
    parsed_fraction: float
    unfinished_unparsed: int
    selectors: list[dict]
    kept: int
    kept_fraction: float
    signals: dict[str, torch.Tensor] = field(repr=False)
    samples: list[tuple[float, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "signals"}


class SelfGeneratedDataModule(L.LightningDataModule):
    """Args:
        task: the task (its `train` split supplies the unlabeled questions; gold is read for the audit only).
        selectors: applied in order (e.g. `[MajorityVote, DSWeightFilter]` for IWSI); none keeps every candidate.
        num_questions, split: the unlabeled questions.
        n, temperature, top_p, max_new_tokens, seed: sampling (SPEC defaults for IWSI: 15, 1.1).
        generation_batch_size: questions per generation batch.
        labeled_questions, labeled_split, labeled_warmup: SemiEvol's labeled set, mixed into training; with
            `labeled_warmup` round 0 trains on it alone and generation starts in round 1.
        epochs_per_round: epochs trained on each round's data.
        batch_size, max_length: SFT batches.
        cache_dir: where candidates are cached (default `<experiment dir>/candidates`, shared by its versions).
        tokenizer: linked to the policy's model.
    """

    def __init__(
        self, task: Task, selectors: list[Selector] | None = None, num_questions: int = 200, split: str = "train",
        n: int = 8, temperature: float = 0.7, top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0,
        generation_batch_size: int = 8, labeled_questions: int = 0, labeled_split: str = "labeled",
        labeled_warmup: bool = False, epochs_per_round: int = 1, batch_size: int = 8, max_length: int = 512,
        cache_dir: str | None = None, tokenizer: str = DEFAULT_MODEL,
    ) -> None:
        super().__init__()
        check_at_least("SelfGeneratedDataModule", 1, num_questions=num_questions, batch_size=batch_size,
                       max_length=max_length, generation_batch_size=generation_batch_size,
                       epochs_per_round=epochs_per_round)
        check_at_least("SelfGeneratedDataModule", 0, labeled_questions=labeled_questions)
        self.save_hyperparameters(ignore=["task", "selectors"])
        self.task, self.selectors = task, list(selectors or [])
        self.params = SamplingParams(n, temperature, top_p, max_new_tokens, seed)
        voting = [type(s).__name__ for s in self.selectors if any(g.needs_group for g in s.signals().values())]
        if voting and n < 2:
            raise ValueError(f"{', '.join(voting)} reads a vote over each question's samples: n must be at least 2, "
                             f"got {n}")
        self.round = -1
        self.reports: list[RoundReport] = []  # one per round generated, in order
        self.train_set: TokenizedDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        self.tokenizer = load_tokenizer(self.hparams.tokenizer)
        questions, self.labeled = self._load_questions()
        self.questions = self.task.fit_prompts(self.tokenizer, questions, model_context(self.hparams.tokenizer))
        for selector in self.selectors:
            if selector.labeled_roles and not self.labeled:
                raise ValueError(f"{type(selector).__name__} compares with the labeled set: set labeled_questions > 0 "
                                 "(and labeled_split)")
        for signal in self._signals():
            signal.check()  # before any generation: the labeled data or model each signal needs

    def _signals(self) -> list[Signal]:
        """Every signal the selectors read, each object once."""
        unique = {id(s): s for selector in self.selectors for s in selector.signals().values()}
        return list(unique.values())

    def _load_questions(self) -> tuple[list[Question], list[Question]]:
        """The unlabeled questions, SemiEvol's labeled set and each signal's labeled set (IWSI's valid set), disjoint:
        splits that read the same source are carved into consecutive slices (signals' sets, then labeled, then
        unlabeled; see `Task.load_splits`), and a question in two of them is refused. Generated questions
        (`duplicates = "skip"`) are loaded the other way round, unlabeled first, so that asking for a labeled set
        never changes them (a labeled question equal to one of them is replaced instead): every method of a seed
        trains on the same questions. Returns (unlabeled, labeled); each signal receives its own set."""
        hp = self.hparams
        unlabeled = [(hp.split, hp.num_questions)]
        labeled = [(hp.labeled_split, hp.labeled_questions)] * bool(hp.labeled_questions)
        if self.task.duplicates == "skip":
            loaded = load_with_labeled(self.task, self._signals(), unlabeled + labeled, labeled_first=False)
            return loaded[0], loaded[1] if labeled else []
        loaded = load_with_labeled(self.task, self._signals(), labeled + unlabeled)
        return loaded[-1], loaded[0] if labeled else []

    # ------------------------------------------------------------------ data of a round
    def _example(self, question: Question, completion: str, weight: float = 1.0, where: str = "") -> SFTExample:
        text = self.task.format_question(question)
        return SFTExample(format_prompt(self.tokenizer, text), completion, weight, where, user_text=text)

    def _labeled(self) -> list[SFTExample]:
        return [self._example(q, self.task.format_rationale(q), where=f"labeled:{q.id}") for q in self.labeled]

    def _labeled_candidates(self) -> Candidates:
        """The labeled set's gold rationales as candidates in the training format (no stored log-probs), for
        selectors that compare with the same signal on labeled data (SemiEvol)."""
        tokenized = [tokenize_example(self.tokenizer, e, self.hparams.max_length) for e in self._labeled()]
        return Candidates(
            questions=self.labeled, tasks=[self.task] * len(self.labeled), group=torch.arange(len(self.labeled)),
            texts=[self.task.format_rationale(q) for q in self.labeled], answers=[None] * len(self.labeled),
            prompt_ids=[t.input_ids[: t.n_prompt] for t in tokenized],
            response_ids=[t.input_ids[t.n_prompt :] for t in tokenized],
        )

    @phase("selection")  # generation and the signals inside it: "selection/generation", "selection/signal <name>"
    def _generate_and_select(self, policy, run_dir: Path) -> list[SFTExample]:
        hp = self.hparams
        rank, world = dist_info()
        questions = self.questions
        # shared by every version of the experiment: a re-run after an interruption finds what was generated
        # (the key hashes model, adapter, prompts, sampling and questions, so sharing is safe)
        cache = hp.cache_dir or str(shared_cache(self.trainer, "candidates"))
        engine = HFGenerator(batch_size=hp.generation_batch_size, cache_dir=cache,
                             should_stop=lambda: self.trainer is not None and self.trainer.received_sigterm)
        everything = engine.sample(policy, questions, self.task, self.params)
        total = len(everything)
        batch = everything.subset([i for i, g in enumerate(everything.group.tolist()) if g % world == rank])
        majority = _majorities(batch)
        gold = [questions[g].answer for g in batch.group.tolist()]
        correct = torch.tensor([self.task.same(a, g) for a, g in zip(batch.answers, gold)])
        selection = select(batch, policy, self.selectors, correct, self._labeled_candidates)
        keep, weight, signals = selection.keep, selection.weight, selection.signals
        kept = global_sum(int(keep.sum()))
        report = RoundReport(
            round=self.round, questions=len(questions), candidates=total,
            parsed_fraction=global_sum(sum(a is not None for a in batch.answers)) / total,
            unfinished_unparsed=global_sum(sum(f == "length" and a is None
                                               for f, a in zip(batch.finish, batch.answers))),
            selectors=selection.audit, kept=kept, kept_fraction=kept / total, signals=signals)
        index = torch.nonzero(keep).flatten().tolist()
        mine = (batch.subset(index), weight[index], {k: v[index] for k, v in signals.items() if len(v) == len(batch)},
                [majority[i] for i in index])
        parts = gather_objects(mine)  # every rank's kept candidates, weights, signal values and majorities
        order = sorted((int(c.group[i]), p, i) for p, (c, *_) in enumerate(parts) for i in range(len(c)))
        kept_rows = []  # the record of each kept candidate, in question order (as one process has them)
        for g, p, i in order:
            c, w, values, majority_of = parts[p]
            kept_rows.append({
                "question_id": questions[g].id, "prompt": self.task.format_question(questions[g]),
                "completion": c.texts[i], "answer": c.answers[i], "majority": majority_of[i], "weight": float(w[i]),
                **{k: float(v[i]) for k, v in values.items()},
            })
        report.samples = [(r["weight"], r["completion"]) for r in kept_rows[:SAMPLES]]
        self.reports = self.reports + [report]
        if rank == 0:
            out = run_dir / f"round-{self.round}"
            out.mkdir(parents=True, exist_ok=True)
            write_atomically(out / "selected.jsonl", "".join(json.dumps(r) + "\n" for r in kept_rows))
            write_atomically(out / "report.json", json.dumps(report.to_json(), indent=2))
        if rank == 0:
            audit = "; ".join(f"{s['name']} keeps {s['kept']} (precision {s['precision']:.2f}, recall "
                              f"{s['recall']:.2f})" for s in report.selectors)
            print(f"[round {self.round}] {len(questions)} questions, {total} candidates, "
                  f"{report.parsed_fraction:.0%} parsed ({report.unfinished_unparsed} hit the token limit "
                  f"without an answer); kept {len(kept_rows)} "
                  f"({len(kept_rows) / total:.0%}). Audit against gold: {audit}")
        return [self._example(questions[g], parts[p][0].texts[i], float(parts[p][1][i]), f"round-{self.round}")
                for g, p, i in order]  # the kept candidates themselves, as training examples

    # ------------------------------------------------------------------ Lightning
    def train_dataloader(self) -> DataLoader:
        trainer, hp = self.trainer, self.hparams
        round_ = trainer.current_epoch // hp.epochs_per_round
        more_rounds = trainer.max_epochs is not None and trainer.max_epochs > hp.epochs_per_round
        if more_rounds and trainer.reload_dataloaders_every_n_epochs != hp.epochs_per_round:
            raise ValueError(f"several rounds need trainer.reload_dataloaders_every_n_epochs={hp.epochs_per_round}")
        if round_ != self.round or self.train_set is None:
            self.round = round_
            run_dir = Path(trainer.log_dir or trainer.default_root_dir)
            warmup = hp.labeled_warmup and round_ == 0
            examples = self._labeled()
            if not warmup:
                examples += self._generate_and_select(trainer.lightning_module.policy, run_dir)
            tokenized = [tokenize_example(self.tokenizer, e, hp.max_length) for e in examples]
            self.train_set = TokenizedDataset(tokenized)
        sampler = LengthBucketSampler([len(e.input_ids) for e in self.train_set.examples], hp.batch_size,
                                      seed=hp.seed + self.round, rank=trainer.global_rank,
                                      world_size=trainer.world_size)
        collate_fn = functools.partial(collate, pad_token_id=self.tokenizer.pad_token_id)
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate_fn)


def _majorities(batch: Candidates) -> list[str | None]:
    """Each candidate's question's majority answer (SPEC §1), for the kept rows' record."""
    out: list[str | None] = [None] * len(batch)
    for g, rows in enumerate(batch.members()):
        majority, _, _ = batch.tasks[g].majority([batch.answers[i] for i in rows])
        for i in rows:
            out[i] = majority
    return out
