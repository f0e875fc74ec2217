"""Finite training: no update from a non-finite loss or gradient, and no non-finite model written.

- A non-finite loss or gradient skips that update (counted, logged as `<stage>/skipped_steps`); after
  `max_consecutive` skips in a row the run stops with `NonFiniteTrainingError` naming the step and the likely
  causes. A finite update resets the count.
- A trainable weight that an update made non-finite stops the run at once: it can only come from the update
  (a learning rate too high), and every later step would be skipped.
- `check_finite` is what checkpoint and adapter writers call: nothing non-finite is ever written.
Used by SFT and RL; test-time adaptation skips non-finite steps of a stream without a limit (a stream goes on).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lightning_modules.distributed import all_ranks

CAUSES = ("likely causes: a sample weight that overflows float32 (above 3.4e38), a learning rate too high, or "
          "float16 overflow; the last finite weights are kept and nothing non-finite is written")


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite values that skipping cannot cure."""


def check_finite(tensors: Iterable[tuple[str, Tensor]], what: str) -> None:
    """Raise `NonFiniteTrainingError` naming the first tensor with a NaN or infinite value."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteTrainingError(f"refusing to write {what}: {name} holds non-finite values ({CAUSES})")


class FiniteGuard:
    """Args:
        max_consecutive: non-finite updates in a row before the run stops.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped, self.in_a_row = 0, 0

    def loss_ok(self, loss: Tensor, step: int) -> bool:
        """Whether the loss is finite on every rank (a rank that skips alone would stall the others' all-reduce)."""
        return all_ranks(torch.isfinite(loss).all()) or self._skip("loss", step)

    def grads_ok(self, params: Iterable[nn.Parameter], step: int) -> bool:
        """Whether every gradient is finite; if not, the gradients are dropped so that the step changes nothing."""
        params = [p for p in params if p.grad is not None]
        if all(torch.isfinite(p.grad).all() for p in params):
            return True
        for p in params:
            p.grad = None
        return self._skip("gradient", step)

    def updated(self, named_params: Iterable[tuple[str, nn.Parameter]], step: int) -> None:
        """After an optimizer step: the weights must still be finite."""
        for name, p in named_params:
            if p.requires_grad and not torch.isfinite(p).all():
                raise NonFiniteTrainingError(
                    f"step {step}: the update made {name} non-finite although its loss and gradients were finite: "
                    "the learning rate is too high for this model (nothing non-finite is written)")
        self.in_a_row = 0

    def _skip(self, what: str, step: int) -> bool:
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"step {step}: {self.in_a_row} non-finite {what} values in a row ({self.skipped} skipped in all); "
                f"{CAUSES}")
        return False
