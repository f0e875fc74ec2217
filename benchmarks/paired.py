"""Paired statistics for the method tables (SPEC §9): every method of a seed is scored on the same held-out
questions, so two methods compare question by question.

The statistics live in `callbacks/statistics.py` (the signal-quality report uses them too):
- `paired_difference(a, b)`: the difference of accuracies mean(a) - mean(b) with a 95% percentile-bootstrap
  interval over questions (each resample draws question indices once and uses them for both methods; 2,000
  resamples) and McNemar's exact two-sided p on the discordant questions.
- Seeds are pooled by concatenating their question sets (`pool`): a question of seed 0 and the same question of
  seed 1 count as two paired observations, since the models differ.
- `clusters`: a cluster bootstrap instead (`callbacks/statistics.py`), for held-out questions that repeat an item
  (the demo task's 500 questions hold 182 distinct products; the tables cluster by product, over seeds too).
`paired_rows` prints these cells for every method against named baselines; the self-improvement and RL tables use
it (and the signal and TTA tables are meant to).
"""

from __future__ import annotations

import re

from callbacks.statistics import cell, mcnemar_exact, paired_difference, pool

__all__ = ["cell", "mcnemar_exact", "number_clusters", "paired_difference", "paired_rows", "pool"]


def number_clusters(questions: list, seeds: int) -> list[tuple[str, ...]]:
    """One cluster key per pooled question: the numbers in its text (the demo task's (a, b)), the same key for a
    question under every seed (pooled in seed order, as `pool` does)."""
    return [tuple(re.findall(r"\d+", q.question)) for q in questions] * seeds


def paired_rows(results: dict[str, list[dict]], key: str, baselines: dict[str, list[list[bool]]],
                clusters: list | None = None) -> list[str]:
    """Markdown rows: each method's `key` scores (one list per seed) against each baseline's (one list per seed,
    the same questions), pooled over seeds, "-" against itself; `clusters`: one key per pooled question, for a cluster
    bootstrap."""
    rows = []
    for method, runs in results.items():
        cells = ["-" if name == method else
                 cell(paired_difference(*pool([(r[key], base[i]) for i, r in enumerate(runs)]), clusters=clusters))
                 for name, base in baselines.items()]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return rows
