"""Paired statistics over held-out questions (SPEC §9), shared by the signal-quality report and the method tables in
`benchmarks/`: every method is scored on the same questions, so two compare question by question.

- `paired_difference(a, b)`: mean(a) - mean(b) over paired per-question scores with a 95% percentile-bootstrap
  interval over questions (each resample draws question indices once and uses them for both; 2,000 resamples) and
  McNemar's exact two-sided p on the discordant questions (0/1 scores).
- `bootstrap_interval(statistic, n)`: the same resampling of question indices for any statistic of a subset of
  questions (an AUROC, a ratio of sums).
- Seeds are pooled by concatenating their question sets (`pool`): a question of seed 0 and the same question of
  seed 1 count as two paired observations, since the models differ.
- `clusters` (option of both): resample clusters instead of questions, every question of a drawn cluster together
  (a cluster bootstrap): for held-out questions that repeat an underlying item (the demo task's products, or one
  question under several seeds), whose outcomes are not independent; the interval is wider, never narrower in
  expectation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def bootstrap_interval(statistic: Callable[[torch.Tensor], float], n: int, resamples: int = 2000,
                       level: float = 0.95, seed: int = 0, clusters: Sequence | None = None) -> tuple[float, float]:
    """The percentile-bootstrap interval of `statistic(question_indices)` over `n` questions (NaN draws left out);
    with `clusters` (one key per question) each resample draws clusters, with all their questions."""
    generator = torch.Generator().manual_seed(seed)
    if clusters is None:
        draw = lambda: torch.randint(n, (n,), generator=generator)  # noqa: E731
    else:
        if len(clusters) != n:
            raise ValueError(f"clusters needs one key per question: {len(clusters)} keys for {n} questions")
        members = {}
        for i, key in enumerate(clusters):
            members.setdefault(key, []).append(i)
        groups = [torch.tensor(m) for m in members.values()]
        draw = lambda: torch.cat([groups[g] for g in torch.randint(len(groups), (len(groups),),  # noqa: E731
                                                                    generator=generator).tolist()])
    values = torch.tensor([statistic(draw()) for _ in range(resamples)], dtype=torch.float64)
    values = values[torch.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p: a binomial(n, 1/2) test on the n questions where exactly one method is right."""
    only_a = sum(bool(x) and not bool(y) for x, y in zip(a, b))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(a: Sequence[bool], b: Sequence[bool], resamples: int = 2000, level: float = 0.95,
                      seed: int = 0, clusters: Sequence | None = None) -> dict[str, float]:
    """mean(a) - mean(b) over paired 0/1 scores with a percentile-bootstrap interval (over `clusters` of questions
    when given) and McNemar's exact p."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired scores need the same questions for both methods, got {len(a)} and {len(b)}")
    diff = torch.tensor([float(x) - float(y) for x, y in zip(a, b)], dtype=torch.float64)  # (Q,)
    low, high = bootstrap_interval(lambda idx: diff[idx].mean().item(), len(diff), resamples, level, seed, clusters)
    return {"difference": diff.mean().item(), "low": low, "high": high, "mcnemar_p": mcnemar_exact(a, b),
            "questions": len(diff)}


def pool(per_seed: Sequence[tuple[Sequence[bool], Sequence[bool]]]) -> tuple[list[bool], list[bool]]:
    """Concatenate each seed's paired scores (the pooling SPEC §9 names first)."""
    return [x for a, _ in per_seed for x in a], [y for _, b in per_seed for y in b]


def cell(result: dict[str, float]) -> str:
    """`+0.031 [-0.012, +0.074] p 0.21` for a table."""
    return f"{result['difference']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}] p {result['mcnemar_p']:.2g}"
