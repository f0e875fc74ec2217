"""Per-question dynamics (callbacks/dynamics.py) and the guards against a wrong majority (signals/compose.py)."""

import json
import math
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.dynamics import QuestionDynamics, figures, question_rows
from datamodules.questions import QuestionDataModule
from datamodules.tasks import Arithmetic
from lightning_modules.candidates import Candidates
from lightning_modules.evaluation import Evaluation, evaluate, score_question
from lightning_modules.losses.policy_gradient import combined_advantages
from lightning_modules.progress import phase
from lightning_modules.sampling import SamplingParams
from lightning_modules.signals import Gated, MajorityAnswer, NegativeEntropy, SelectiveComplementary, VoteShare, score

TASK = Arithmetic(few_shot=0)


def probe(answers: list[list[str | None]], golds: list[str | None], greedy: list[str] | None = None) -> list[dict]:
    """Probe rows for hand-written sampled answers ("The answer is a." each; None: no answer)."""
    questions = [TASK.load("test", len(golds))[i] for i in range(len(golds))]
    questions = [replace(q, answer=g) for q, g in zip(questions, golds)]
    text = (lambda a: "I do not know" if a is None else f"The answer is {a}.")
    rows = [score_question(TASK, q, text(g), [text(a) for a in per]) for q, per, g in
            zip(questions, answers, greedy or [a[0] for a in answers])]
    empty = Candidates(questions, [TASK] * len(questions), torch.zeros(0, dtype=torch.long), [], [], [], [])
    return question_rows(Evaluation(rows, empty, None), TASK)


