"""Where a run's time goes: phases are exclusive, named after their parents, add up to the run's wall time, and
every fit reports them (TensorBoard `time/<phase>`, `phases.json`, one line on stderr)."""

import itertools
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_modules.progress import Phases


def test_phases_are_exclusive_and_named_after_their_parents(monkeypatch):
    import lightning_modules.progress as progress

    clock = itertools.chain([0.0, 1.0, 3.0, 6.0, 10.0, 15.0], itertools.count(16.0))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    phases = Phases()  # t 0
    with phases("a"):  # t 1
        with phases("b"):  # t 3: a ran 2 s
            pass  # t 6: a/b ran 3 s
    # t 10: a ran 4 s more
    assert phases.report() == {"a": 6.0, "a/b": 3.0, "other": 6.0, "total": 15.0}  # t 15
    phases.enter("a")
    with pytest.raises(RuntimeError, match="phase 'b' ended while 'a' ran"):
        phases.exit("b")


def test_a_self_training_fit_reports_its_phases(tiny_model_dir, tmp_path, capsys):
    from datamodules.selection import MajorityVote
    from datamodules.self_generated import SelfGeneratedDataModule
    from datamodules.tasks import Arithmetic
    from lightning_modules.cli import PhaseReport
    from lightning_modules.policy import Policy
    from lightning_modules.progress import phase
    from lightning_modules.sft import WeightedSFTModule
    from lightning_modules.signals import VoteShare

    class Everything(MajorityVote):
        def signals(self):
            return {"value": VoteShare()}

        def select(self, values, keep, weight, group):
            return keep, weight

    phase.reset()
    module = WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False,
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = SelfGeneratedDataModule(Arithmetic(few_shot=1), [Everything()], num_questions=4, n=2, max_new_tokens=6,
                                   tokenizer=tiny_model_dir, batch_size=4)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, enable_progress_bar=False, limit_val_batches=0,
                        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path), callbacks=[PhaseReport()])
    trainer.fit(module, data)
    seconds = json.loads((Path(trainer.log_dir) / "phases.json").read_text())
    assert {"model load", "selection", "selection/generation", "selection/signal vote_share",
            "selection/signal token_nll", "training"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())
    assert sum(v for k, v in seconds.items() if k != "total") == pytest.approx(seconds["total"])
    assert "labelfree: time by phase: model load" in capsys.readouterr().err
