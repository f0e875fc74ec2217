"""Files written whole or not at all, and cached files verified against their content hash when read."""

import errno
import os

import pytest
import torch
from tiny import ROOT

from lightning_modules.storage import atomic_checkpoint_io, read_verified, write_atomically, write_verified


def _disk_full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_fails_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_atomically(path, '{"kept": 1}')
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, '{"kept": 2}')
    assert path.read_text() == '{"kept": 1}' and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_checkpoint_that_cannot_be_written_whole_never_sits_under_its_name(tmp_path, monkeypatch):
    checkpoint_io = atomic_checkpoint_io()
    path = tmp_path / "epoch=0-step=6.ckpt"
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_io.save_checkpoint({"state": torch.ones(3)}, path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    checkpoint_io.save_checkpoint({"state": torch.ones(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state"], torch.ones(3))


def test_the_cli_trainer_writes_checkpoints_atomically(tiny_model_dir, tmp_path, monkeypatch):
    from lightning_modules.cli import build_cli

    monkeypatch.chdir(ROOT)
    cli = build_cli(["-c", "configs/sft.yaml", f"--model.init_args.policy.init_args.model={tiny_model_dir}",
                     f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"


@pytest.mark.parametrize("damage", ["changed", "cut short", "hash missing"])
def test_a_cached_file_that_fails_its_hash_is_moved_aside(tmp_path, caplog, damage):
    path = tmp_path / "losses.pt"
    write_verified(path, b"0123456789" * 10)
    assert read_verified(path) == b"0123456789" * 10
    if damage == "changed":
        path.write_bytes(b"HACKD" + path.read_bytes()[5:])
    elif damage == "cut short":
        path.write_bytes(path.read_bytes()[:40])
    else:
        (tmp_path / "losses.pt.sha256").unlink()
    with caplog.at_level("WARNING"):
        assert read_verified(path) is None
    assert "losses.pt failed its check" in caplog.text and list(tmp_path.glob("losses.pt.bad-*"))
    assert not path.exists() and read_verified(tmp_path / "absent.pt") is None
