"""The gold oracle: 1 if the candidate's answer equals its question's gold answer (`task.same`), else 0.

Not label-free: it reads gold, for upper bounds (the RL oracle run) and for checking other signals. The
signal-quality report and the pseudo-label audit compare with gold on their own; nothing selects or rewards with
this signal unless a config names it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.candidates import Candidates
from lightning_modules.signals.base import Signal


class GoldAnswer(Signal):
    judge = "none"

    def forward(self, candidates: Candidates, policy) -> Tensor:
        gold = [candidates.questions[int(g)].answer for g in candidates.group]
        if any(y is None for y in gold):
            raise ValueError("GoldAnswer needs a gold answer for every question; this data has questions without one")
        return torch.tensor([float(candidates.tasks[int(g)].same(a, y))
                             for a, y, g in zip(candidates.answers, gold, candidates.group)])
