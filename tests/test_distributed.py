"""Every pipeline's recipe under Lightning's DDP (`--trainer.strategy=ddp --trainer.devices=2`, gloo on CPU), as a
user scales up; self-training's is in test_self_generated.py. Each rank's part of the run is read back from the
checkpoint, which holds every process's state."""

from pathlib import Path

import pytest
import torch
from tiny import run_labelfree

from lightning_modules.cli import build_cli

pytestmark = pytest.mark.slow  # each run starts processes
ROOT = Path(__file__).parents[1]
DDP = ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")


def _fit(config: str, tiny_model_dir: str, save_dir: Path, *extra: str) -> dict:
    """Fits in new processes and returns the last checkpoint."""
    run_labelfree("fit", "-c", config, f"--model.init_args.policy.init_args.model={tiny_model_dir}",
                  f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.enable_progress_bar=false",
                  *extra, cwd=ROOT)
    return torch.load(max(save_dir.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime), weights_only=True)


def test_sft_trains_and_resumes_under_ddp(tiny_model_dir, tmp_path):
    extra = (*DDP, f"--data.init_args.train_file={ROOT / 'configs' / 'data' / 'arithmetic_sft.jsonl'}",
             "--trainer.limit_val_batches=0", "--trainer.callbacks.every_n_train_steps=1")
    first = _fit("configs/sft.yaml", tiny_model_dir, tmp_path, *extra, "--trainer.max_steps=2")
    assert first["global_step"] == 2 and len(first["labelfree"]["ranks"]) == 2
    resumed = _fit("configs/sft.yaml", tiny_model_dir, tmp_path, *extra, "--trainer.max_steps=4", "--ckpt_path=last")
    assert resumed["global_step"] == 4
    assert resumed["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_done"] == 4  # per rank


def test_a_tta_stream_under_ddp_gives_each_rank_every_other_batch(tiny_model_dir, tmp_path):
    """Without adaptation, the two ranks' outcomes interleaved by batch are one process's; the accuracy logged
    counts both ranks' items."""
    args = ["-c", "configs/tta/tent.yaml", "--data.init_args.tasks=datamodules.tasks.Comparison",
            "--data.init_args.num_questions=16", "--data.init_args.batch_size=4",
            "--model.init_args.method=lightning_modules.tta.NoAdaptation"]
    one = build_cli(["fit", *args, f"--model.init_args.policy.init_args.model={tiny_model_dir}",
                     f"--trainer.logger.init_args.save_dir={tmp_path / 'one'}", "--trainer.enable_progress_bar=false"])
    two = _fit(args[1], tiny_model_dir, tmp_path / "two", *args[2:], *DDP)
    ranks = [state["outcomes"] for state in two["labelfree"]["ranks"]]
    interleaved = [x for b in range(2) for rank in ranks for x in rank[4 * b : 4 * b + 4]]
    assert len(one.model.outcomes) == 16 and interleaved == one.model.outcomes


def test_online_rl_steps_under_ddp_with_one_sampling_stream_per_rank(tiny_model_dir, tmp_path):
    """Each rank samples its own prompts' groups (a group never straddles ranks) from its own generator."""
    checkpoint = _fit("configs/rl/ttrl.yaml", tiny_model_dir, tmp_path, *DDP, "--trainer.max_steps=2",
                      "--model.init_args.max_new_tokens=6", "--data.init_args.num_questions=8",
                      "--data.init_args.batch_size=2")
    assert checkpoint["global_step"] == 2
    generators = [state["generator"] for state in checkpoint["labelfree"]["ranks"]]
    assert len(generators) == 2 and not torch.equal(*generators)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
