"""`labelfree` command: LightningCLI over any LightningModule / LightningDataModule given by `class_path`.

Defaults: TensorBoard logs under `runs/<name>/version_N/` with the resolved `config.yaml` beside them.
The data side's tokenizer is linked to the policy's model, so a config names the model once.

`--ckpt_path`, before anything is built:
- `last` is the newest `last.ckpt` under the `ModelCheckpoint(dirpath=...)` of the config, else under
  `version_*/checkpoints/` of the run's logger directory (`save_dir/name`), whose version keeps logging;
- the file must be a readable checkpoint (a truncated or foreign file is named, with what is wrong);
- `fit` resumes the checkpoint's run with the model settings saved in it; a model setting of the configs or the
  command line that differs from them is refused, each listed (a resume with other settings is another run);
  so `config.yaml` records what actually runs;
- `test`, `validate`, `predict` keep the command's own module (the eval recipe's `AnswerSamplingModule`) and take
  the checkpoint's policy (base model, adaptation, LoRA settings) into it; the trained tensors are then loaded;
- every module refuses a checkpoint of another base model (`checkpointing.TrainableStateMixin.on_load_checkpoint`).

Signals: a run stopped by SIGTERM (at the next batch, or during self-training generation at the next chunk, the
chunks written so far cached) exits with status 143, and by SIGINT (Ctrl-C) with 1 (Lightning's), each after one
line saying which checkpoint was saved and how to resume (`StopNote`); Lightning alone exits 0 on SIGTERM, so
schedulers and `fit && test` chains would read success. Scripts that run fits themselves wrap them in
`exit_status_on_signal()`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import shlex
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_modules.progress import phase
from lightning_modules.storage import atomic_checkpoint_io, write_atomically

log = logging.getLogger(__name__)
# RL and TTA step by hand and checkpoint after each step: the state after the step is the one to resume from, which
# is what Lightning's warning about manual optimisation says it saves.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class CheckpointError(ValueError):
    """A `--ckpt_path` that cannot be used; the message names the file."""


def read_checkpoint(path: str) -> dict:
    """The checkpoint's contents (tensors on the CPU), or a `CheckpointError` saying what is wrong with the file.
    A whole checkpoint holding Python objects that a weights-only load refuses (one saved outside the CLI) reads
    as {}: nothing to compare, and Lightning loads it as usual."""
    if not Path(path).is_file():
        raise CheckpointError(f"--ckpt_path {path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:  # torch checkpoints are zip archives: CRCs catch a cut or bad file
            damaged = archive.testzip()
        if damaged is not None:
            raise zipfile.BadZipFile(f"member {damaged} is damaged")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            return {}
        raise CheckpointError(f"--ckpt_path {path}: not a readable checkpoint: {e}") from None
    except Exception as e:  # noqa: BLE001 - zipfile and torch raise many kinds for a bad file; all mean the same
        raise CheckpointError(f"--ckpt_path {path}: not a readable checkpoint (truncated, or not a checkpoint "
                              f"file): {type(e).__name__}: {e}") from None


SIGTERM_EXIT_STATUS = 128 + 15  # the shell's status for a process ended by SIGTERM


class StopNote(L.Callback):
    """On SIGTERM or SIGINT, one line on stderr: the checkpoint saved last and how to resume from it."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt):
            return
        name = "SIGTERM" if isinstance(exception, SIGTERMException) else "SIGINT"
        saved = [c.last_model_path or c.best_model_path for c in trainer.checkpoint_callbacks]
        saved = [p for p in saved if p and Path(p).is_file()]
        if saved:
            what = f"the last checkpoint is {saved[0]}: resume with the same command and --ckpt_path last"
        elif trainer.state.fn == "fit":
            what = "no checkpoint was written yet: a rerun starts over (cached candidates are reused)"
        else:
            what = f"nothing to resume: run `{trainer.state.fn}` again"
        if trainer.is_global_zero:
            print(f"labelfree: stopped by {name} at step {trainer.global_step}; {what}", file=sys.stderr, flush=True)


class PhaseReport(L.Callback):
    """Where the run's time went: the training loop is the phase "training"; the pipelines mark model load,
    fingerprint, generation, each signal, selection, evaluation and checkpoint writes (`progress.phase`; a phase
    inside another is named after both: "training/generation" for RL's rollouts). At the end of a fit or test:
    the seconds per phase logged as `time/<phase>`, written to `<log dir>/phases.json` (with a logger) and printed
    on one line (rank 0's figures)."""

    def on_train_start(self, trainer, pl_module) -> None:
        phase.enter("training")

    def on_train_end(self, trainer, pl_module) -> None:
        phase.exit("training")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        phase.stack.clear()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.report(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self.report(trainer)

    @staticmethod
    def report(trainer) -> None:
        seconds = phase.report()
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"time/{k}": v for k, v in seconds.items()}, step=trainer.global_step)
        log_dir = trainer.log_dir if trainer.logger is not None else None  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero:
            if log_dir is not None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                write_atomically(Path(log_dir) / "phases.json", json.dumps(seconds, indent=2))
            print("labelfree: time by phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
                  file=sys.stderr, flush=True)


