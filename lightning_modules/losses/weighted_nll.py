"""Weighted negative log-likelihood for (self-)training on weighted samples.

Given per-token NLL `l[b, t]`, a target mask `m[b, t]` and per-sample weights `w[b] >= 0`:
- `reduction="sample"`: L_b = sum_t m l / sum_t m (each sample's mean NLL), loss = sum_b w_b L_b / sum_b w_b.
  Every sample counts the same whatever its length (IWSI trains this way).
- `reduction="token"`: loss = sum_{b,t} w_b m l / sum_{b,t} w_b m. Every token counts the same; with w = 1 this
  is the usual causal-LM loss (what `transformers` computes from `labels`).
A batch whose weights are all zero gives loss 0 with zero gradient (nothing to learn from), not NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_modules.losses.base import LossOutput, SFTLoss


class WeightedNLL(SFTLoss):
    def __init__(self, reduction: Literal["sample", "token"] = "sample") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, token_nll: Tensor, mask: Tensor, weight: Tensor) -> LossOutput:
        """token_nll (B, T) float32, mask (B, T) bool, weight (B,)."""
        mask = mask.float()
        weight = weight.float()
        tokens = mask.sum(-1)  # (B,)
        sample_nll = (token_nll * mask).sum(-1) / tokens.clamp_min(1)  # (B,)
        if self.reduction == "sample":
            num, den = (weight * sample_nll).sum(), weight.sum()
        else:
            num, den = (weight[:, None] * token_nll * mask).sum(), (weight * tokens).sum()
        loss = num / den.clamp_min(torch.finfo(torch.float32).tiny)
        return LossOutput(loss, {"nll": sample_nll.detach().mean(), "weight_mean": weight.mean()})
