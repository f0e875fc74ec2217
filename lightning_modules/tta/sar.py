"""SAR (Niu et al., ICLR 2023; official code mr-eggplant/SAR; SPEC §5.3): reliable entropy minimisation with a
sharpness-aware (SAM) step and a model reset.

Per batch: E_i = H(p_i); S1 = {i : E_i < E0}; loss1 = mean_S1 E, backward; SAM first step (the weights move to
w + e); second pass at w + e: S2 = {i in S1 : E'_i < E0}, loss2 = mean_S2 E'; ema <- loss2 (first) or
0.9 ema + 0.1 loss2; SAM second step (back to w, the base optimizer steps with the perturbed gradient). The
predictions reported are the first pass's. Reset when ema < `reset_below` (0.2, the reference) or, with
`relative`, when ema < relative x the first EMA. An empty S1 skips the update and an empty S2 undoes the first
step without an update (the reference produces NaN there).
- Label level: E0 = `margin_factor` ln C (0.4 ln C).
- Token level: E_i is answer i's mean token entropy; 0.4 ln|V| is vacuous (about 4.3 nats for 49k tokens), so
  E0 is the `percentile`-th percentile (50) of the batch's first-pass values: the more certain half adapts.
- `like_reference` (the official code): a reset restores the weights only; the EMA survives (resets then repeat
  while it stays low) and the base optimizer's momentum stays. Default: the clean reset of weights, optimizer
  state and EMA.
The optimizer must be `SAM` (`lightning_modules/optim/sam.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_modules.distributed import any_rank
from lightning_modules.optim import unwrap
from lightning_modules.optim.sam import SAM
from lightning_modules.tta.base import LEVELS, TTAMethod


def sar_adapt_step(compute_entropy: Callable[[], Tensor], optimizer, margin: float | Callable[[Tensor], float],
                   ema: float | None, ema_momentum: float = 0.9,
                   backward: Callable[[Tensor], None] = Tensor.backward) -> tuple[Tensor, float | None]:
    """One SAR update; returns the first pass's entropies (B,) detached and the new EMA. `compute_entropy` runs
    the model as it is now (B,); `margin` is E0, or a function of the first pass's entropies that gives it.
    `optimizer` is a `SAM` or Lightning's wrapper around one (its `step(closure)` advances the step count).
    Under several ranks a pass is skipped only when its set is empty on every rank; a rank whose set is empty
    while others' are not backpropagates a zero loss (the all-reduce needs every rank)."""
    optimizer.zero_grad()
    first = compute_entropy()  # (B,)
    e0 = margin(first.detach()) if callable(margin) else margin
    reliable = first < e0  # S1; NaN entropies are never reliable
    if not any_rank(reliable.any()):
        return first.detach(), ema
    backward(_masked_mean(first, reliable))
    state = {"ema": ema}

    def second_pass() -> Tensor | None:
        second = compute_entropy()  # (B,)
        reliable2 = reliable & (second < e0)  # S2 within S1
        if not any_rank(reliable2.any()):
            return None
        loss2 = _masked_mean(second, reliable2)
        value = loss2.item()
        if reliable2.any() and math.isfinite(value):
            state["ema"] = value if state["ema"] is None else ema_momentum * state["ema"] + (1 - ema_momentum) * value
        backward(loss2)
        return loss2

    optimizer.step(closure=second_pass)
    optimizer.zero_grad()
    return first.detach(), state["ema"]


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of `values[mask]`; 0 (with a zero gradient) when the mask is empty."""
    return values[mask].mean() if mask.any() else values[mask].sum()


class SAR(TTAMethod):
    levels = LEVELS

    def __init__(self, margin_factor: float = 0.4, percentile: float = 50.0, ema_momentum: float = 0.9,
                 reset_below: float | None = 0.2, relative: float | None = None,
                 like_reference: bool = False) -> None:
        super().__init__()
        self.margin_factor, self.percentile, self.ema_momentum = margin_factor, percentile, ema_momentum
        self.reset_below, self.relative, self.like_reference = reset_below, relative, like_reference
        self.ema: float | None = None
        self.first_ema: float | None = None  # for the relative reset rule

    def check(self, optimizer) -> None:
        if not isinstance(unwrap(optimizer), SAM):
            raise TypeError("SAR's update is two-pass: set the optimizer to lightning_modules.optim.sam.SAM "
                            "(the base optimizer's settings go under dict_kwargs)")

    def margin(self, view, first: Tensor) -> float:
        if view.level == "label":
            return self.margin_factor * math.log(view.num_classes)
        finite = first[torch.isfinite(first)]
        return torch.quantile(finite, self.percentile / 100).item() if len(finite) else -math.inf

    def adapt(self, view, optimizer) -> tuple[Tensor | None, dict[str, Tensor]]:
        margin = lambda first: self.margin(view, first)  # noqa: E731
        first, ema = sar_adapt_step(view.entropy, optimizer, margin, self.ema, self.ema_momentum, self.backward)
        self.update_ema(ema)
        metrics = {"kept_fraction": (first < margin(first)).float().mean(), "entropy": first.nanmean()}
        return view.predictions(), metrics

    def update_ema(self, ema: float | None) -> None:
        self.ema = ema
        if ema is not None and self.first_ema is None:
            self.first_ema = ema

    def should_reset(self) -> bool:
        if self.ema is None:
            return False
        if self.relative is not None:
            return self.first_ema is not None and self.ema < self.relative * self.first_ema
        return self.reset_below is not None and self.ema < self.reset_below

    @torch.no_grad()
    def reset(self, optimizer=None) -> None:
        if self.like_reference:  # the official SAR.reset: weights back; the EMA and the base momentum stay
            self.restore_source()
        else:
            super().reset(optimizer)

    def reset_state(self) -> None:
        self.ema = self.first_ema = None

    def run_state(self) -> dict:
        return super().run_state() | {"ema": self.ema, "first_ema": self.first_ema}

    def load_run_state(self, state: dict) -> None:
        super().load_run_state(state)
        self.ema, self.first_ema = state["ema"], state["first_ema"]
