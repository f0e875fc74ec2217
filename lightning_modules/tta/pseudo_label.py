"""Online pseudo-label self-training on the stream (the test-time version of LMSI/TTRL; SPEC §7b).

For each batch: sample `samples` answers per item at `temperature`; the items whose majority answer has a vote
(at least two parsed answers: `MajorityAnswer`) take one sampled answer that agrees with it, its whole rationale,
as the SFT target; one step on the mean token NLL of those targets. Items without a majority are skipped
(`kept_fraction`). The reported predictions are the greedy answers made before the step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.distributed import any_rank
from lightning_modules.signals import MajorityAnswer, score
from lightning_modules.tta.base import TTAMethod


class PseudoLabel(TTAMethod):
    levels = ("token",)

    def __init__(self, samples: int = 4, temperature: float = 0.7, seed: int = 0) -> None:
        super().__init__()
        if samples < 2:
            raise ValueError(f"PseudoLabel: a majority needs at least 2 samples per item, got samples={samples}")
        self.samples, self.temperature = samples, temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.vote = MajorityAnswer()

    def adapt(self, view, optimizer) -> tuple[None, dict[str, Tensor]]:
        candidates = view.sample(self.samples, self.temperature, self.generator)
        agrees = score(self.vote, candidates, view.policy) == 1  # (N,) NaN (no vote) compares False
        targets = [next(i for i in rows if agrees[i]) for rows in candidates.members() if agrees[rows].any()]
        kept = torch.tensor(len(targets) / len(candidates.questions))
        if not any_rank(bool(targets)):
            return None, {"kept_fraction": kept}
        if targets:
            nll, at = view.response_nll(candidates.subset(targets))  # (K, T) each
            loss = ((nll * at).sum(-1) / at.sum(-1).clamp_min(1)).mean()
        else:  # other ranks step
            loss = self.zero_loss()
        self.step(loss, optimizer)
        return None, {"loss": loss.detach(), "kept_fraction": kept}
