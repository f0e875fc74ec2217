"""WeightedSFTModule: fine-tune the policy on (prompt, response, weight) batches with an injected loss.

The loss is a constructor argument (`class_path` in YAML): it receives per-token NLL (B, T), the target
mask (B, T) and the per-sample weights (B,), and returns a `LossOutput`. The default is `WeightedNLL`.
Checkpoints hold only the trainable tensors (adapter or norm gains) and loss-module buffers; the frozen base
model is rebuilt from the config. At the end of `fit` the adapter is also exported in peft's own format
(`<checkpoint dir>/adapter/`), or as `trainable.safetensors` for norm/all adaptation.
Finite training (`guard.py`): an update whose gradients are not finite (a non-finite loss gives such gradients)
is skipped and counted (`train/skipped_steps`), `max_nonfinite_steps` in a row stop the run with the likely
cause, and no checkpoint or adapter is ever written with a non-finite value.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_modules.checkpointing import TrainableStateMixin, save_config_hyperparameters
from lightning_modules.guard import FiniteGuard
from lightning_modules.losses.base import SFTLoss, check_loss
from lightning_modules.losses.functional import IGNORE_INDEX
from lightning_modules.losses.weighted_nll import WeightedNLL
from lightning_modules.policy import Policy


class WeightedSFTModule(TrainableStateMixin, L.LightningModule):
    """Weighted supervised fine-tuning.

    Args:
        policy: the model and what it adapts.
        loss: `(token_nll, mask, weight) -> LossOutput`; default `WeightedNLL(reduction="sample")`.
        optimizer: optimizer factory over the trainable parameters (AdamW by default).
        lr_scheduler: optional scheduler factory, stepped every optimizer step.
        log_samples_every_n_steps: how often a decoded training sample goes to TensorBoard as text.
        export_adapter: write the adapter in peft's format next to the checkpoints when fit ends.
        max_nonfinite_steps: skipped non-finite updates in a row before the run stops with an error.
    """

    def __init__(
        self,
        policy: Policy,
        loss: SFTLoss | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        log_samples_every_n_steps: int = 100,
        export_adapter: bool = True,
        max_nonfinite_steps: int = 5,
    ) -> None:
        super().__init__()
        save_config_hyperparameters(self)
        self.guard = FiniteGuard(max_nonfinite_steps)
        self._stepped = False
        self.policy = policy
        self.loss = check_loss(loss, SFTLoss, "WeightedSFTModule") if loss is not None else WeightedNLL()
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.log_samples_every_n_steps, self.export_adapter = log_samples_every_n_steps, export_adapter
        self._last_batch_end: float | None = None

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        token_nll = self.policy.token_nll(batch["input_ids"], batch["attention_mask"], batch["labels"])  # (B, T)
        out = self.loss(token_nll, batch["labels"] != IGNORE_INDEX, batch["weight"])
        batch_size = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", out.loss, prog_bar=True, batch_size=batch_size, sync_dist=stage != "train")
        for name, value in out.metrics.items():
            self.log(f"{stage}/{name}", value, batch_size=batch_size, sync_dist=stage != "train")
        return out.loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        first_micro_batch = batch_idx % self.trainer.accumulate_grad_batches == 0
        if self.global_step % self.log_samples_every_n_steps == 0 and first_micro_batch:
            self._log_sample(batch)
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def on_train_batch_end(self, outputs, batch: dict[str, Tensor], batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_batch_end is not None:
            tokens = batch["attention_mask"].sum().item()
            self.log("train/tokens_per_s", tokens / (now - self._last_batch_end), batch_size=1)
        self._last_batch_end = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        if self._stepped:  # the optimizer stepped on this batch: its result must be finite
            self.guard.updated(self.policy.named_parameters(), self.global_step)
            self._stepped = False
        self.log("train/skipped_steps", float(self.guard.skipped), batch_size=1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # gradients are all-reduced by now, so every rank skips the same updates
        if not self.guard.grads_ok(self.policy.trainable_parameters(), self.global_step):
            return
        self._stepped = True
        grads = [p.grad for p in self.policy.trainable_parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])), batch_size=1)

    def _log_sample(self, batch: dict[str, Tensor]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        ids = ids[batch["attention_mask"][0].bool()]
        target = labels[labels != IGNORE_INDEX]
        prompt = ids[: len(ids) - len(target)]
        tok = self.policy.tokenizer
        text = f"**prompt** (no loss):\n\n    {tok.decode(prompt)!r}\n\n**target**:\n\n    {tok.decode(target)!r}"
        experiment.add_text("train/sample", text, self.global_step)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.policy.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_fit_end(self) -> None:
        if not self.export_adapter or not self.trainer.is_global_zero:
            return
        callback = self.trainer.checkpoint_callback
        root = callback.dirpath if callback is not None and callback.dirpath else self.trainer.log_dir or "."
        self.export_trainable(Path(root) / "adapter")
