"""The method tables build every run they would start (with the tiny model, nothing fitted): a table that no longer
builds is found here, not hours into a measured run."""

import argparse
import sys

import pytest
from tiny import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import self_improve_table  # noqa: E402


@pytest.mark.parametrize("variant", list(self_improve_table.VARIANTS))
def test_every_self_training_variant_builds_with_the_held_out_questions(variant, tiny_model_dir, tmp_path):
    args = argparse.Namespace(questions=8, eval_questions=5, model=tiny_model_dir, runs=str(tmp_path))
    cli, evaluations = self_improve_table.build(variant, 3, args)
    assert set(evaluations) == {"few_shot", "zero_shot"}
    for prompt, evaluation in evaluations.items():
        task = evaluation._task(cli.trainer)  # what the evaluation reads: the data task's family, seed 1234
        assert task.seed == 1234 and task.b_range == cli.datamodule.task.b_range and cli.datamodule.task.seed == 3
        assert task.few_shot == (0 if prompt == "zero_shot" else cli.datamodule.task.few_shot)
        assert evaluation.num_questions == 5
