"""The one evaluation path: `evaluate(policy, task, questions, greedy, sampled, signals) -> Evaluation`.

Greedy answers, k sampled answers (maj@k, pass@k) and, per label-free signal, a signal-weighted vote and a best-of-k
pick, graded against the questions' gold where they have one. Used by every evaluation: the fit hooks of
`TaskEvaluation` (before and after training, each round), `labelfree test` (`AnswerSamplingModule`, one
`Evaluation` per test batch, read by the `TaskEvaluation` and `SignalQuality` callbacks) and the benchmarks.

maj@k: the majority of the k sampled answers (unparsable answers get no vote, ties go to the first seen) equals
the gold answer; pass@k: any of the k does. Per signal: `vote/<signal>`, the k answers' vote weighted by the
signal's rank within the question (Borda weights (k - r + 1)^vote_power, arXiv 2502.18581) or by its values
(`vote_weighting="value"`, DeepConf's confidence-weighted vote), and `best/<signal>`, the answer of the candidate
the signal ranks first.

`labelfree test -c configs/eval/<task>.yaml --ckpt_path CKPT` evaluates a trained adapter: the policy is then
the checkpoint's (base model and adapter settings, see `cli.py`) and its trained tensors are loaded into it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import lightning as L

from lightning_modules.candidates import Candidates, chunk_generator, sample
from lightning_modules.checkpointing import TrainableStateMixin
from lightning_modules.policy import Policy
from lightning_modules.progress import phase
from lightning_modules.sampling import SamplingParams
from lightning_modules.signals import Signal, score, signal_names
from lightning_modules.signals.quality import best_of_k, rank_weights
from lightning_modules.signals.votes import weighted_vote


def score_question(task, question, greedy: str, samples: list[str], greedy_finish: str = "stop",
                   sample_finish: list[str] | None = None) -> dict:
    """One question's evaluation row; each completion is read given why it ended (`task.answer`: one that hit the
    token limit has an answer only where it states one)."""
    sample_finish = sample_finish or ["stop"] * len(samples)
    greedy_answer = task.answer(greedy, greedy_finish)
    answers = [task.answer(s, f) for s, f in zip(samples, sample_finish)]
    majority, votes, parsed = task.majority(answers)
    return {
        "id": question.id, "question": question.question, "gold": question.answer,
        "greedy_completion": greedy, "greedy_finish": greedy_finish, "greedy_answer": greedy_answer,
        "greedy_correct": task.same(greedy_answer, question.answer),
        "greedy_unfinished": greedy_finish == "length" and greedy_answer is None,
        "samples": samples, "sample_finish": sample_finish, "sample_answers": answers, "majority": majority,
        "votes": votes, "parsed": parsed, "maj_correct": task.same(majority, question.answer),
        "pass": any(task.same(a, question.answer) for a in answers),
    }


def judge_samples(candidates: Candidates, policy, signals: Sequence[Signal], vote_power: float = 0.5,
                  vote_weighting: Literal["rank", "value"] = "rank") -> dict[str, dict]:
    """Per signal (by unique name): its values (N,), and for each question the signal-weighted vote's answer and
    the best-of-k pick's answer. `vote_weighting="value"` weighs each vote by the signal's value itself (DeepConf's
    confidence-weighted vote; higher-is-better signals with non-negative values only)."""
    out = {}
    for signal, name in zip(signals, signal_names(signals)):
        values = score(signal, candidates, policy)
        oriented = values if signal.higher_is_better else -values
        if vote_weighting == "value":
            if not signal.higher_is_better or (values < 0).any():
                raise ValueError(f"vote_weighting 'value' needs a higher-is-better signal with non-negative values; "
                                 f"{name} is not")
            weights = values
        else:
            weights = rank_weights(oriented, candidates.group, vote_power)
        picks = best_of_k(oriented, candidates.group, len(candidates.questions)).tolist()
        out[name] = {"values": values, "vote": weighted_vote(candidates, weights),
                     "best": [candidates.answers[i] if i >= 0 else None for i in picks]}
    return out


@dataclass
class Evaluation:
    """One row per question (`score_question`'s columns, plus `vote/<signal>` and `best/<signal>` once judged), the
    greedy answers and the k sampled ones (None when k = 0) as `Candidates`, and each judged signal's values, votes
    and picks (`judge_samples`)."""

    rows: list[dict]
    greedy: Candidates
    candidates: Candidates | None
    judged: dict[str, dict] = field(default_factory=dict)

    def judge(self, policy, signals: Sequence[Signal], vote_power: float = 0.5,
              vote_weighting: Literal["rank", "value"] = "rank") -> None:
        """Scores the sampled answers with each signal and adds its vote and best-of-k columns to the rows."""
        if not signals or self.candidates is None:
            return
        judged = judge_samples(self.candidates, policy, signals, vote_power, vote_weighting)
        task = self.candidates.tasks[0]
        for name, j in judged.items():
            for row, vote, best in zip(self.rows, j["vote"], j["best"]):
                row[f"vote/{name}"] = task.same(vote, row["gold"])
                row[f"best/{name}"] = task.same(best, row["gold"])
        self.judged |= judged

    @property
    def num_tokens(self) -> int:
        """Tokens generated (greedy and sampled)."""
        return sum(len(r) for c in (self.greedy, self.candidates) if c is not None for r in c.response_ids)


@phase("evaluation")
def evaluate(policy, task, questions: Sequence, greedy: SamplingParams,
             sampled: SamplingParams | None = None, signals: Sequence[Signal] = (), batch_size: int = 8,
             greedy_batch_size: int | None = None, vote_power: float = 0.5,
             vote_weighting: Literal["rank", "value"] = "rank", sampler: Callable[..., Candidates] | None = None
             ) -> Evaluation:
    """Greedy answers (`greedy`, temperature 0) and, with `sampled`, `sampled.n` sampled answers to each question,
    graded, with each signal's vote and best-of-k columns. `batch_size`: questions per sampling batch
    (`greedy_batch_size`, default `batch_size * sampled.n`: as many rows per greedy batch). `sampler`: what draws
    the answers, `candidates.sample` (None) or a function of its signature (`datamodules.generation.cached_sampler`: the
    same answers, kept on disk for the next evaluation of the same weights)."""
    questions = list(questions)
    if not questions:
        raise ValueError("no questions to evaluate")
    k = sampled.n if sampled is not None else 0
    tasks = [task] * len(questions)
    sampler = sampler or sample
    first = sampler(policy, questions, tasks, greedy, batch_size=greedy_batch_size or batch_size * max(k, 1))
    candidates = None
    if sampled is not None:  # drawn as the cached engine draws one chunk (the same answers as through it)
        candidates = sampler(policy, questions, tasks, sampled, chunk_generator(sampled.seed, 0), batch_size=batch_size)
    texts = candidates.texts if candidates is not None else []
    ends = candidates.finish if candidates is not None else []
    rows = [score_question(task, q, first.texts[i], texts[i * k : (i + 1) * k], first.finish[i],
                           ends[i * k : (i + 1) * k]) for i, q in enumerate(questions)]
    evaluation = Evaluation(rows, first, candidates)
    evaluation.judge(policy, signals, vote_power, vote_weighting)
    return evaluation


class AnswerSamplingModule(TrainableStateMixin, L.LightningModule):
    """`labelfree test`: each test (or predict) batch of a `QuestionDataModule` evaluated with `evaluate`; the step
    returns its `Evaluation`, which the `TaskEvaluation` and `SignalQuality` callbacks read.

    Args:
        policy: the model under evaluation.
        k: sampled answers per prompt (for maj@k and pass@k); 0 = greedy only.
        temperature, top_p, max_new_tokens, seed: sampling settings of the k answers (batch b samples with the seed
            `seed * 1_000_003 + b`).
    """

    def __init__(self, policy: Policy, k: int = 8, temperature: float = 0.7, top_p: float = 1.0,
                 max_new_tokens: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.policy, self.k = policy, k
        self.greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
        self.sampled = SamplingParams(n=max(k, 1), temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                      seed=seed)

    def test_step(self, batch: dict, batch_idx: int) -> Evaluation:
        sampled = replace(self.sampled, seed=self.sampled.seed * 1_000_003 + batch_idx) if self.k else None
        size = len(batch["questions"])
        return evaluate(self.policy, batch["task"], batch["questions"], self.greedy, sampled, batch_size=size,
                        greedy_batch_size=size)

    def predict_step(self, batch: dict, batch_idx: int) -> Evaluation:
        return self.test_step(batch, batch_idx)
