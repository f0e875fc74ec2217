"""ROID (Marsden, Döbler, Yang, WACV 2024; reference mariodoebler/test-time-adaptation, roid.py; SPEC §5.2), at
the label level, in one place: its loss, its class-prior EMA, its weight ensembling and its prior correction.

Per batch of B samples with label distributions p_i:
  weights (no gradient): w_div = minmax(1 - cos(pi_bar, p_i)), samples with w_div < mean(w_div) excluded;
  w_cert = minmax(-H(p_i)); w_i = exp(w_div * w_cert / tau), 0 when excluded (`roid_weights`);
  pi_bar <- momentum pi_bar + (1 - momentum) mean_B p (after the weights, over all B samples; starts uniform);
  loss = sum_i w_i SLR_i / B with SLR_i = -sum_c q log(q / (1 - q) + eps), q = clamp(p, max=clip);
  after each step, weight ensembling: theta <- m theta + (1 - m) theta_src, m = `momentum_src` (0.99). With LoRA
  the source B is 0, so B <- m B, and A is left alone: the adapter's update B A shrinks by exactly m.
Predictions: `prior_correction` (default on, as the reference) with prior = mean_B p, s = max(1/B, 1/C) / max(prior),
pi~ = (prior + s) / (1 + s C), applied to the logits (`prior_correction_on: logits`, the reference) or to the
probabilities (`probabilities`: p x pi~ renormalised; the two differed in 196 of 3,200 predictions in one check).
Options: `weighting: false` gives the plain SLR mean; `batch_size`: divide by the configured batch size instead of
the batch's own (the reference's reading; the two differ only on a partial last batch); `consistency: true` adds
the reference's consistency term, sum_i w_i SCE(view_i, p_i) / B over the kept items, SCE the symmetric
cross-entropy (alpha 0.5) with the item under a text view instead of an image augmentation: its options rotated
and mapped back, or its exemplars reversed (`StreamDataModule._view`). Off by default: the reference's
augmentations are image transforms, and a text view is our choice.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_modules.losses.functional import (
    prior_correction,
    roid_weights,
    soft_likelihood_ratio,
    symmetric_cross_entropy,
    update_class_probs_ema,
)
from lightning_modules.tta.base import TTAMethod


class ROID(TTAMethod):
    levels = ("label",)

    def __init__(self, weighting: bool = True, temperature: float = 1 / 3, momentum_probs: float = 0.9,
                 clip: float = 0.99, eps: float = 1e-5, batch_size: int | None = None, momentum_src: float = 0.99,
                 prior_correction: bool = True,
                 prior_correction_on: Literal["logits", "probabilities"] = "logits", consistency: bool = False,
                 alpha: float = 0.5) -> None:
        super().__init__()
        self.consistency, self.alpha, self.needs_views = consistency, alpha, consistency
        self.weighting, self.temperature, self.momentum_probs = weighting, temperature, momentum_probs
        self.clip, self.eps, self.batch_size, self.momentum_src = clip, eps, batch_size, momentum_src
        self.prior_correction, self.prior_correction_on = prior_correction, prior_correction_on
        self.class_probs_ema = torch.empty(0)  # pi_bar; empty = uniform at the next batch

    def loss(self, logits: Tensor, view_logits: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted SLR of a batch (B, C), plus the consistency term with `view_logits` (B, C); updates pi_bar."""
        b, c = logits.shape
        if self.class_probs_ema.numel() != c:
            self.class_probs_ema = torch.full((c,), 1 / c, device=logits.device)
        self.class_probs_ema = self.class_probs_ema.to(logits.device)  # a resumed prior arrives on the CPU
        slr = soft_likelihood_ratio(logits, self.clip, self.eps)  # (B,)
        if self.weighting:
            weights, keep = roid_weights(logits, self.class_probs_ema, self.temperature)
        else:
            weights, keep = torch.ones_like(slr), torch.ones_like(slr, dtype=torch.bool)
        self.class_probs_ema = update_class_probs_ema(self.class_probs_ema, logits, self.momentum_probs)
        loss = (weights * slr).sum() / (self.batch_size or b)
        metrics = {"kept_fraction": keep.float().mean(), "slr": slr.detach().mean(), "weights": weights.detach()}
        if view_logits is not None:
            sce = symmetric_cross_entropy(view_logits, logits, self.alpha)  # (B,)
            loss = loss + (sce * weights)[keep].sum() / (self.batch_size or b)
            metrics["consistency"] = sce.detach().mean()
        return loss, metrics

    def adapt(self, view, optimizer) -> tuple[Tensor, dict[str, Tensor]]:
        logits = view.logits()
        loss, metrics = self.loss(logits, view.view_logits() if self.consistency else None)
        if self.step(loss, optimizer):
            self.ensemble()
        return logits.detach(), {"loss": loss.detach(), **metrics}

    @torch.no_grad()
    def ensemble(self) -> None:
        m = self.momentum_src
        for name, p in self.adapted.items():
            if "lora_A" not in name:  # LoRA's A has no source value to return to; its B's source is 0
                p.mul_(m).add_(self.source[name], alpha=1 - m)

    def decide(self, logits: Tensor) -> Tensor:
        if not self.prior_correction:
            return logits.argmax(-1)
        if self.prior_correction_on == "logits":
            return prior_correction(logits, on_logits=True).argmax(-1)
        return prior_correction(logits.softmax(-1)).argmax(-1)

    def reset_state(self) -> None:
        self.class_probs_ema = torch.empty(0, device=self.class_probs_ema.device)

    def run_state(self) -> dict:
        return super().run_state() | {"class_probs_ema": self.class_probs_ema.cpu()}

    def load_run_state(self, state: dict) -> None:
        super().load_run_state(state)
        self.class_probs_ema = state["class_probs_ema"]
