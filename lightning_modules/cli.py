"""`labelfree` command: LightningCLI over any LightningModule / LightningDataModule given by `class_path`.

Defaults: TensorBoard logs under `runs/<name>/version_N/` with the resolved `config.yaml` beside them.
The data side's tokenizer is linked to the policy's model, so a config names the model once.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


class LabelfreeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.policy.init_args.model", "data.init_args.tokenizer", apply_on="parse")


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
