"""Signals from the group's extracted answers alone (no model pass), answers pooled by the task's equivalence
(`task.same`: math-verify for math). Unparsable answers never vote.

- `MajorityAnswer` (LMSI, SPEC §1; TTRL, arXiv 2504.16084): 1 if the candidate's answer equals its question's
  majority answer (ties go to the answer seen first), else 0. A question with fewer than `min_parsed` parsed
  answers has no vote: NaN for all its candidates (no selector keeps it; as an RL reward it counts 0); a question
  whose parsed answers all differ has no majority (a majority needs two votes): every candidate gets 0.
  `min_parsed=1` lets a lone answer win (one parsed, or one vote among different ones), as TTRL's official code
  does.
- `VoteShare`: the majority's votes / parsed answers, one value per question (NaN below two parsed answers).
- `AnswerEntropy` (Entropy-filter, SPEC §3): -sum_a p(a) log p(a) / log(parsed) over the parsed votes, lower
  is better (NaN below two parsed answers, never the "certain" 0 of one answer).
- `ClusterShare` (EMPO, arXiv 2504.05812; QingyangZhang/EMPO `get_empo_math_reward`): the G answers clustered,
  each unparsable answer a cluster of its own (the official `verify('', '')` is False; `unparsable="one_cluster"`
  pools them); the value is the share |c| / G of the candidate's cluster, 0 for an unparsable answer, and 0 for
  the whole group when the cluster entropy reaches log G, i.e. when every answer is different. Deviation: answers
  cluster by the task's equivalence (0.5 with 1/2); the official code compares the extracted strings.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_modules.candidates import Candidates
from lightning_modules.signals.base import Signal


def answer_clusters(candidates: Candidates) -> Tensor:
    """Each candidate's answer cluster within its question (`task.answer_clusters`: numbered in first-seen order,
    equal answers under `task.same` pooled, as votes are); -1 for an unparsable answer. (N,) long."""
    out = torch.full((len(candidates),), -1, dtype=torch.long)
    for g, rows in enumerate(candidates.members()):
        ids, _ = candidates.tasks[g].answer_clusters([candidates.answers[i] for i in rows])
        out[rows] = torch.tensor(ids, dtype=torch.long)
    return out


class MajorityAnswer(Signal):
    judge, needs_group, abstains = "none", True, True

    def __init__(self, min_parsed: int = 2) -> None:
        super().__init__()
        if min_parsed < 1:
            raise ValueError(f"MajorityAnswer: min_parsed must be at least 1, got {min_parsed}")
        self.min_parsed = min_parsed

    def forward(self, candidates: Candidates, policy) -> Tensor:
        out = torch.full((len(candidates),), math.nan)
        for g, rows in enumerate(candidates.members()):
            task = candidates.tasks[g]
            majority, _, parsed = task.majority([candidates.answers[i] for i in rows],
                                                min_votes=1 if self.min_parsed == 1 else 2)
            if parsed >= self.min_parsed:
                for i in rows:
                    out[i] = float(task.same(candidates.answers[i], majority))
        return out


class VoteShare(Signal):
    judge, needs_group, abstains = "none", True, True

    def forward(self, candidates: Candidates, policy) -> Tensor:
        out = torch.full((len(candidates),), math.nan)
        for g, rows in enumerate(candidates.members()):
            _, votes, parsed = candidates.tasks[g].majority([candidates.answers[i] for i in rows])
            if parsed > 1:
                out[rows] = votes / parsed
        return out


class AnswerEntropy(Signal):
    judge, needs_group, abstains, higher_is_better = "none", True, True, False

    def forward(self, candidates: Candidates, policy) -> Tensor:
        out = torch.full((len(candidates),), math.nan)
        for g, rows in enumerate(candidates.members()):
            counts = [c for _, c in candidates.tasks[g].answer_counts([candidates.answers[i] for i in rows])]
            parsed = sum(counts)
            if parsed > 1:
                out[rows] = -sum(c / parsed * math.log(c / parsed) for c in counts) / math.log(parsed)
        return out


class ClusterShare(Signal):
    judge, needs_group = "none", True

    def __init__(self, unparsable: Literal["each_own", "one_cluster"] = "each_own") -> None:
        super().__init__()
        self.unparsable = unparsable

    def forward(self, candidates: Candidates, policy) -> Tensor:
        clusters = answer_clusters(candidates)
        out = torch.zeros(len(candidates))
        for rows in candidates.members():
            ids = clusters[rows]
            parsed = ids >= 0
            sizes = torch.bincount(ids[parsed]) if parsed.any() else torch.zeros(0, dtype=torch.long)
            unparsed = int((~parsed).sum())
            n_clusters = len(sizes) + (min(unparsed, 1) if self.unparsable == "one_cluster" else unparsed)
            if n_clusters == len(rows):  # every answer different: entropy log G, no signal
                continue
            out[torch.tensor(rows)[parsed]] = sizes[ids[parsed]].float() / len(rows)
        return out


def weighted_vote(candidates: Candidates, weights: Tensor) -> list[str | None]:
    """Each question's answer with the largest summed weight over its candidates (clusters as `answer_clusters`;
    ties go to the answer seen first; NaN weighs 0); None when no answer parsed."""
    clusters, weights = answer_clusters(candidates), weights.nan_to_num(0.0)
    out: list[str | None] = []
    for rows in candidates.members():
        totals: dict[int, float] = {}
        first: dict[int, str] = {}
        for i in rows:
            k = int(clusters[i])
            if k >= 0:
                totals[k] = totals.get(k, 0.0) + float(weights[i])
                first.setdefault(k, candidates.answers[i])
        out.append(first[max(totals, key=lambda k: (totals[k], -k))] if totals else None)
    return out
