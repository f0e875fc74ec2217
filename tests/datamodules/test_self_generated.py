"""The self-training pipeline end to end on the tiny model: generate -> signals -> select -> weighted SFT."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny import ROOT

from datamodules.selection import (
    DSWeightFilter,
    EmptySelectionError,
    EntropyThreshold,
    MajorityVote,
    RewardModelFilter,
    SelfRatingFilter,
)
from datamodules.self_generated import SelfGeneratedDataModule
from datamodules.tasks import Arithmetic
from lightning_modules.policy import Policy
from lightning_modules.sft import WeightedSFTModule
from lightning_modules.signals import DSWeight, SelfRating, VoteShare


def _fit(tiny_model_dir, tmp_path, selectors, max_epochs=1, **data_kwargs):
    module = WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False,
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = SelfGeneratedDataModule(Arithmetic(few_shot=1), selectors, num_questions=6, n=3, temperature=1.0,
                                   max_new_tokens=8, tokenizer=tiny_model_dir, batch_size=4, **data_kwargs)
    trainer = L.Trainer(max_epochs=max_epochs, default_root_dir=tmp_path, enable_progress_bar=False,
                        limit_val_batches=0, logger=L.pytorch.loggers.TensorBoardLogger(tmp_path),
                        reload_dataloaders_every_n_epochs=data_kwargs.get("epochs_per_round", 1))
    trainer.fit(module, data)
    return trainer, data


class _Everything(MajorityVote):
    """The tiny model rarely parses an answer: a selector that keeps all, to exercise the pipeline."""

    def signals(self):
        return {"value": VoteShare()}

    def select(self, values, keep, weight, group):
        return keep, weight * (1 + values["value"].nan_to_num(0.0))


def test_pipeline_writes_selection_and_trains(tiny_model_dir, tmp_path):
    trainer, data = _fit(tiny_model_dir, tmp_path, [_Everything()])
    assert trainer.global_step >= 1
    run = Path(trainer.log_dir)
    rows = [json.loads(x) for x in (run / "round-0" / "selected.jsonl").read_text().splitlines()]
    report = json.loads((run / "round-0" / "report.json").read_text())
    assert len(rows) == 18 == report["candidates"] == report["kept"]
    assert {"prompt", "completion", "weight", "vote_share", "answer_entropy", "token_nll", "majority_answer",
            "majority"} <= set(rows[0])
    assert all(r["weight"] == pytest.approx(1 + (0 if math.isnan(r["vote_share"]) else r["vote_share"])) for r in rows)
    assert [s["name"] for s in report["selectors"]] == ["all candidates", "_Everything"]
    gold = {q.id: q.answer for q in Arithmetic(few_shot=1).load("train", 6)}
    right = [Arithmetic().same(r["answer"], gold[r["question_id"]]) for r in rows]  # the audit, by hand
    assert report["selectors"][0]["precision"] == pytest.approx(sum(right) / 18)
    assert report["selectors"][0]["recall"] == (1.0 if any(right) else 0.0)
    assert (run.parent / "candidates").exists()  # shared by the experiment's versions


def test_costly_signals_are_computed_for_the_candidates_still_in_play(tiny_model_dir, tmp_path, monkeypatch):
    rated_questions, real = [], SelfRating.forward

    def spy(self, candidates, policy):
        rated_questions.extend(candidates.question_text(i) for i in range(len(candidates)))
        return real(self, candidates, policy)

    monkeypatch.setattr(SelfRating, "forward", spy)
    _, data = _fit(tiny_model_dir, tmp_path, [DSWeightFilter(keep=0.8, signal=DSWeight(valid_questions=2)),
                                              SelfRatingFilter(keep=1.0)])
    report = data.reports[0]
    signals = report.signals
    assert (signals["ds_weight"] >= 1).all()  # the first selector: every candidate scored
    rated = torch.isfinite(signals["self_rating"])
    assert int(rated.sum()) == len(rated_questions) == report.selectors[1]["kept"] < 18  # only the DS survivors
    assert ((signals["self_rating"][rated] >= 0) & (signals["self_rating"][rated] <= 10)).all()
    task = Arithmetic(few_shot=1)
    assert set(rated_questions) <= {task.format_question(q) for q in task.load("train", 6)}  # raw text, no template


def test_rounds_resample_with_the_trained_model(tiny_model_dir, tmp_path):
    trainer, data = _fit(tiny_model_dir, tmp_path, [_Everything()], max_epochs=2, epochs_per_round=1)
    assert [r.round for r in data.reports] == [0, 1]
    assert (Path(trainer.log_dir) / "round-1" / "selected.jsonl").exists()


def test_semievol_warmup_then_labeled_threshold(tiny_model_dir, tmp_path):
    _, data = _fit(tiny_model_dir, tmp_path, [EntropyThreshold(percentile=50)], max_epochs=2,
                   labeled_questions=3, labeled_warmup=True)
    assert [r.round for r in data.reports] == [1]  # round 0 trained on the labeled set alone
    report = data.reports[-1]
    labeled, unlabeled = report.signals["labeled_token_nll"], report.signals["token_nll"]
    assert labeled.shape == (3,)
    tau = torch.quantile(labeled.double(), 0.5)  # the labeled set's median: the seed's reading
    assert report.kept == int((unlabeled.double() <= tau).sum()) == report.selectors[1]["kept"]


def test_empty_selection_is_a_clear_error(tiny_model_dir, tmp_path):
    class Nothing(MajorityVote):
        def select(self, values, keep, weight, group):
            return keep & False, weight

    with pytest.raises(EmptySelectionError, match="Nothing kept nothing"):
        _fit(tiny_model_dir, tmp_path, [Nothing()])


def test_valid_and_labeled_sets_never_overlap_the_unlabeled_questions(tmp_path):
    """One source for all three (the GPU recipe's `valid_split: train`): carved into consecutive slices."""
    from datamodules.tasks import GSM8K

    rows = [f'{{"id": "r{i}", "question": "Q {i}?", "answer": "{i}", "rationale": "It is {i}."}}' for i in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    ds = DSWeight(valid_questions=2, valid_split="train")
    data = SelfGeneratedDataModule(GSM8K(data_path=str(tmp_path / "train.jsonl"), few_shot=1),
                                   [DSWeightFilter(signal=ds)], num_questions=5, labeled_questions=3,
                                   labeled_split="train")
    unlabeled, labeled = data._load_questions()
    assert [r for _, r in ds.valid] == ["It is 1. The answer is 1.", "It is 2. The answer is 2."]
    assert [q.id for q in labeled] == ["r3", "r4", "r5"]
    assert [q.id for q in unlabeled] == ["r6", "r7", "r8", "r9", "r10"]  # r0 is the few-shot exemplar


def test_a_labeled_set_never_changes_generated_unlabeled_questions():
    """Generated splits may repeat a question by chance: the labeled set yields, so every method of a seed trains on
    the questions `task.load` gives (labeled and valid questions equal to unlabeled ones are replaced instead)."""
    from datamodules.tasks.base import Question

    class Counting(Arithmetic):  # a ProceduralTask: generated questions, duplicates skipped
        def make(self, split, n):  # every split the same texts, so the valid set meets the unlabeled questions
            return [Question(f"{split}-{i}", f"What is {i} + 0?", str(i), f"It is {i}. The answer is {i}.")
                    for i in range(n)]

    task, ds = Counting(few_shot=0), DSWeight(valid_questions=2)
    data = SelfGeneratedDataModule(task, [DSWeightFilter(signal=ds)], num_questions=5, labeled_questions=1)
    unlabeled, labeled = data._load_questions()
    assert [q.id for q in unlabeled] == [q.id for q in task.load("train", 5)] == [f"train-{i}" for i in range(5)]
    assert [q.id for q in labeled] == ["labeled-5"]  # the next question no other use holds
    assert [r for _, r in ds.valid] == ["It is 6. The answer is 6.", "It is 7. The answer is 7."]


@pytest.mark.parametrize("selector, missing", [
    (lambda: DSWeightFilter(signal=DSWeight(valid_questions=0)), "DSWeight needs a labeled valid set: valid_quest"),
    (lambda: EntropyThreshold(), "labeled_questions > 0"),
    (lambda: RewardModelFilter("/no/such/rm"), "no such model directory"),
    (lambda: RewardModelFilter("TINY"), "is not a sequence classifier"),
])
def test_a_selector_missing_what_it_needs_fails_before_generation(selector, missing, tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    from datamodules.generation import HFGenerator

    monkeypatch.setattr(HFGenerator, "sample", lambda *a, **k: pytest.fail("generation ran"))
    with pytest.raises((ValueError, FileNotFoundError), match=missing):
        selector = selector()
        if isinstance(selector, RewardModelFilter) and selector.signal.model_dir == "TINY":
            selector.signal.model_dir = tiny_model_dir  # a causal LM, not a reward model
        _fit(tiny_model_dir, tmp_path, [MajorityVote(), selector])


# IWSI's official per-sample loss (record_loss.py: left padding to max_length 64 with eos as the pad, CE of the
# shifted labels, mask attention_mask[:, 1:]), run in a scratch directory on the tiny model for these two texts.
IWSI_TEXTS = ["Q: Ana has 7 boxes. Each box holds 12 apples.\nA: <|im_end|>7 x 12 = 84. The answer is 84.",
              "Q: How many?\nA: <|im_end|>The answer is 3."]
IWSI_REFERENCE_LOSSES = [5.979732036590576, 5.956542015075684]


def test_ds_loss_first_token_option_reproduces_iwsis_loss_code(tiny_model_dir):
    from lightning_modules.batching import TokenizedExample, collate, with_leading_pad
    from lightning_modules.losses.functional import IGNORE_INDEX

    policy = Policy(tiny_model_dir).eval()
    ids = [policy.tokenizer(t)["input_ids"] for t in IWSI_TEXTS]
    batch = collate([TokenizedExample(i, 0, 1.0, False) for i in ids], policy.tokenizer.pad_token_id)

    def losses(b):
        b = dict(b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE_INDEX))
        with policy.inference(), policy.reference():
            return policy.sequence_nll(b).tolist()

    with_pad = losses(with_leading_pad(batch, policy.tokenizer.pad_token_id))
    assert with_pad == pytest.approx(IWSI_REFERENCE_LOSSES, abs=1e-6)
    without = losses(batch)  # the default: the first token has no context and is not scored
    assert max(abs(a - b) for a, b in zip(without, IWSI_REFERENCE_LOSSES)) > 1e-4


@pytest.mark.slow  # starts processes
def test_the_self_training_recipe_under_ddp_gives_what_one_process_gives(tiny_model_dir, tmp_path):
    """The command a user scales up with (`--trainer.strategy=ddp --trainer.devices=2`, gloo on CPU): the same
    kept set and report as one process. The length-bucketing sampler used to stop it before any training."""
    from tiny import run_labelfree

    def fit(name, *extra):
        run_labelfree(
            "fit", "-c", "configs/self_improve/base.yaml", "-c", "configs/self_improve/greedy_control.yaml",
            f"--model.init_args.policy.init_args.model={tiny_model_dir}",
            "--trainer.accelerator=cpu", "--trainer.callbacks=[]", "--data.init_args.num_questions=32",
            "--data.init_args.max_new_tokens=8", f"--trainer.logger.init_args.save_dir={tmp_path / name}",
            f"--data.init_args.cache_dir={tmp_path / name / 'candidates'}", "--trainer.enable_progress_bar=false",
            *extra, cwd=ROOT)
        return tmp_path / name / "self_improve_greedy_control" / "version_0" / "round-0"

    one = fit("one")
    two = fit("two", "--trainer.strategy=ddp", "--trainer.devices=2")
    assert (two / "selected.jsonl").read_text() == (one / "selected.jsonl").read_text()
    assert json.loads((two / "report.json").read_text()) == json.loads((one / "report.json").read_text())
    assert json.loads((one / "report.json").read_text())["kept"] == 32  # counted over both ranks


def test_too_few_batches_for_the_ranks_is_refused():
    from datamodules.collate import LengthBucketSampler

    with pytest.raises(ValueError, match="8 samples make 1 batches of 8, fewer than the 2 ranks"):
        LengthBucketSampler([5] * 8, 8, world_size=2, rank=1)
    assert len(LengthBucketSampler([5] * 32, 8, world_size=2, rank=1)) == 2


def test_restart_each_round_trains_later_rounds_from_the_initial_weights(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from callbacks.round_restart import RestartEachRound
    from lightning_modules.optim import trainable_values

    seen = {}  # epoch -> (trainable values when its data was sampled, when its training began)

    class Spy(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen[trainer.current_epoch] = (sampled[-1], trainable_values(pl_module))

    sampled = []
    real = SelfGeneratedDataModule.train_dataloader

    def train_dataloader(self):
        sampled.append(trainable_values(self.trainer.lightning_module))
        return real(self)

    module = WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False,
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    data = SelfGeneratedDataModule(Arithmetic(few_shot=1), [_Everything()], num_questions=6, n=3, temperature=1.0,
                                   max_new_tokens=8, tokenizer=tiny_model_dir, batch_size=4)
    data.train_dataloader = train_dataloader.__get__(data)
    restart = RestartEachRound()
    trainer = L.Trainer(max_epochs=2, reload_dataloaders_every_n_epochs=1, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, callbacks=[restart, Spy()])
    trainer.fit(module, data)
    initial = restart.initial
    same = lambda a, b: all(torch.equal(a[n], b[n]) for n in b)  # noqa: E731
    assert restart.restarts == [1] and [r.round for r in data.reports] == [0, 1]
    assert same(seen[0][0], initial) and same(seen[0][1], initial)
    assert not same(seen[1][0], initial)  # round 1 sampled with round 0's model ...
    assert same(seen[1][1], initial)  # ... and trained from the initial weights

    # resumed inside round 1 (its start in the checkpoint state): not restarted again
    resumed = RestartEachRound()
    resumed.load_state_dict(restart.state_dict())
    fake = SimpleNamespace(datamodule=SimpleNamespace(round=1), optimizers=[])
    resumed.on_train_epoch_start(fake, module)
    assert resumed.restarts == [1]

    with pytest.raises(TypeError, match="RestartEachRound needs a datamodule with rounds"):
        RestartEachRound().setup(SimpleNamespace(datamodule=object()), module, "fit")
    warmup = SelfGeneratedDataModule(Arithmetic(), [EntropyThreshold()], labeled_questions=3, labeled_warmup=True,
                                     tokenizer=tiny_model_dir)
    with pytest.raises(ValueError, match="would undo SemiEvol's labeled warm-up"):
        RestartEachRound().setup(SimpleNamespace(datamodule=warmup), module, "fit")


def test_selection_report_logs_the_round_report():
    from types import SimpleNamespace

    from callbacks.selection_report import SelectionReport
    from datamodules.self_generated import RoundReport

    logged, texts, histograms = {}, {}, {}
    experiment = SimpleNamespace(add_histogram=lambda k, v, step: histograms.setdefault(k, v),
                                 add_text=lambda k, v, step: texts.setdefault(k, v))
    logger = SimpleNamespace(log_metrics=lambda m, step: logged.update(m), experiment=experiment)
    report = RoundReport(round=0, questions=2, candidates=4, parsed_fraction=0.75, unfinished_unparsed=1,
                         selectors=[{"name": "all candidates", "kept": 4, "precision": 0.5, "recall": 1.0}],
                         kept=4, kept_fraction=1.0, signals={"vote_share": torch.tensor([0.5, math.nan, 1.0, 1.0])},
                         samples=[(1.0, "The answer is 4.")])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(reports=[report]), logger=logger, global_step=0)
    SelectionReport().on_train_epoch_start(trainer, None)
    assert logged["select/kept_fraction"] == 1.0 and logged["select/all_candidates/precision"] == 0.5
    assert histograms["select/vote_share"].tolist() == [0.5, 1.0, 1.0]  # finite values only
    assert "weight 1.00: `'The answer is 4.'`" in texts["select/samples"]
    assert report.to_json()["samples"] == [(1.0, "The answer is 4.")] and "signals" not in report.to_json()
    with pytest.raises(TypeError, match="SelectionReport reads a self-training data module's round reports"):
        SelectionReport().on_train_epoch_start(SimpleNamespace(datamodule=SimpleNamespace()), None)
