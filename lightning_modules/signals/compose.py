"""Signals made of signals: guards against a wrong majority as compositions, no new pipeline (SPEC §11).

`Gated(signal, gate, threshold, fill=0)`: the signal's value where the gate reaches the threshold (at most, for a
lower-is-better gate; a gate with no value does not pass), else `fill`. CuMa's mask (arXiv 2511.04902) is
`Gated(MajorityAnswer(), VoteShare(), threshold)`: a group whose majority holds less than `threshold` of its parsed
votes gets the same reward for every answer, hence zero group-normalised advantage (TTRL's reward otherwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.candidates import Candidates
from lightning_modules.signals.base import Signal


class Gated(Signal):
    judge = "none"  # the two signals apply their own judges

    def __init__(self, signal: Signal, gate: Signal, threshold: float, fill: float = 0.0) -> None:
        super().__init__()
        self.signal, self.gate, self.threshold, self.fill = signal, gate, threshold, fill
        self.higher_is_better, self.abstains = signal.higher_is_better, signal.abstains
        self.needs_group = signal.needs_group or gate.needs_group
        self.deterministic = signal.deterministic and gate.deterministic

    @property
    def name(self) -> str:
        return f"{self.signal.name}_gated_by_{self.gate.name}"

    def forward(self, candidates: Candidates, policy) -> Tensor:
        value, gate = self.signal(candidates, policy).float(), self.gate(candidates, policy).float()
        passed = gate >= self.threshold if self.gate.higher_is_better else gate <= self.threshold  # NaN: False
        return torch.where(passed, value, torch.full_like(value, self.fill))
