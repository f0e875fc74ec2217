"""Information maximisation (SHOT-IM; Liang, Hu, Feng, ICML 2020; SPEC §7b) at the label level: minimise the mean
per-sample entropy while maximising the entropy of the batch-mean prediction, the classic guard against the
collapse onto one class that plain entropy minimisation shows on a label-biased stream.

loss = mean_i H(q_i) - H(mean_i q_i), H(p) = -sum_c p_c log(p_c + eps). `eps` = 1e-5 as SHOT's code
(`Entropy` and the diversity term add it inside the log); `eps: 0` gives the exact formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.tta.base import TTAMethod


def information_maximisation(logits: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor]:
    """(B, C) -> (loss, mean per-sample entropy, entropy of the mean prediction)."""
    p = logits.float().softmax(-1)
    per_sample = -(p * torch.log(p + eps)).sum(-1).mean()
    mean = p.mean(0)
    diversity = -(mean * torch.log(mean + eps)).sum()
    return per_sample - diversity, per_sample, diversity


class InfoMax(TTAMethod):
    levels = ("label",)

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def adapt(self, view, optimizer) -> tuple[Tensor, dict[str, Tensor]]:
        logits = view.logits()
        loss, per_sample, diversity = information_maximisation(logits, self.eps)
        self.step(loss, optimizer)
        return logits.detach(), {"loss": loss.detach(), "diversity": diversity.detach()}
