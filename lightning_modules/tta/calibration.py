"""Batch calibration (Zhou et al., ICLR 2024, arXiv 2309.17249; SPEC §7b): the gradient-free reference point at
the label level. Nothing is updated; each batch's prediction subtracts the batch's contextual prior:
predict argmax_c q(c|x_i) / mean_j q(c|x_j), the paper's estimate of the prior (`average: probs`, the default), or
argmax_c [log q(c|x_i) - mean_j log q(c|x_j)] (`average: log_probs`: the geometric mean, a variant of ours).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from lightning_modules.tta.base import TTAMethod


class BatchCalibration(TTAMethod):
    levels = ("label",)

    def __init__(self, average: Literal["probs", "log_probs"] = "probs") -> None:
        super().__init__()
        self.average = average

    def check(self, optimizer) -> None:
        pass  # no update: any optimizer is left unused

    def adapt(self, view, optimizer) -> tuple[Tensor, dict[str, Tensor]]:
        return view.predictions(), {}

    def decide(self, logits: Tensor) -> Tensor:
        log_q = logits.float().log_softmax(-1)  # (B, C)
        prior = log_q.mean(0) if self.average == "log_probs" else log_q.exp().mean(0).log()  # (C,)
        return (log_q - prior).argmax(-1)
