"""ModelReset: put the adapted parameters, the optimizer state and the loss state back to where they started.

When: SAR's recovery rule (the loss module's `ema` below `ema_threshold`, 0.2 in the reference; or below
`relative` x the first EMA, for token-level use), every `every_n_steps` steps, or after every batch
(`episodic`). Only what adapts is snapshotted (LoRA weights or norm gains: never a copy of the frozen model),
and restoring is bit-exact. Each reset is logged (`tta/resets`) and its step kept in `reset_steps`.
Option `like_reference` (SAR's official code): the loss state (SAR's EMA) survives a reset, so resets repeat
while it stays low, and the base optimizer's momentum is left in place (its SAM `load_state_dict` restores only
the wrapper's). Default: the clean reset of weights, optimizer state and loss state.
"""

from __future__ import annotations

import copy

import lightning as L
import torch


class ModelReset(L.Callback):
    def __init__(self, ema_threshold: float | None = 0.2, relative: float | None = None,
                 every_n_steps: int | None = None, episodic: bool = False, like_reference: bool = False) -> None:
        self.ema_threshold, self.relative, self.like_reference = ema_threshold, relative, like_reference
        self.every_n_steps, self.episodic = every_n_steps, episodic
        self.reset_steps: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._params = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        self._optimizers = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]
        self._loss_state = copy.deepcopy(pl_module.loss.state_dict())
        self.reset_steps = []

    def should_reset(self, trainer, pl_module) -> bool:
        if self.episodic:
            return True
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            return True
        ema = getattr(pl_module.loss, "ema", None)
        if ema is None:
            return False
        if self.relative is not None:
            first = getattr(pl_module.loss, "first_ema", None)
            return first is not None and ema < self.relative * first
        return self.ema_threshold is not None and ema < self.ema_threshold

    @torch.no_grad()
    def reset(self, trainer, pl_module) -> None:
        params = dict(pl_module.named_parameters())
        for name, value in self._params.items():
            params[name].copy_(value)
        self.reset_steps.append(trainer.global_step)
        if self.like_reference:  # the EMA and the momentum buffers stay
            return
        for opt, state in zip(trainer.optimizers, self._optimizers):
            opt.load_state_dict(copy.deepcopy(state))
        if hasattr(pl_module.loss, "reset"):  # losses with state (ROID's pi_bar, SAR's EMA) know their start
            pl_module.loss.reset()
        else:
            pl_module.loss.load_state_dict(copy.deepcopy(self._loss_state))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.should_reset(trainer, pl_module):
            self.reset(trainer, pl_module)
            pl_module.log("tta/last_reset_step", float(trainer.global_step), batch_size=1)
        pl_module.log("tta/resets", float(len(self.reset_steps)), batch_size=1)