def test_question_rows_and_figures_against_hand_values():
    start = probe([["3", "3", "3", "4"], ["5", "6", None, None], ["7", "8", "9", "7"]], ["3", "6", "9"])
    assert [r["majority"] for r in start] == ["3", None, "7"]
    assert [r["vote_share"] for r in start] == [0.75, 0.0, 0.5]
    assert [r["parse_rate"] for r in start] == [1.0, 0.5, 1.0]
    # answer entropy: outcomes 3/4, 1/4 -> -(0.75 ln 0.75 + 0.25 ln 0.25) / ln 4
    assert start[0]["answer_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    assert start[1]["answer_entropy"] == pytest.approx(-(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5)) / math.log(4))
    later = probe([["4", "4", "4", "4"], ["6", "6", "6", None], ["7", "7", "7", "7"]], ["3", "6", "9"])
    f = figures(later, start, start, TASK)
    assert f["vote_share"] == pytest.approx((1.0 + 0.75 + 1.0) / 3)
    assert f["flip_rate"] == pytest.approx(2 / 3)  # 3 -> 4, none -> 6; 7 stays
    assert f["agreement_with_start"] == pytest.approx(1 / 3)
    assert f["sharpened_agreement"] == pytest.approx(1.0 / 3)  # only question 3 agrees, at share 1
    # audit: q1 right -> wrong (corrupted), q2 wrong -> right (learned), q3 wrong -> wrong
    assert f["audit/corrupted"] == f["audit/learned"] == f["audit/stable_wrong"] == pytest.approx(1 / 3)
    assert f["audit/stable_right"] == 0 and f["audit/match_rate"] == pytest.approx(1 / 3)
    assert f["audit/solvable_at_start"] == 1.0  # each question had gold among its 4 samples
    assert f["audit/learned_from_zero"] == 0.0
    assert figures(start, None, start, TASK)["flip_rate"] == 0.0


def test_the_label_free_figures_do_not_change_when_gold_is_removed(tiny_model_dir):
    from lightning_modules.policy import Policy

    policy = Policy(tiny_model_dir)
    task = Arithmetic(unfinished="read")
    questions = task.load("valid", 4)
    params = SamplingParams(4, 1.0, 1.0, 6, 0), SamplingParams(1, 0.0, 1.0, 6, 0)
    runs = []
    for qs in (questions, [replace(q, answer=None) for q in questions]):
        rows = question_rows(evaluate(policy, task, qs, params[1], params[0]), task)
        runs.append((rows, figures(rows, rows, rows, task)))
    (with_gold, f_gold), (without, f_none) = runs
    label_free = {k: v for k, v in f_gold.items() if not k.startswith("audit/")}
    assert label_free == f_none and set(f_gold) - set(f_none) == {k for k in f_gold if k.startswith("audit/")}
    assert [{k: r[k] for k in r if k in without[0]} for r in with_gold] == without


@pytest.mark.slow
def test_the_probe_runs_in_an_rl_fit_and_feeds_a_checkpoint_monitor(tiny_model_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_modules.policy import Policy
    from lightning_modules.rl import SelfRewardRLModule

    dynamics = QuestionDynamics(Arithmetic(unfinished="read"), num_questions=3, k=2, max_new_tokens=4,
                                every_n_steps=1)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="dynamics/sharpened_agreement", mode="max",
                           every_n_train_steps=1, save_top_k=1)
    trainer = L.Trainer(max_steps=2, default_root_dir=tmp_path, enable_progress_bar=False, limit_val_batches=0,
                        callbacks=[dynamics, best], logger=L.pytorch.loggers.TensorBoardLogger(tmp_path))
    module = SelfRewardRLModule(Policy(tiny_model_dir), [MajorityAnswer()], max_new_tokens=4)
    phase.reset()
    trainer.fit(module, QuestionDataModule(Arithmetic(), num_questions=4, batch_size=2, tokenizer=tiny_model_dir))
    lines = [json.loads(x) for x in (Path(trainer.log_dir) / "dynamics.jsonl").read_text().splitlines()]
    assert [p["step"] for p in lines] == [0, 1, 2] and all(len(p["questions"]) == 3 for p in lines)
    assert "audit/match_rate" in lines[0]["figures"]  # the procedural task has gold: the audit is there
    assert (Path(trainer.log_dir) / "dynamics.png").stat().st_size > 1000
    assert best.best_model_path and "dynamics/sharpened_agreement" in trainer.callback_metrics
    assert "probe/evaluation/generation" in phase.report()  # its cost is its own phase (all 3 probes)


def test_cuma_mask_zeroes_the_advantages_of_a_group_without_a_clear_majority(rollout):
    """Question 0's answers: gold, 3, gold again, unparsable: majority share 2/3; question 1's: 7, 7, 8, gold:
    share 1/2. At threshold 0.6 question 1 is masked: every reward 0, every advantage 0; question 0 keeps TTRL's."""
    policy, r = rollout
    gated = Gated(MajorityAnswer(), VoteShare(), threshold=0.6)
    assert gated.needs_group and gated.name == "majority_answer_gated_by_vote_share"
    values = score(gated, r, policy)
    assert values[:4].tolist() == score(MajorityAnswer(), r, policy)[:4].tolist()
    assert values[4:].tolist() == [0.0] * 4
    advantages = combined_advantages(values[:, None], [1.0], [False], r.group)
    assert advantages[4:].abs().max() == 0 and advantages[:4].abs().max() > 0
    assert score(Gated(MajorityAnswer(), VoteShare(), threshold=0.4), r, policy)[4:].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_scrl_rewards_a_clear_majority_and_punishes_rare_unsure_answers(rollout):
    """SCRL's reward from the tiny model's own entropies, against the rule written as a loop: question 0's majority
    (gold, 1/2 against 1/4) and question 1's (7, 1/2 against 1/4) pass; with tau_low 0.3 the single answers are
    negatives where their mean entropy is at least the group's; the unparsable answer gets -1."""
    policy, r = rollout
    entropy = -score(NegativeEntropy(unparsable_value=None), r, policy)
    got = score(SelectiveComplementary(tau_low=0.3), r, policy)
    want = []
    for rows, positive, singles in [(range(4), {0, 2}, {1}), (range(4, 8), {4, 5}, {6, 7})]:
        mean = entropy[list(rows)].mean()
        want += [1.0 if i in positive else -1.0 if r.answers[i] is None or (i in singles and entropy[i] >= mean)
                 else 0.0 for i in rows]
    assert got.tolist() == want, (got, want)
    assert SelectiveComplementary(tau_pos=0.6)(r, policy)[[0, 2, 4, 5]].tolist() == [0.0] * 4  # no clear majority


def test_a_resumed_run_goes_on_with_the_probes_of_an_uninterrupted_one(tiny_model_dir, tmp_path):
    """Four steps in one go against two, then `ckpt_path=last` to four: the same probes (the probe history is in the
    checkpoint, the fit-start probe is not taken again, and the weights and the probe's sampling resume exactly)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_modules.policy import Policy
    from lightning_modules.rl import SelfRewardRLModule

    def fit(root, steps, ckpt_path=None):
        dynamics = QuestionDynamics(Arithmetic(), num_questions=3, k=2, max_new_tokens=4, every_n_steps=1)
        last = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)
        trainer = L.Trainer(max_steps=steps, default_root_dir=root, enable_progress_bar=False, logger=False,
                            limit_val_batches=0, callbacks=[dynamics, last])
        module = SelfRewardRLModule(Policy(tiny_model_dir), [MajorityAnswer()], max_new_tokens=4)
        trainer.fit(module, QuestionDataModule(Arithmetic(), num_questions=8, batch_size=2, tokenizer=tiny_model_dir),
                    ckpt_path=ckpt_path)
        return dynamics.probes

    whole = fit(tmp_path / "whole", 4)
    fit(tmp_path / "parts", 2)
    resumed = fit(tmp_path / "parts", 4, ckpt_path=str(tmp_path / "parts" / "last.ckpt"))
    assert [p["step"] for p in resumed] == [0, 1, 2, 3, 4]
    assert resumed == whole
