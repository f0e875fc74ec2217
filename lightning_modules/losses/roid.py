"""ROID's loss (Marsden, Döbler, Yang, WACV 2024; reference: mariodoebler/test-time-adaptation, roid.py).

Per batch of B samples with label distributions p_i:
  weights (no gradient): w_div = minmax(1 - cos(pi_bar, p_i)), samples with w_div < mean(w_div) excluded;
  w_cert = minmax(-H(p_i)); w_i = exp(w_div * w_cert / tau), 0 when excluded (`roid_weights`);
  pi_bar <- momentum pi_bar + (1 - momentum) mean_B p (after the weights, over all B samples);
  loss = sum_i w_i SLR_i / B with SLR_i = -sum_c q log(q / (1 - q) + eps), q = clamp(p, max=clip).
`weighting=False` gives the plain SLR mean. pi_bar starts uniform and `reset()` puts it back.
Option `batch_size`: divide by the configured batch size instead of the batch's own (the reference's reading; the
two differ only on a partial last batch). Default: the batch's own size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_modules.losses.base import LossOutput
from lightning_modules.losses.functional import roid_weights, soft_likelihood_ratio, update_class_probs_ema


class SoftLikelihoodRatioLoss(nn.Module):
    def __init__(self, weighting: bool = True, temperature: float = 1 / 3, momentum: float = 0.9, clip: float = 0.99,
                 eps: float = 1e-5, batch_size: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.weighting, self.temperature, self.momentum = weighting, temperature, momentum
        self.clip, self.eps = clip, eps
        self.register_buffer("class_probs_ema", torch.empty(0))
        self.last_weights: Tensor | None = None  # for the weights' histogram

    def reset(self) -> None:
        self.class_probs_ema = torch.empty(0, device=self.class_probs_ema.device)

    def forward(self, logits: Tensor) -> LossOutput:
        """logits (B, C)."""
        b, c = logits.shape
        if self.class_probs_ema.numel() != c:
            self.class_probs_ema = torch.full((c,), 1 / c, device=logits.device)
        slr = soft_likelihood_ratio(logits, self.clip, self.eps)  # (B,)
        if self.weighting:
            weights, keep = roid_weights(logits, self.class_probs_ema, self.temperature)
        else:
            weights, keep = torch.ones_like(slr), torch.ones_like(slr, dtype=torch.bool)
        self.class_probs_ema = update_class_probs_ema(self.class_probs_ema, logits, self.momentum)
        self.last_weights = weights
        loss = (weights * slr).sum() / (self.batch_size or b)
        return LossOutput(loss, {"kept_fraction": keep.float().mean(), "slr": slr.detach().mean()})
