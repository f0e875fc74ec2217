"""WeightedSFTModule through the `labelfree` CLI on the tiny model: training, checkpoints, resume, logs, plug-ins."""

import sys
import textwrap

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import ROOT

from lightning_modules.cli import CheckpointError, build_cli
from lightning_modules.sft import WeightedSFTModule

DATA = str(ROOT / "configs" / "data" / "arithmetic_sft.jsonl")


def run_cli(tiny_model_dir, tmp_path, *extra, subcommand="fit", config="configs/sft.yaml"):
    args = [
        subcommand, "-c", str(ROOT / config),
        f"--model.init_args.policy.init_args.model={tiny_model_dir}",
        f"--data.init_args.train_file={DATA}",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",  # the config's ModelCheckpoint
        "--trainer.callbacks.every_n_train_steps=1",
        *extra,
    ]
    return build_cli(args)


def _base_and_adapter(module):
    named = dict(module.policy.named_parameters())
    adapter = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in named.items() if not p.requires_grad}
    return base, adapter


@pytest.fixture
def fitted(tiny_model_dir, tmp_path):
    cli = run_cli(tiny_model_dir, tmp_path, "--model.init_args.optimizer.init_args.lr=0.01")
    return cli, tmp_path


def test_two_steps_change_adapter_only(tiny_model_dir, tmp_path):
    cli = run_cli(tiny_model_dir, tmp_path, "--trainer.max_steps=0")
    base0, adapter0 = _base_and_adapter(cli.model)
    cli = run_cli(tiny_model_dir, tmp_path / "b", "--model.init_args.optimizer.init_args.lr=0.01")
    base1, adapter1 = _base_and_adapter(cli.model)
    assert cli.trainer.global_step == 2
    assert all(torch.equal(base0[n], base1[n]) for n in base0)
    assert any("lora_B" in n and not torch.equal(adapter0[n], adapter1[n]) for n in adapter0)


def test_checkpoint_holds_only_trainable_tensors_and_reloads(fitted, tiny_model_dir):
    cli, tmp_path = fitted
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    trainable = {f"policy.{n}" for n, p in cli.model.policy.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    # the base model is rebuilt from the saved config, the adapter from the checkpoint
    reloaded = WeightedSFTModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt").eval()
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        want = cli.model.eval().policy.model(input_ids=ids).logits
        got = reloaded.policy.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    exported = tmp_path / "ckpt" / "adapter"
    assert (exported / "adapter_config.json").exists() and (exported / "adapter_model.safetensors").exists()


def test_resume_continues_step_count(fitted, tiny_model_dir):
    _, tmp_path = fitted
    cli = run_cli(tiny_model_dir, tmp_path, "--trainer.max_steps=4", f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}",
                  "--model.init_args.optimizer.init_args.lr=0.01")  # the run's own settings (others are refused)
    assert cli.trainer.global_step == 4
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_tensorboard_holds_scalars_and_sample_texts(tiny_model_dir, tmp_path):
    run_cli(tiny_model_dir, tmp_path, "--trainer.max_steps=3", "--trainer.log_every_n_steps=1")
    events = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "val/loss"} <= scalars
    texts = events.Tags()["tensors"]
    assert any(t.startswith("train/sample") for t in texts)
    losses = [e.value for e in events.Scalars("train/loss")]
    assert all(v == v and v > 0 for v in losses)  # finite and positive


def test_a_loss_from_the_users_own_module(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(textwrap.dedent('''
        import torch
        from lightning_modules.losses import LossOutput, SFTLoss

        class FocalishNLL(SFTLoss):
            """Down-weights tokens the model already predicts well."""
            def __init__(self, gamma: float = 1.0):
                super().__init__()
                self.gamma = gamma
                self.calls = 0

            def forward(self, token_nll, mask, weight):
                self.calls += 1
                p = torch.exp(-token_nll)
                loss = ((1 - p) ** self.gamma * token_nll * mask).sum() / mask.sum()
                return LossOutput(loss, {"focal": loss.detach()})
    '''))
    (tmp_path / "focal.yaml").write_text("model:\n  init_args:\n    loss:\n      class_path: my_losses.FocalishNLL\n"
                                         "      init_args:\n        gamma: 2.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = run_cli(tiny_model_dir, tmp_path, "-c", str(tmp_path / "focal.yaml"), "--trainer.log_every_n_steps=1")
    assert type(cli.model.loss).__name__ == "FocalishNLL" and cli.model.loss.gamma == 2.0
    assert cli.model.loss.calls >= 2
    assert "train/focal" in cli.trainer.logged_metrics
    sys.modules.pop("my_losses", None)


class RecordBatches(__import__("lightning").Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(tuple(batch["input_ids"].sum(-1).tolist()))


def test_interrupted_run_sees_the_same_batches_as_an_uninterrupted_one(tiny_model_dir, tmp_path, monkeypatch):
    import functools

    import lightning

    recorders = []
    original_fit = lightning.Trainer.fit

    @functools.wraps(original_fit)  # LightningCLI reads fit's signature for --ckpt_path
    def patched_fit(self, *args, **kwargs):
        recorder = RecordBatches()
        recorders.append(recorder)
        self.callbacks.append(recorder)
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(lightning.Trainer, "fit", patched_fit)
    run_cli(tiny_model_dir, tmp_path / "straight", "--trainer.max_steps=5", "--trainer.limit_val_batches=0")
    run_cli(tiny_model_dir, tmp_path / "cut", "--trainer.max_steps=2", "--trainer.limit_val_batches=0")
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    run_cli(tiny_model_dir, tmp_path / "cut", "--trainer.max_steps=5", "--trainer.limit_val_batches=0",
            f"--ckpt_path={last}")
    straight, first, resumed = (r.seen for r in recorders)
    assert len(straight) == 5 and first + resumed == straight


def test_ckpt_path_last_resumes_the_newest_run_in_its_version(tiny_model_dir, tmp_path):
    def fit(*extra):
        return build_cli([
            "fit", "-c", str(ROOT / "configs/sft.yaml"),
            f"--model.init_args.policy.init_args.model={tiny_model_dir}", f"--data.init_args.train_file={DATA}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.callbacks.every_n_train_steps=1", *extra,
        ])

    with pytest.raises(CheckpointError, match="no checkpoint under"):
        fit("--trainer.max_steps=2", "--ckpt_path=last")
    fit("--trainer.max_steps=2")
    resumed = fit("--trainer.max_steps=4", "--ckpt_path=last")
    assert resumed.trainer.global_step == 4
    assert resumed.trainer.logger.version == "version_0"  # the same run continues
    assert sorted(p.name for p in (tmp_path / "sft").iterdir()) == ["version_0"]


def test_the_sft_config_runs_as_shipped(tiny_model_dir, tmp_path, monkeypatch):
    """configs/sft.yaml runs as shipped (the README's weighted-SFT command); only the model (and where logs go)
    differ here."""
    monkeypatch.chdir(ROOT)
    cli = build_cli(["fit", "-c", "configs/sft.yaml", f"--model.init_args.policy.init_args.model={tiny_model_dir}",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == cli.trainer.max_steps == 30
    assert "val/loss" in cli.trainer.callback_metrics
