"""Every shipped YAML parses and instantiates (model, data, trainer) with the tiny model."""

from pathlib import Path

import pytest

from lightning_modules.cli import build_cli

ROOT = Path(__file__).parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "data" not in p.parts)


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_instantiates(config, tiny_model_dir, tmp_path, monkeypatch):
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# labelfree "), "each config starts with the command that runs it"
    monkeypatch.chdir(ROOT)
    cli = build_cli(
        ["-c", str(config), f"--model.init_args.policy.init_args.model={tiny_model_dir}",
         f"--trainer.logger.init_args.save_dir={tmp_path}"],
        run=False,
    )
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    assert cli.datamodule.hparams.tokenizer == tiny_model_dir  # linked from the policy
