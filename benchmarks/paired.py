"""Paired statistics for the method tables (SPEC §9): every method of a seed is scored on the same held-out
questions, so two methods compare question by question.

- `paired_difference(a, b)`: the difference of accuracies mean(a) - mean(b) with a 95% percentile-bootstrap
  interval over questions (each resample draws question indices once and uses them for both methods; 2,000
  resamples) and McNemar's exact two-sided p on the discordant questions.
- Seeds are pooled by concatenating their question sets (`pool`): a question of seed 0 and the same question of
  seed 1 count as two paired observations, since the models differ.
`paired_rows` prints these cells for every method against named baselines; the self-improvement and RL tables use
it (and the signal and TTA tables are meant to).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


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
                      seed: int = 0) -> dict[str, float]:
    """mean(a) - mean(b) over paired 0/1 scores with a percentile-bootstrap interval and McNemar's exact p."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired scores need the same questions for both methods, got {len(a)} and {len(b)}")
    diff = torch.tensor([float(x) - float(y) for x, y in zip(a, b)], dtype=torch.float64)  # (Q,)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (resamples, len(diff)), generator=generator)  # (R, Q), one draw for both
    boot = diff[idx].mean(1)  # (R,)
    tail = (1 - level) / 2
    low, high = torch.quantile(boot, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"difference": diff.mean().item(), "low": low, "high": high, "mcnemar_p": mcnemar_exact(a, b),
            "questions": len(diff)}


def pool(per_seed: Sequence[tuple[Sequence[bool], Sequence[bool]]]) -> tuple[list[bool], list[bool]]:
    """Concatenate each seed's paired scores (the pooling SPEC §9 names first)."""
    return [x for a, _ in per_seed for x in a], [y for _, b in per_seed for y in b]


def paired_rows(results: dict[str, list[dict]], key: str, baselines: dict[str, list[list[bool]]]) -> list[str]:
    """Markdown rows: each method's `key` scores (one list per seed) against each baseline's (one list per seed,
    the same questions), pooled over seeds."""
    rows = []
    for method, runs in results.items():
        cells = [cell(paired_difference(*pool([(r[key], base[i]) for i, r in enumerate(runs)])))
                 for name, base in baselines.items()]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return rows


def cell(result: dict[str, float]) -> str:
    """`+0.031 [-0.012, +0.074] p 0.21` for a table."""
    return f"{result['difference']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}] p {result['mcnemar_p']:.2g}"
