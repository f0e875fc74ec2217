"""Checkpointing, for every module that trains a policy (SFT, RL, TTA, evaluation): what a checkpoint holds (only
the trainable tensors, the module's own buffers and each process's run state), the base model's identity, the
settings saved with it, the load check, and the adapter export.

- `TrainableStateMixin`: the checkpoint side of a module (see its docstring).
- `save_config_hyperparameters`: the hparams a checkpoint rebuilds the module from.
- Loading checks the keys: every trainable tensor of this run's policy must be in the checkpoint and the
  checkpoint may hold no policy tensor that does not train here (`load_state_dict`), after the adapter's shape
  and the base model's identity were compared, each with its own message.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections import OrderedDict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

from lightning_modules.distributed import gather_objects
from lightning_modules.guard import check_finite
from lightning_modules.policy import Policy

log = logging.getLogger(__name__)


def _plain(value) -> bool:
    """A value a checkpoint holds as data (loadable with `weights_only=True`)."""
    if isinstance(value, (list, tuple)):
        return all(map(_plain, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))


def save_config_hyperparameters(module: L.LightningModule) -> None:
    """Under LightningCLI the hparams are the config (class paths + init args), which lets `load_from_checkpoint`
    rebuild the policy; built from Python, only the plain arguments are kept: objects (the policy, a loss, rewards,
    an optimizer factory) are not pickled into checkpoints, which then load with `weights_only=True` (a resume)."""
    from_cli = _given_hyperparameters.get() is not None
    caller = inspect.currentframe().f_back  # the module's __init__
    given = {k: v for k, v in caller.f_locals.items() if k in inspect.signature(type(module).__init__).parameters}
    ignore = [] if from_cli else [k for k, v in given.items() if k != "self" and not _plain(v)]
    module.save_hyperparameters(ignore=ignore, frame=caller)


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

    _pending_rng: dict | None = None

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + n for n, p in self.named_parameters() if p.requires_grad}
        keep |= {prefix + n for n, _ in self.named_buffers() if not n.startswith("policy.")}
        return OrderedDict((k, v) for k, v in full.items() if k in keep)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads what `state_dict` saves, checked: the policy's tensors must be exactly this run's trainable ones
        (the frozen base is never saved, so a plain strict load cannot be used); the module's own buffers load
        where this module has them (a TTA method's state read back into an evaluation module is left out, said
        in the log). `strict` is accepted for Lightning's call and has no other effect."""
        ours = set(self.state_dict())
        policy_ours = {k for k in ours if k.startswith("policy.")}
        policy_theirs = {k for k in state_dict if k.startswith("policy.")}
        missing, unexpected = sorted(policy_ours - policy_theirs), sorted(policy_theirs - policy_ours)
        if missing or unexpected:
            raise ValueError(
                "the checkpoint's policy tensors are not this run's trainable tensors: "
                + "; ".join(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                            for keys, what in ((missing, "missing from the checkpoint"),
                                               (unexpected, "in the checkpoint but not trained here")) if keys))
        left_out = sorted(set(state_dict) - ours)
        if left_out:
            log.info("checkpoint tensors this module has no place for, not loaded: %s", ", ".join(left_out))
        return super().load_state_dict({k: v for k, v in state_dict.items() if k in ours}, strict=False,
                                       assign=assign)

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
