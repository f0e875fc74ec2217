"""A run killed midway and resumed with `--ckpt_path last` goes on as if it had never stopped: SFT (the random state
of dropout), online RL (data position, sampling generator) and test-time adaptation (stream position, the method's
state, the outcomes so far, resets to the source weights). The kill is a run stopped after N steps."""

from pathlib import Path

import pytest
import torch
from tiny import tiny_args

from lightning_modules.cli import build_cli

ROOT = Path(__file__).parents[1]


def _trainable(cli) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad}


def _fit(config: str, tiny_model_dir: str, save_dir: Path, *extra: str):
    return build_cli(["fit", *tiny_args(config, tiny_model_dir, save_dir, "--trainer.enable_model_summary=false",
                                        *extra)])


def _straight_and_resumed(config, tiny_model_dir, tmp_path, steps: list[str], cut: int, *extra):
    """(the uninterrupted run, the run stopped after `cut` steps and resumed) as CLIs."""
    straight = _fit(config, tiny_model_dir, tmp_path / "straight", *extra, *steps)
    _fit(config, tiny_model_dir, tmp_path / "cut", *extra, f"--trainer.max_steps={cut}")
    resumed = _fit(config, tiny_model_dir, tmp_path / "cut", *extra, *steps, "--ckpt_path=last")
    return straight, resumed


def test_a_resumed_sft_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_model_dir, tmp_path):
    """LoRA dropout draws from the global random state: without it in the checkpoint the weights differed by 1e-3."""
    data = str(ROOT / "configs" / "data" / "arithmetic_sft.jsonl")
    extra = (f"--data.init_args.train_file={data}", "--trainer.limit_val_batches=0",
             "--trainer.callbacks.every_n_train_steps=1", "--model.init_args.optimizer.init_args.lr=0.01")
    straight, resumed = _straight_and_resumed("configs/sft.yaml", tiny_model_dir, tmp_path,
                                              ["--trainer.max_steps=4"], 2, *extra)
    assert resumed.trainer.global_step == 4
    want, got = _trainable(straight), _trainable(resumed)
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_a_resumed_rl_run_draws_the_same_rollouts_as_an_uninterrupted_one(tiny_model_dir, tmp_path, monkeypatch):
    """Data position (the epoch boundary crossed after the resume) and the sampling generator come back."""
    from lightning_modules.rl import SelfRewardRLModule

    seen: list[tuple] = []
    original = SelfRewardRLModule.rollout

    def recording(self, batch):
        rollout = original(self, batch)
        seen.append((tuple(q.id for q in batch["questions"]), tuple(rollout.texts)))
        return rollout

    monkeypatch.setattr(SelfRewardRLModule, "rollout", recording)
    extra = ("--model.init_args.max_new_tokens=6", "--model.init_args.optimizer.init_args.lr=0.01",
             "--data.init_args.num_questions=6", "--data.init_args.batch_size=2")
    straight, resumed = _straight_and_resumed("configs/rl/ttrl.yaml", tiny_model_dir, tmp_path,
                                              ["--trainer.max_steps=5"], 2, *extra)
    assert len(seen) == 10 and seen[:5] == seen[5:]  # 5 uninterrupted, then 2 + 3 resumed
    assert len({ids for ids, _ in seen[:3]}) == 3  # the first epoch's three batches, none twice
    want, got = _trainable(straight), _trainable(resumed)
    assert all(torch.equal(want[n], got[n]) for n in want)


@pytest.mark.parametrize("recipe, extra", [
    ("roid", ()),  # class prior EMA, weight ensembling
    ("sar", ("--model.init_args.method.init_args.margin_factor=1.0",)),  # EMA; the tiny model is never confident
    ("em_ft", ("--data.init_args.tasks=datamodules.tasks.Arithmetic", "--model.init_args.max_new_tokens=5")),
], ids=["roid", "sar", "em_ft"])
def test_a_resumed_stream_goes_on_as_if_never_stopped(recipe, extra, tiny_model_dir, tmp_path):
    """Outcomes, predictions, the method's state (EMA, class prior, sampling generator), resets (`reset_every=2`:
    one after the resume, which must restore the source weights, not the checkpoint's) and the weights."""
    task = () if extra and "tasks" in extra[0] else ("--data.init_args.tasks=datamodules.tasks.Comparison",)
    args = (*task, *extra, "--data.init_args.num_questions=20", "--data.init_args.batch_size=4",
            "--model.init_args.reset_every=2")
    straight, resumed = _straight_and_resumed(f"configs/tta/{recipe}.yaml", tiny_model_dir, tmp_path, [], 3, *args)
    a, b = straight.model, resumed.model
    assert len(a.outcomes) == 20 and b.outcomes == a.outcomes and b.predicted == a.predicted
    assert b.source_outcomes == a.source_outcomes and b.reset_steps == a.reset_steps == [2, 4]
    assert repr(b.method.run_state()) == repr(a.method.run_state())
    assert b.online_accuracy.compute() == a.online_accuracy.compute()
    want, got = _trainable(straight), _trainable(resumed)
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_a_resume_on_another_number_of_processes_is_refused(tiny_model_dir, tmp_path):
    _fit("configs/tta/tent.yaml", tiny_model_dir, tmp_path, "--data.init_args.tasks=datamodules.tasks.Comparison",
         "--data.init_args.num_questions=8", "--data.init_args.batch_size=4", "--trainer.max_steps=1")
    last = next(tmp_path.rglob("last.ckpt"))
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["labelfree"]["ranks"] *= 2  # as if written by two processes
    torch.save(checkpoint, last)
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1: resume with "
                                         r"--trainer.devices=2"):
        _fit("configs/tta/tent.yaml", tiny_model_dir, tmp_path, "--data.init_args.tasks=datamodules.tasks.Comparison",
             "--data.init_args.num_questions=8", "--data.init_args.batch_size=4", "--ckpt_path=last")


def test_a_kill_while_selected_jsonl_is_written_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    import os

    from datamodules.io import write_atomically

    target = tmp_path / "selected.jsonl"
    write_atomically(target, '{"a": 1}\n')

    def killed(fd):  # the new bytes are written, then the process dies before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, '{"a": 2}\n{"b": 3}\n')
    monkeypatch.undo()
    assert target.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["selected.jsonl"]
