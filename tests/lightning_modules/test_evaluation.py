"""Evaluation: `labelfree test` on the tiny model, and fit-time evaluation with the TaskEvaluation callback."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny import ROOT

from callbacks.task_evaluation import TaskEvaluation
from datamodules.generation import sample
from datamodules.tasks import Arithmetic


def test_labelfree_test_scores_greedy_majority_and_pass(tiny_cli, tmp_path):
    cli = tiny_cli("configs/eval/arithmetic.yaml", "--data.init_args.num_questions=5", "--data.init_args.batch_size=2",
                   "--model.init_args.k=3", "--model.init_args.max_new_tokens=6", subcommand="test", run=True)
    metrics = cli.trainer.callback_metrics
    keys = {f"test/arithmetic-2shot/{m}" for m in ("greedy_accuracy", "maj@3", "pass@3", "greedy_parse_rate")}
    assert keys <= set(metrics)
    predictions = next(tmp_path.rglob("predictions-arithmetic-2shot-test.jsonl"))
    rows = [json.loads(x) for x in predictions.read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["samples"]) == 3 for r in rows)
    # the reported numbers are the rows' means, and the greedy completions are the engine's greedy answers
    assert metrics["test/arithmetic-2shot/pass@3"].item() == sum(r["pass"] for r in rows) / 5
    task = Arithmetic()
    engine = sample(cli.model.policy, task.load("test", 5), task, n=1, temperature=0, max_new_tokens=6,
                    progress=False)
    assert [r["greedy_completion"] for r in rows] == engine.texts


def test_fit_time_evaluation_logs_before_and_after(tiny_model_dir, tmp_path):
    from datamodules.labeled import LabeledDataModule
    from lightning_modules.policy import Policy
    from lightning_modules.sft import WeightedSFTModule

    evaluation = TaskEvaluation(Arithmetic(), num_questions=3, k=2, max_new_tokens=5)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[evaluation], enable_progress_bar=False,
                        limit_val_batches=0, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path))
    module = WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False)
    trainer.fit(module, LabeledDataModule(str(ROOT / "configs/data/arithmetic_sft.jsonl"), tokenizer=tiny_model_dir))
    assert set(evaluation.results) == set(evaluation.predictions) == {"fit_start", "fit_end"}
    rates = {"greedy_accuracy", "greedy_parse_rate", "greedy_unfinished"}
    assert set(evaluation.results["fit_end"]) == rates | {"maj@2", "pass@2"}
    rows = evaluation.predictions["fit_end"]  # one per question, for paired statistics
    accuracy = evaluation.results["fit_end"]["greedy_accuracy"]
    assert len(rows) == 3 and accuracy == sum(r["greedy_correct"] for r in rows) / 3
    assert all(0.0 <= v <= 1.0 for r in evaluation.results.values() for v in r.values())
    assert (Path(trainer.log_dir) / "predictions-arithmetic-2shot-fit_start.jsonl").exists()
    assert module.policy.model.training  # evaluation put the policy back in train mode
    assert torch.is_grad_enabled()
    table = evaluation.before_after().splitlines()
    assert table[2].startswith("| greedy_accuracy |") and len(table) == 7


def test_a_rerun_reads_the_evaluations_answers_from_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    """The fit-time evaluation's answers go to `<experiment dir>/evaluations`; they equal the uncached evaluation's,
    and a second run of the same weights reads them without generating (the engine's sampling made to fail)."""
    import datamodules.generation as generation
    from datamodules.labeled import LabeledDataModule
    from lightning_modules.policy import Policy
    from lightning_modules.sft import WeightedSFTModule

    def fit(cache: bool) -> TaskEvaluation:
        evaluation = TaskEvaluation(Arithmetic(), num_questions=3, k=2, max_new_tokens=5, cache=cache)
        trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[evaluation], enable_progress_bar=False,
                            limit_val_batches=0, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path))
        torch.manual_seed(0)
        module = WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False)
        trainer.fit(module, LabeledDataModule(str(ROOT / "configs/data/arithmetic_sft.jsonl"),
                                              tokenizer=tiny_model_dir))
        return evaluation

    uncached = fit(False)
    assert not (tmp_path / "lightning_logs" / "evaluations").exists()
    cached = fit(True)
    assert len(list((tmp_path / "lightning_logs" / "evaluations").iterdir())) == 4  # greedy and k=2, before and after
    assert cached.predictions == uncached.predictions

    def refuse(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(generation, "sample_candidates", refuse)
    assert fit(True).predictions == uncached.predictions


def test_fit_end_evaluation_can_skip_sampling(tiny_model_dir, tmp_path):
    from datamodules.labeled import LabeledDataModule
    from lightning_modules.policy import Policy
    from lightning_modules.sft import WeightedSFTModule

    evaluation = TaskEvaluation(Arithmetic(), num_questions=3, k=2, k_at_fit_end=0, max_new_tokens=5)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[evaluation], enable_progress_bar=False,
                        limit_val_batches=0, logger=False)
    trainer.fit(WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False),
                LabeledDataModule(str(ROOT / "configs/data/arithmetic_sft.jsonl"), tokenizer=tiny_model_dir))
    assert "maj@2" in evaluation.results["fit_start"]
    assert set(evaluation.results["fit_end"]) == {"greedy_accuracy", "greedy_parse_rate", "greedy_unfinished"}
    last_row = evaluation.before_after().splitlines()[-1]
    assert last_row == f"| pass@2 | {evaluation.results['fit_start']['pass@2']:.3f} | - |"


