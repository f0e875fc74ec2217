"""WeightEnsembling (ROID): after each optimizer step pull the adapted parameters toward the source model,
theta <- m theta + (1 - m) theta_src, m = 0.99.

With LoRA the source is B = 0, so this is B <- m B (A untouched), which shrinks the adapter's update
B A by exactly m. Norm gains and full fine-tuning keep a snapshot of the source values of what adapts.
"""

from __future__ import annotations

import lightning as L
import torch


class WeightEnsembling(L.Callback):
    def __init__(self, momentum: float = 0.99) -> None:
        self.momentum = momentum
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._lora = pl_module.policy.adapt == "lora"
        self._source = {} if self._lora else {
            n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad
        }
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # no optimizer step this batch
            return
        self._last_step = trainer.global_step
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            if self._lora:
                if "lora_B" in name:
                    p.mul_(self.momentum)
            else:
                p.mul_(self.momentum).add_(self._source[name], alpha=1 - self.momentum)
