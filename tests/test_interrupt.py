"""A signal ends a run with a non-zero status and one line saying what was saved: real signals to child processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow  # starts processes


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    """`labelfree fit` in a child process, its output in `tmp_path/err.log` (a pipe nobody reads would fill)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "err.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "lightning_modules.cli", "fit", *args,
                             f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """The child takes SIGINT as a terminal's Ctrl-C would: a suite started in the background (`nohup ... &`)
    ignores SIGINT, every child inherits that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(process: subprocess.Popen, found, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not found():
        if process.poll() is not None:
            pytest.fail(f"the run ended before the signal (status {process.returncode})")
        if time.monotonic() - start > timeout:
            process.kill()
            pytest.fail("the run never got there")
        time.sleep(0.1)


def _stop(process: subprocess.Popen, tmp_path: Path, signum: int = signal.SIGTERM) -> str:
    """The signal, then the run's output once it has ended."""
    process.send_signal(signum)
    process.wait(timeout=120)
    return (tmp_path / "err.log").read_text()


@pytest.mark.parametrize("signum, name, status", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "SIGINT", 1)])
def test_a_signal_during_training_exits_non_zero_naming_the_checkpoint(signum, name, status, tiny_model_dir, tmp_path):
    (tmp_path / "every_step.yaml").write_text(
        "trainer:\n  max_steps: 100000\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args:\n        save_last: true\n        every_n_train_steps: 1\n")
    run = _start(tmp_path, "-c", "configs/sft.yaml", "-c", str(tmp_path / "every_step.yaml"),
                 f"--model.init_args.policy.init_args.model={tiny_model_dir}")
    _wait_for(run, lambda: any(tmp_path.glob("sft/version_*/checkpoints/last.ckpt")))
    err = _stop(run, tmp_path, signum)
    assert run.returncode == status, err  # on SIGTERM Lightning alone exits 0
    assert f"labelfree: stopped by {name} at step" in err and "--ckpt_path last" in err and "last.ckpt" in err


def test_sigterm_during_generation_stops_at_the_next_chunk(tiny_model_dir, tmp_path):
    run = _start(tmp_path, "-c", "configs/self_improve/base.yaml", "-c", "configs/self_improve/lmsi.yaml",
                 f"--model.init_args.policy.init_args.model={tiny_model_dir}", "--trainer.callbacks=[]",
                 "--data.init_args.num_questions=320", "--data.init_args.task.init_args.unfinished=read")
    chunks = lambda: list(tmp_path.glob("*/candidates/*/chunk-*"))  # noqa: E731
    _wait_for(run, lambda: len(chunks()) >= 1)
    err = _stop(run, tmp_path)
    assert run.returncode == 143, err
    assert "generation: stopped after chunk" in err and "a rerun reuses them" in err
    assert 1 <= len(chunks()) < 10  # 320 questions are 10 chunks: it did not finish the round
    assert "labelfree: stopped by SIGTERM at step 0; no checkpoint was written yet" in err


def test_a_script_that_runs_fits_itself_exits_143(tiny_model_dir, tmp_path):
    """The table scripts build their runs with `build_cli(run=False)` and call `trainer.fit` inside
    `exit_status_on_signal()`: a SIGTERM during a fit ends the script at once with 143 (it exited 0 before)."""
    script = tmp_path / "table.py"
    script.write_text(
        "import sys\n"
        "from lightning_modules.cli import build_cli, exit_status_on_signal\n"
        "with exit_status_on_signal():\n"
        f"    cli = build_cli(['-c', 'configs/sft.yaml', '--model.init_args.policy.init_args.model={tiny_model_dir}',\n"
        f"                     '--trainer.logger.init_args.save_dir={tmp_path}', '--trainer.max_steps=100000',\n"
        "                     '--trainer.enable_progress_bar=false'], run=False)\n"
        "    cli.trainer.fit(cli.model, cli.datamodule)\n"
        "    print('the next variant would start here')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "err.log").open("w")
    run = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _wait_for(run, lambda: any(tmp_path.glob("sft/version_*/checkpoints/last.ckpt")))
    err = _stop(run, tmp_path)
    assert run.returncode == 143, err
    assert "labelfree: stopped by SIGTERM" in err and "the next variant would start here" not in err
