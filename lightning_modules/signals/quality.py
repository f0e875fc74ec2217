"""How well a signal separates right answers from wrong ones (SPEC §7, signal quality; evaluation only: gold
never reaches training). Pure tensor functions over N candidates grouped by question; `values` are oriented so
that higher is better (negate a lower-is-better signal first); NaN = no value.

- `auroc`: the area under the ROC curve of the values for right vs wrong candidates over all candidates
  (torchmetrics), candidates without a value left out;
- `ranking_auc`: how often a right candidate of a question outranks a wrong one of the same question (ties 1/2):
  the part of the signal that group-normalised RL advantages use;
- `best_of_k`: per question, the candidate with the highest value (ties: the first; a question whose candidates
  all lack a value picks its first);
- `rank_weights`: Borda-style vote weights from the ranks within each question (arXiv 2502.18581): the r-th best of
  n gets (n - r + 1)^power; no value weighs 0.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc


def auroc(values: Tensor, correct: Tensor) -> float:
    """NaN when the candidates with a value are all right or all wrong."""
    has = torch.isfinite(values)
    correct = correct.bool()[has]
    if correct.all() or not correct.any():
        return float("nan")
    return binary_auroc(values[has].double(), correct.long()).item()


def ranking_auc(values: Tensor, correct: Tensor, group: Tensor) -> float | None:
    """None without a (right, wrong) pair within a question."""
    correct = correct.bool()
    pairs = (group[:, None] == group[None, :]) & correct[:, None] & ~correct[None, :]
    if not pairs.any():
        return None
    values = values.nan_to_num(float("-inf"))  # no value ranks below every value
    diff = values[:, None] - values[None, :]
    ties = (values[:, None] == values[None, :])
    return ((diff > 0).float() + 0.5 * ties.float())[pairs].mean().item()


def best_of_k(values: Tensor, group: Tensor, num_questions: int) -> Tensor:
    """(P,) long: each question's pick (-1 for a question without candidates)."""
    values = values.nan_to_num(float("-inf"))
    out = torch.full((num_questions,), -1, dtype=torch.long)
    for g in range(num_questions):
        rows = torch.nonzero(group == g).flatten()
        if len(rows):
            out[g] = rows[int(values[rows].argmax())]
    return out


def rank_weights(values: Tensor, group: Tensor, power: float = 0.5) -> Tensor:
    """(N,) weights: within each question, rank r = 1 for the highest value; (n - r + 1)^power; NaN -> 0."""
    out = torch.zeros(len(values))
    for g in group.unique():
        rows = torch.nonzero(group == g).flatten()
        rows = rows[torch.isfinite(values[rows])]
        order = rows[torch.argsort(values[rows], descending=True, stable=True)]
        n = len(order)
        out[order] = torch.arange(n, 0, -1, dtype=torch.float) ** power
    return out
