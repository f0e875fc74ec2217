"""`labelfree` command: LightningCLI over any LightningModule / LightningDataModule given by `class_path`.

Defaults: TensorBoard logs under `runs/<name>/version_N/` with the resolved `config.yaml` beside them.
The data side's tokenizer is linked to the policy's model, so a config names the model once.
`--ckpt_path last` resumes from the newest `version_*/checkpoints/last.ckpt` of the run's logger directory
(`save_dir/name`) and keeps logging into that version; Lightning alone would look in the new version's empty
directory and start from scratch.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI


class LabelfreeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.policy.init_args.model", "data.init_args.tokenizer", apply_on="parse")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else None
        if config is None or config.get("ckpt_path") != "last":
            return
        logger = config.trainer.logger
        init = getattr(logger, "init_args", None)
        if init is None or init.get("save_dir") is None:
            return
        runs = Path(init.save_dir) / (init.get("name") or "lightning_logs")
        found = sorted(runs.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"--ckpt_path last: no checkpoint under {runs}/version_*/checkpoints/last.ckpt")
        config.ckpt_path = str(found[-1])
        init.version = found[-1].parent.parent.name


def build_cli(args: list[str] | None = None, run: bool = True) -> LabelfreeCLI:
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
    build_cli()


if __name__ == "__main__":
    main()
