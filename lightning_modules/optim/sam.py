"""Sharpness-aware minimisation (SAM, Foret et al. 2021), as SAR uses it.

first_step: e = rho * g / (||g||_2 + 1e-12) with ONE global norm over every parameter with a gradient
(`adaptive=True`: ASAM, e = rho * w^2 g / (||w g|| + 1e-12)); the weights move to w + e, the old ones are kept.
second_step: the weights go back to w, then the base optimizer steps with the gradient taken at w + e.
`step(closure)` does both from the gradient already computed (the usual SAM protocol, so it runs through
Lightning's optimizer wrapper); `restore()` undoes a first step without an update.
The state dict is the base optimizer's (momentum buffers included), so a reset can restore it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SAM(torch.optim.Optimizer):
    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD, rho: float = 0.05,
                 adaptive: bool = False, **base_kwargs) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: lr schedules reach both
        self._saved: dict[torch.Tensor, torch.Tensor] = {}

    def _with_grad(self):
        return [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        pairs = self._with_grad()
        scaled = [(p.abs() if g["adaptive"] else 1.0) * p.grad for g, p in pairs]
        norm = torch.linalg.vector_norm(torch.stack([s.norm() for s in scaled])) if scaled else torch.tensor(0.0)
        for (group, p), s in zip(pairs, scaled):
            self._saved[p] = p.detach().clone()
            scale = group["rho"] / (norm + 1e-12)  # a tensor, in the reference's order of operations
            p.add_(s * (p.abs() if group["adaptive"] else 1.0) * scale.to(p))  # adaptive: w^2 g
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        for p, old in self._saved.items():
            p.copy_(old)
        self._saved.clear()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor | None] | None = None):
        """The full update, from the gradient already in `.grad`: first step, then `closure` recomputes the
        loss and its gradient at the perturbed weights, then the second step. A closure returning None means
        "nothing to learn at the perturbed point": the first step is undone and no update is made."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and calls backward")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            self.restore()
        else:
            self.second_step()
        return loss

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