@contextlib.contextmanager
def exit_status_on_signal() -> Iterator[None]:
    """Lightning ends a run stopped by SIGTERM with `SIGTERMException`, a `SystemExit` of status 0: make it 143."""
    try:
        yield
    except SIGTERMException:
        raise SystemExit(SIGTERM_EXIT_STATUS) from None


class LabelfreeCLI(LightningCLI):
    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        """Every trainer gets `StopNote`, `PhaseReport` and, unless a config names plugins, checkpoints written
        atomically."""
        if not config.get("plugins"):
            config = {**config, "plugins": [atomic_checkpoint_io()]}
        return super()._instantiate_trainer(config, [*callbacks, StopNote(), PhaseReport()])

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.policy.init_args.model", "data.init_args.tokenizer", apply_on="parse")

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is None or not config.get("ckpt_path"):
            return
        if config.ckpt_path == "last":
            config.ckpt_path = self._last_checkpoint(config)
        hparams = dict(read_checkpoint(config.ckpt_path).get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "init_args": hparams}
        if "class_path" not in hparams:  # saved outside the CLI: nothing to compare or take
            return
        if subcommand == "fit":
            asked = self._model_settings(subcommand)
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
            differences = _differences(asked, self._model_settings(subcommand), "model")
            if differences:
                raise CheckpointError(
                    f"--ckpt_path {config.ckpt_path} resumes a run with the settings saved in it; these differ:\n"
                    + "\n".join(f"  {key}: the checkpoint has {old!r}, the command asks {new!r}"
                                 for key, new, old in differences)
                    + "\nDrop them to resume, or start a new run without --ckpt_path.")
        else:
            policy = hparams.get("init_args", {}).get("policy")
            if policy is not None:
                asked = self._model_settings(subcommand)["init_args"]["policy"]
                model = {"class_path": config.model.class_path, "init_args": {"policy": policy}}
                self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
                taken = self._model_settings(subcommand)["init_args"]["policy"]
                for key, new, old in _differences(asked, taken, "policy"):
                    log.warning("--ckpt_path %s: %s is the checkpoint's %r, not %r", config.ckpt_path, key, old, new)

    def _model_settings(self, subcommand: str) -> dict:
        """The subcommand's `model` settings as plain data (what config.yaml would hold)."""
        dumped = self.parser.dump(self.config, skip_link_targets=False, format="yaml")
        return yaml.safe_load(dumped)[subcommand]["model"]

    @staticmethod
    def _last_checkpoint(config) -> str:
        """The newest `last.ckpt` of the run: in a `ModelCheckpoint(dirpath=...)` when the config has one, else in
        the logger's `version_*/checkpoints/`; that version is then the one logged into."""
        callbacks = config.trainer.get("callbacks") or []
        dirpaths = [c.init_args.get("dirpath") for c in callbacks
                    if str(c.get("class_path", "")).endswith("ModelCheckpoint") and c.init_args.get("dirpath")]
        if dirpaths:
            found = [Path(d) / "last.ckpt" for d in dirpaths if (Path(d) / "last.ckpt").is_file()]
            if not found:
                raise CheckpointError(f"--ckpt_path last: no last.ckpt in {', '.join(map(str, dirpaths))}")
            return str(max(found, key=lambda p: p.stat().st_mtime))
        init = getattr(config.trainer.logger, "init_args", None)
        if init is None or init.get("save_dir") is None:
            raise CheckpointError("--ckpt_path last needs a logger with a save_dir (or a ModelCheckpoint dirpath)")
        runs = Path(init.save_dir) / (init.get("name") or "lightning_logs")
        found = sorted(runs.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CheckpointError(f"--ckpt_path last: no checkpoint under {runs}/version_*/checkpoints/last.ckpt")
        init.version = found[-1].parent.parent.name
        return str(found[-1])


def _differences(asked, saved, key: str) -> list[tuple[str, object, object]]:
    """(dotted key, asked value, saved value) wherever two nested settings differ."""
    if isinstance(asked, dict) and isinstance(saved, dict):
        return [d for k in sorted(set(asked) | set(saved), key=str)
                for d in _differences(asked.get(k), saved.get(k), f"{key}.{k}")]
    return [] if asked == saved else [(key, asked, saved)]


def recipe_configs(config: str | Path) -> list[Path]:
    """The files that compose a recipe: the `-c` files of the command on its first line (`# labelfree fit -c
    configs/tta/base.yaml -c configs/tta/tlm.yaml`), relative to the directory that holds `configs/`."""
    config = Path(config).resolve()
    root = next((p.parent for p in config.parents if p.name == "configs"), Path.cwd())
    words = shlex.split(config.read_text().splitlines()[0].lstrip("# "))
    return [root / words[i + 1] for i, w in enumerate(words) if w in ("-c", "--config")]


def recipe_args(config: str | Path) -> list[str]:
    """`-c` arguments that build a recipe as its first line composes it."""
    return [a for f in recipe_configs(config) for a in ("-c", str(f))]


def build_cli(args: list[str] | None = None, run: bool = True) -> LabelfreeCLI:
    phase.reset()  # the run's phases start here: model load included
    return LabelfreeCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "labelfree"},
            },
        },
        args=args,
        run=run,
    )


def main() -> None:
    with exit_status_on_signal():
        build_cli()


if __name__ == "__main__":
    main()
