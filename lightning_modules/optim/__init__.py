"""Optimizers (SAM) and what the methods do to an optimizer's state."""


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
