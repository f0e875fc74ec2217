"""Optimizers (SAM), what the methods do to an optimizer's state, and putting a run back to how it started."""

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def unwrap(optimizer):
    """The torch optimizer inside Lightning's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def clear_state(optimizer) -> None:
    """Forget the per-parameter state (momentum buffers) of the optimizer and of SAM's base optimizer: the state
    of a fresh optimizer, learning rates kept."""
    opt = unwrap(optimizer)
    for o in (opt, getattr(opt, "base_optimizer", None)):
        if o is not None:
            o.state.clear()


def trainable_values(module: nn.Module) -> dict[str, Tensor]:
    """A copy of the module's trainable parameters by name: what `restore` puts back."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore(parameters: Iterable[tuple[str, Tensor]], values: dict[str, Tensor], optimizers=()) -> None:
    """The named parameters (`module.named_parameters()`, a dict's items) that `values` holds back to those values
    (bit-exact), and the optimizers' state cleared: training goes on as from a fresh start, learning rates kept."""
    for name, p in parameters:
        if name in values:
            p.copy_(values[name])
    for optimizer in optimizers:
        clear_state(optimizer)
