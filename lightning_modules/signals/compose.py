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
from lightning_modules.signals.confidence import NegativeEntropy
from lightning_modules.signals.votes import answer_clusters


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


class SelectiveComplementary(Signal):
    judge, needs_group = "none", True  # the confidence signal applies its own judge

    def __init__(self, confidence: Signal | None = None, tau_pos: float = 0.5, tau_marg: float = 0.15,
                 tau_low: float = 0.15) -> None:
        super().__init__()
        self.confidence = confidence if confidence is not None else NegativeEntropy(unparsable_value=None)
        if self.confidence.abstains:
            raise ValueError(f"SelectiveComplementary: the confidence signal {self.confidence.name} may have no "
                             "value; give one that scores every answer (e.g. NegativeEntropy)")
        self.tau_pos, self.tau_marg, self.tau_low = tau_pos, tau_marg, tau_low
        self.deterministic = self.confidence.deterministic

    def forward(self, candidates: Candidates, policy) -> Tensor:
        clusters = answer_clusters(candidates)
        confidence = self.confidence(candidates, policy).double()  # float64 and Python floats, as the official
        if not self.confidence.higher_is_better:
            confidence = -confidence
        out = torch.full((len(candidates),), -1.0)  # unparsable answers keep -1
        for rows in candidates.members():
            ids, conf = clusters[rows], confidence[rows]
            parsed = ids >= 0
            if not parsed.any():
                continue
            share = [int(c) / len(rows) for c in torch.bincount(ids[parsed])]  # over all G answers
            order = sorted(range(len(share)), key=lambda k: -share[k])  # stable: ties in first-seen order
            top = order[0]
            second = share[order[1]] if len(order) > 1 else None
            clear = share[top] >= self.tau_pos and (second is None or share[top] - second > self.tau_marg)
            positive = top if clear else -1
            values = torch.zeros(len(rows))
            for k in range(len(share)):
                if k == positive:
                    values[ids == k] = 1.0
                elif share[k] < self.tau_low and conf[ids == k].mean() <= conf.mean():
                    values[ids == k] = -1.0
            out[rows] = torch.where(parsed, values, out[rows])
        return out
