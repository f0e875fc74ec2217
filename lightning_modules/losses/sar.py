"""SAR's reliable entropy (Niu et al., ICLR 2023; reference: mr-eggplant/SAR, sar.py).

Reliable samples have entropy below E0 = margin_factor * ln C (0.4 ln C); the loss is their mean entropy.
With the SAM optimizer the TTA module runs the full two-pass update (`sar_adapt_step`) with this margin and
keeps the EMA of the second-pass loss here (`ema`), which the `ModelReset` callback reads. With a plain
optimizer this is entropy minimisation over the reliable samples only. An empty reliable set gives loss 0
(no update) instead of the reference's NaN.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from lightning_modules.losses.base import LossOutput
from lightning_modules.losses.functional import entropy


class ReliableEntropy(nn.Module):
    def __init__(self, margin_factor: float = 0.4, ema_momentum: float = 0.9) -> None:
        super().__init__()
        self.margin_factor, self.ema_momentum = margin_factor, ema_momentum
        self.ema: float | None = None
        self.first_ema: float | None = None  # for the relative reset rule

    def margin(self, num_classes: int) -> float:
        return self.margin_factor * math.log(num_classes)

    def update_ema(self, ema: float | None) -> None:
        self.ema = ema
        if ema is not None and self.first_ema is None:
            self.first_ema = ema

    def reset(self) -> None:
        self.ema = self.first_ema = None

    def forward(self, logits: Tensor) -> LossOutput:
        """logits (B, C)."""
        ent = entropy(logits)  # (B,)
        reliable = ent < self.margin(logits.shape[-1])
        loss = ent[reliable].mean() if reliable.any() else (logits * 0).sum()
        return LossOutput(loss, {"kept_fraction": reliable.float().mean()})
