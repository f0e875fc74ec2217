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

import inspect
import random
import time
from collections import OrderedDict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

from lightning_modules.distributed import gather_objects
from lightning_modules.guard import FiniteGuard, check_finite
from lightning_modules.losses.functional import IGNORE_INDEX
from lightning_modules.losses.weighted_nll import WeightedNLL
from lightning_modules.policy import Policy


def save_config_hyperparameters(module: L.LightningModule) -> None:
    """Under LightningCLI the hparams are the config (class paths + init args), which lets `load_from_checkpoint`
    rebuild the policy; built from Python, the policy and loss objects are not pickled into checkpoints."""
    from_cli = _given_hyperparameters.get() is not None
    caller = inspect.currentframe().f_back  # the module's __init__
    module.save_hyperparameters(ignore=[] if from_cli else ["policy", "loss", "method"], frame=caller)


def adapter_differences(saved: dict, ours: dict, shown: int = 3) -> list[str]:
    """What differs between a checkpoint's `Policy.adapter_shape()` and this run's, in a few words each."""
    out = []
    for key in ("adapt", "lora"):
        if saved.get(key) != ours.get(key):
            out.append(f"{key} is {saved.get(key)!r} in the checkpoint, {ours.get(key)!r} here")
    theirs, mine = saved["trainable"], ours["trainable"]
    only_saved, only_ours = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
    shapes = [n for n in sorted(set(theirs) & set(mine)) if theirs[n] != mine[n]]
    if only_saved:
        out.append(f"{len(only_saved)} trained tensors only in the checkpoint (e.g. {', '.join(only_saved[:shown])})")
    if only_ours:
        out.append(f"{len(only_ours)} trainable tensors only here (e.g. {', '.join(only_ours[:shown])})")
    if shapes:
        out.append(f"{len(shapes)} tensors of another shape (e.g. {shapes[0]}: {theirs[shapes[0]]} in the checkpoint, "
                   f"{mine[shapes[0]]} here)")
    return out


class TrainableStateMixin:
    """Checkpoint only what trains: parameters with requires_grad and buffers outside the policy, never a
    non-finite value, and the base model's identity (its name and the content hash of its frozen weights): loading
    a checkpoint onto another base model is refused with both names.

    Resuming (`fit --ckpt_path`) goes on as if the run had never stopped: besides the weights, the optimizer and
    Lightning's loops (the data position is the loader's, `datamodules.collate.ResumableDataLoader`), each process
    writes its `run_state()` (the global random state, which dropout draws from, plus what a module adds: RL's
    sampling generator, TTA's method state and outcomes) and gets it back on the same number of processes."""

    strict_loading = False
    _pending_rng: dict | None = None

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + n for n, p in self.named_parameters() if p.requires_grad}
        keep |= {prefix + n for n, _ in self.named_buffers() if not n.startswith("policy.")}
        return OrderedDict((k, v) for k, v in full.items() if k in keep)

    def run_state(self) -> dict:
        """This process's state that the weights, the optimizer and the loops do not hold."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": rng}

    def load_run_state(self, state: dict) -> None:
        self._pending_rng = state["rng"]  # set when the first resumed batch starts: the loader draws from it before

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        check_finite(checkpoint["state_dict"].items(), "a checkpoint")
        checkpoint["labelfree"] = {"base_model": self.policy.name, "base_fingerprint": self.policy.base_fingerprint(),
                                   "adapter": self.policy.adapter_shape(), "ranks": gather_objects(self.run_state())}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("labelfree")
        if saved is not None and saved.get("adapter") is not None:
            differences = adapter_differences(saved["adapter"], self.policy.adapter_shape())
            if differences:
                raise ValueError("the checkpoint's adapter has another shape than this run's (the base model is not "
                                 "compared until the adapters match): " + "; ".join(differences)
                                 + ". Give this run the checkpoint's adapter settings (policy.adapt, policy.lora).")
        if saved is not None and saved["base_fingerprint"] != self.policy.base_fingerprint():
            raise ValueError(
                f"the checkpoint was trained on base model {saved['base_model']!r} (weights "
                f"{saved['base_fingerprint'][:12]}), this run's base model is {self.policy.name!r} (weights "
                f"{self.policy.base_fingerprint()[:12]}): an adapter only fits the base model it was trained on")
        ranks = (saved or {}).get("ranks")
        if ranks is None or self._trainer is None or self.trainer.state.fn != "fit":
            return  # loading weights to evaluate: any number of processes
        if len(ranks) != self.trainer.world_size:
            raise ValueError(
                f"the checkpoint was written by {len(ranks)} process(es), this run has {self.trainer.world_size}: "
                f"resume with --trainer.devices={len(ranks)} (on another number of processes the run would see other "
                "batches and lose each process's state)")
        self.load_run_state(ranks[self.global_rank])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._pending_rng is not None:
            torch.set_rng_state(self._pending_rng["torch"])
            random.setstate(self._pending_rng["python"])
            if "cuda" in self._pending_rng:
                torch.cuda.set_rng_state_all(self._pending_rng["cuda"])
            self._pending_rng = None

    def export_trainable(self, directory: Path) -> Path:
        """The adapter in peft's format (LoRA), else the trainable tensors as `trainable.safetensors`."""
        from safetensors.torch import save_file

        policy: Policy = self.policy
        check_finite(((n, p) for n, p in policy.model.named_parameters() if p.requires_grad), "the adapter")
        directory.mkdir(parents=True, exist_ok=True)
        if policy.adapt == "lora":
            policy.model.save_pretrained(directory)
        else:
            tensors = {n: p.detach().contiguous().cpu() for n, p in policy.model.named_parameters() if p.requires_grad}
            save_file(tensors, directory / "trainable.safetensors")
        return directory


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
        loss: nn.Module | None = None,
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
        self.loss = loss if loss is not None else WeightedNLL()
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