@pytest.mark.parametrize("every, evaluated", [(1, ["epoch-1", "epoch-2", "fit_end"]), (2, ["epoch-2", "fit_end"])])
def test_every_n_epochs_evaluates_each_rounds_model(every, evaluated, tiny_model_dir, tmp_path):
    from datamodules.labeled import LabeledDataModule
    from lightning_modules.policy import Policy
    from lightning_modules.sft import WeightedSFTModule

    evaluation = TaskEvaluation(Arithmetic(), num_questions=2, k=2, k_at_fit_end=0, max_new_tokens=4,
                                at_fit_start=False, every_n_epochs=every)
    trainer = L.Trainer(max_epochs=3, limit_train_batches=1, default_root_dir=tmp_path, callbacks=[evaluation],
                        enable_progress_bar=False, limit_val_batches=0, logger=False)
    trainer.fit(WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False),
                LabeledDataModule(str(ROOT / "configs/data/arithmetic_sft.jsonl"), tokenizer=tiny_model_dir))
    assert list(evaluation.predictions) == evaluated  # the last epoch once, as fit_end
    rates = {"greedy_accuracy", "greedy_parse_rate", "greedy_unfinished"}
    assert all(set(evaluation.results[w]) == rates for w in evaluated)
    with pytest.raises(ValueError, match="every_n_epochs"):
        TaskEvaluation(Arithmetic(), every_n_epochs=-1)


def test_two_evaluations_in_one_config_never_overwrite_each_other(tiny_model_dir, tmp_path):
    from datamodules.labeled import LabeledDataModule
    from lightning_modules.policy import Policy
    from lightning_modules.sft import WeightedSFTModule

    def fit(*evaluations):
        trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, callbacks=list(evaluations),
                            enable_progress_bar=False, limit_val_batches=0,
                            logger=L.pytorch.loggers.TensorBoardLogger(tmp_path))
        trainer.fit(WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False),
                    LabeledDataModule(str(ROOT / "configs/data/arithmetic_sft.jsonl"), tokenizer=tiny_model_dir))
        return trainer

    two_shot = TaskEvaluation(Arithmetic(), num_questions=3, k=2, max_new_tokens=5)
    zero_shot = TaskEvaluation(Arithmetic(few_shot=0), num_questions=3, k=0, max_new_tokens=5)
    trainer = fit(two_shot, zero_shot)
    assert (two_shot.name(), zero_shot.name()) == ("arithmetic-2shot", "arithmetic-0shot")
    files = sorted(p.name for p in Path(trainer.log_dir).glob("predictions-*.jsonl"))
    assert files == [f"predictions-arithmetic-{n}shot-{w}.jsonl" for n in (0, 2) for w in ("fit_end", "fit_start")]
    two_shot_rows = (Path(trainer.log_dir) / "predictions-arithmetic-2shot-fit_start.jsonl").read_text().splitlines()
    assert all(len(json.loads(r)["samples"]) == 2 for r in two_shot_rows)  # its maj@2 samples are kept
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir).Reload()
    assert {"eval/arithmetic-2shot/maj@2", "eval/arithmetic-2shot/greedy_accuracy",
            "eval/arithmetic-0shot/greedy_accuracy"} <= set(events.Tags()["scalars"])
    with pytest.raises(ValueError, match="2 TaskEvaluation callbacks are named 'arithmetic-2shot'"):
        fit(TaskEvaluation(Arithmetic(), num_questions=3, k=0), TaskEvaluation(Arithmetic(seed=1), num_questions=3))
    assert TaskEvaluation(Arithmetic(), name="mine").name() == "mine"


def test_labelfree_test_on_math_from_a_local_file(tiny_cli, tmp_path):
    local = "--data.init_args.task.init_args.data_path=tests/fixtures/math500_{split}.jsonl"
    cli = tiny_cli("configs/eval/math.yaml", local, "--data.init_args.num_questions=6", "--model.init_args.k=2",
                   "--model.init_args.max_new_tokens=4", subcommand="test", run=True)
    rows = [json.loads(x) for x in next(tmp_path.rglob("predictions-math-0shot-test.jsonl")).read_text().splitlines()]
    assert [r["gold"] for r in rows][:3] == ["3/4", "$2\\sqrt{2}$", "4"]  # gold normalised at load
    assert "test/math-0shot/greedy_accuracy" in cli.trainer.callback_metrics


def test_the_tensorboard_predictions_are_readable_markdown():
    """Question, gold, extracted answer and the completion quoted line by line (no repr with literal \\n, no table
    that squeezes a long cell to a character a line)."""
    from callbacks.task_evaluation import predictions_markdown

    rows = [{"id": "q1", "question": "What is 2 + 2?", "gold": "4", "greedy_answer": "4", "greedy_correct": True,
             "greedy_finish": "eos", "greedy_completion": "2 + 2 = 4.\n\nThe answer is 4."}]
    text = predictions_markdown(rows)
    assert "**q1**: What is 2 + 2?" in text and "gold: `4`, extracted: `4` (right; ended by eos)" in text
    assert "> 2 + 2 = 4.\n>\n> The answer is 4." in text and "\\n" not in text and "|---|" not in text


def test_progress_lines_reach_a_log_file(capsys):
    from lightning_modules.progress import ProgressLog

    progress = ProgressLog("test", 3, every_s=0.0, force=True)
    progress.update(2, 100)
    progress.update(1, 50)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("test: 2/3 questions, ") and lines[-1].startswith("test: 3/3 questions, ")
    assert "tokens/s" in lines[-1]
