"""Every shipped YAML instantiates (model, data, trainer) with the tiny model, composed as its first line says."""

from pathlib import Path

import pytest

from lightning_modules.cli import build_cli, recipe_configs

ROOT = Path(__file__).parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "data" not in p.relative_to(ROOT / "configs").parts)


def command_configs(config: Path) -> list[str]:
    """The `-c` files of the command on the config's first line (`# labelfree <subcommand> -c ... -c ...`)."""
    assert config.read_text().startswith("# labelfree "), f"{config}: the first line must be the command that runs it"
    files = [str(f.relative_to(ROOT)) for f in recipe_configs(config)]
    assert files and all((ROOT / f).is_file() for f in files), f"{config}: its command names files that do not exist"
    assert str(config.relative_to(ROOT)) in files, f"{config}: its own command must use it"
    return files


def test_every_config_the_docs_name_exists_and_every_recipe_is_documented():
    """A path in the README or a page (`configs/rl/{rlc,ttrl}.yaml` expanded) is a file; every recipe's name is
    in the README or a page."""
    import itertools
    import re

    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))])
    named = set()
    for path in re.findall(r"configs/[\w/{},.]+?\.yaml", text):
        parts = [part.split(",") for part in re.split(r"[{}]", path)]  # alternate fixed text and choices
        named |= {"".join(choice) for choice in itertools.product(*parts)}
    assert named and all((ROOT / p).is_file() for p in named), sorted(p for p in named if not (ROOT / p).is_file())
    undocumented = [str(c.relative_to(ROOT)) for c in CONFIGS if not re.search(rf"\b{re.escape(c.stem)}\b", text)]
    assert not undocumented, undocumented


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_instantiates(config, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [a for f in command_configs(config) for a in ("-c", f)]
    cli = build_cli(
        [*args, f"--model.init_args.policy.init_args.model={tiny_model_dir}",
         f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.accelerator=cpu"],
        run=False,
    )
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None
    assert cli.datamodule.hparams.tokenizer == tiny_model_dir  # linked from the policy
