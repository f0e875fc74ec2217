"""`Candidates`, the one currency of sampled answers, and `sample`, the only way to make them.

Every pipeline samples through `sample` (with `complete`, a judge's replies to its own prompts, the only callers of
the decode loop; the only place answers are finished and extracted): self-training through the cached engine
(`datamodules/generation.py`, which stores `Candidates` as table chunks in the `FEATURES` format), RL rollouts,
TTA's token-level answers and every evaluation (`lightning_modules/evaluation.evaluate`). Signals score them
(`signals/base.py`), selectors keep and weigh them (`datamodules/selection.py`), kept ones become training examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import datasets
import torch
from torch import Tensor

from lightning_modules.batching import pad
from lightning_modules.progress import phase
from lightning_modules.sampling import SamplingParams, finish_text, generate_batch, prefix_cache


@dataclass
class Candidates:
    """N candidate answers to P questions, grouped by question (`group[i]` is candidate i's question index)."""

    questions: list[Any]  # (P,) question objects: text in `.question`, gold in `.answer` (evaluation only)
    tasks: list[Any]  # (P,) each question's task: `extract`, `same`, `majority`, `answer_counts`, `format_question`
    group: Tensor  # (N,) long
    texts: list[str]  # (N,) response texts
    answers: list[str | None]  # (N,) extracted answers, None when unparsable
    prompt_ids: list[list[int]]  # (P,) the ids of the prompt that sampled, after the shared prefix
    response_ids: list[list[int]]  # (N,)
    logprobs: list[list[float]] | None = None  # (N,) each response token's log-prob at temperature 1, when sampled
    prefix_ids: list[int] = field(default_factory=list)  # shared by every prompt (a task's few-shot exemplars)
    finish: list[str] | None = None  # (N,) why each sampled answer ended: "eos", "stop" or "length"

    def __len__(self) -> int:
        return len(self.texts)

    def members(self) -> list[list[int]]:
        """The candidate indices of each question, in order. (P lists)"""
        rows: list[list[int]] = [[] for _ in self.questions]
        for i, g in enumerate(self.group.tolist()):
            rows[g].append(i)
        return rows

    def subset(self, index: Sequence[int]) -> Candidates:
        """The candidates at `index` (every question kept, so `group` keeps its meaning)."""
        index = list(index)
        pick = (lambda xs: None if xs is None else [xs[i] for i in index])
        return replace(self, group=self.group[torch.tensor(index, dtype=torch.long)], texts=pick(self.texts),
                       answers=pick(self.answers), response_ids=pick(self.response_ids), logprobs=pick(self.logprobs),
                       finish=pick(self.finish))

    def question_text(self, i: int) -> str:
        """Candidate i's question as its task writes it (options included), without any chat template."""
        g = int(self.group[i])
        return self.tasks[g].format_question(self.questions[g])

    # ------------------------------------------------------------------ the table format (the cache's chunks)
    def table_rows(self) -> list[dict]:
        """One `FEATURES` row per candidate (sampled candidates only: they carry log-probs and why they ended)."""
        index = [0] * len(self.questions)
        rows = []
        for i, g in enumerate(self.group.tolist()):
            rows.append({"question_id": self.questions[g].id, "sample_index": index[g], "completion": self.texts[i],
                         "answer": self.answers[i], "num_tokens": len(self.response_ids[i]),
                         "token_ids": self.response_ids[i], "token_logprobs": self.logprobs[i],
                         "finish_reason": self.finish[i]})
            index[g] += 1
        return rows

    @classmethod
    def from_table(cls, rows: Sequence[dict], questions: Sequence[Any], tasks: Sequence[Any],
                   prompt_ids: Sequence[list[int]], prefix_ids: Sequence[int]) -> Candidates:
        """Candidates from `FEATURES` rows (any subset of `questions`' answers, any order), with the prompts that
        sampled them."""
        position = {q.id: i for i, q in enumerate(questions)}
        return cls(
            questions=list(questions), tasks=list(tasks),
            group=torch.tensor([position[r["question_id"]] for r in rows], dtype=torch.long),
            texts=[r["completion"] for r in rows], answers=[r["answer"] for r in rows],
            prompt_ids=[list(p) for p in prompt_ids], response_ids=[list(r["token_ids"]) for r in rows],
            logprobs=[list(r["token_logprobs"]) for r in rows], prefix_ids=list(prefix_ids),
            finish=[r["finish_reason"] for r in rows])

    @classmethod
    def concat(cls, parts: Sequence[Candidates]) -> Candidates:
        """The parts' questions and candidates in order (parts sampled with one prefix)."""
        offsets = torch.tensor([0] + [len(p.questions) for p in parts]).cumsum(0)
        flat = (lambda name: [x for p in parts for x in getattr(p, name)])
        return cls(questions=flat("questions"), tasks=flat("tasks"),
                   group=torch.cat([p.group + offsets[i] for i, p in enumerate(parts)]), texts=flat("texts"),
                   answers=flat("answers"), prompt_ids=flat("prompt_ids"), response_ids=flat("response_ids"),
                   logprobs=flat("logprobs") if all(p.logprobs is not None for p in parts) else None,
                   prefix_ids=list(parts[0].prefix_ids) if parts else [],
                   finish=flat("finish") if all(p.finish is not None for p in parts) else None)


FEATURES = datasets.Features({
    "question_id": datasets.Value("string"),
    "sample_index": datasets.Value("int32"),
    "completion": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "num_tokens": datasets.Value("int32"),
    "token_ids": datasets.Sequence(datasets.Value("int32")),
    "token_logprobs": datasets.Sequence(datasets.Value("float32")),
    "finish_reason": datasets.Value("string"),
})


# ---------------------------------------------------------------------------------------------- sampling
def chunk_generator(seed: int, chunk: int) -> torch.Generator:
    """The generator that samples chunk `chunk` of a call seeded `seed` (the cached engine's chunks; an evaluation
    is one chunk): a resumed or sharded run draws what an uninterrupted one draws."""
    digest = hashlib.sha256(repr((seed, chunk)).encode()).digest()[:8]
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def prompts(tokenizer, questions: Sequence[Any], tasks: Sequence[Any]) -> tuple[list[int], list[list[int]]]:
    """The prefix shared by every prompt (a task's few-shot exemplars) and each question's suffix ids."""
    parts = [task.prompt_parts(tokenizer, q) for q, task in zip(questions, tasks)]
    prefix = parts[0].prefix_ids if parts else []
    if any(p.prefix_ids != prefix for p in parts):
        raise ValueError("sample: the questions' prompts do not share one prefix (tasks with different exemplars); "
                         "sample them separately")
    return list(prefix), [p.suffix_ids for p in parts]


@phase("generation")
def sample(policy, questions: Sequence[Any], tasks: Sequence[Any], params: SamplingParams,
           generator: torch.Generator | None = None, suffix_ids: Sequence[Sequence[int]] | None = None,
           prefix_ids: Sequence[int] | None = None, batch_size: int | None = None) -> Candidates:
    """`params.n` answers to each question from the policy as it is now (in `policy.inference()`), with their tokens'
    log-probs at temperature 1 and why each ended; each answer is finished (cut at a stop string) and its answer
    extracted by its question's task, given why it ended.

    The prompts are `prefix_ids + suffix_ids[p]` (default: each task's prompt, `prompts`); tasks mixed in one batch
    share a template, so the union of their stop strings ends every answer. `batch_size`: questions per decode batch,
    shortest prompts first (None: one batch in the given order). The generator is drawn from batch by batch."""
    tok = policy.tokenizer
    if suffix_ids is None:
        prefix_ids, suffix_ids = prompts(tok, questions, tasks)
    prefix_ids = list(prefix_ids or [])
    stop = tuple(dict.fromkeys(s for task in tasks for s in task.stop))
    p = len(suffix_ids)
    order = sorted(range(p), key=lambda i: len(suffix_ids[i])) if batch_size else list(range(p))
    size = batch_size or max(p, 1)
    completions: list = [None] * p
    with policy.inference():
        cache = prefix_cache(policy.model, prefix_ids)
        for start in range(0, p, size):
            batch = order[start : start + size]
            out = generate_batch(policy.model, tok, cache, len(prefix_ids), [suffix_ids[i] for i in batch], params,
                                 stop, generator)
            for k, i in enumerate(batch):
                completions[i] = out[k * params.n : (k + 1) * params.n]
    finished = [finish_text(tok, c, stop) for per_question in completions for c in per_question]
    group = torch.arange(p).repeat_interleave(params.n)
    return Candidates(
        questions=list(questions), tasks=list(tasks), group=group, texts=[t for t, _ in finished],
        answers=[tasks[int(g)].answer(t, c.finish_reason) for g, (t, c) in zip(group, finished)],
        prompt_ids=[list(s) for s in suffix_ids], response_ids=[c.tokens for _, c in finished],
        logprobs=[c.logprobs for _, c in finished], prefix_ids=prefix_ids,
        finish=[c.finish_reason for _, c in finished])


def complete(policy, prompts: Sequence[Sequence[int]], params: SamplingParams,
             generator: torch.Generator | None = None) -> list[str]:
    """The texts of `params.n` completions of each whole prompt (no shared prefix, no stop string, special tokens
    dropped), under the model as the caller set it: a judge's replies to its own prompts, not candidates."""
    tok = policy.tokenizer
    completions = generate_batch(policy.model, tok, None, 0, prompts, params, (), generator)
    return [finish_text(tok, c, ())[0] for c in completions]


def candidate_tensors(candidates: Candidates, pad_token_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded prompt + response ids (N, T), their attention mask, and `labels` holding the response tokens
    (IGNORE_INDEX elsewhere), so that `policy.token_nll(ids, mask, labels, candidates.prefix_ids)` scores the
    responses. The rows continue `candidates.prefix_ids`, which they leave out."""
    prompts_ = [candidates.prompt_ids[int(g)] for g in candidates.group]
    ids, mask, labels = pad([p + r for p, r in zip(prompts_, candidates.response_ids)], pad_token_id,
                            targets_from=[len(p) for p in prompts_])
    return ids.to(device), mask.to(device), labels.to(device)
