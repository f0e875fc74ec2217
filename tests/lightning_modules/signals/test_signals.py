"""The signal library: each signal against hand values and a naive loop, the checked call, the quality metrics,
and one new signal used as a filter, a reward and an evaluation vote weight with no other edit."""

import contextlib
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import answers_only

from datamodules.tasks import Arithmetic
from lightning_modules.candidates import Candidates, candidate_tensors
from lightning_modules.signals import (
    AnswerEntropy,
    ClusterShare,
    DeepConf,
    DSWeight,
    GoldAnswer,
    MajorityAnswer,
    NegativeEntropy,
    SelfCertainty,
    SelfEvaluation,
    SelfRating,
    Signal,
    TokenNLL,
    VoteShare,
    score,
)
from lightning_modules.signals.judges import parse_rating
from lightning_modules.signals.quality import auroc, best_of_k, rank_weights, ranking_auc
from lightning_modules.signals.votes import answer_clusters, weighted_vote

TASK = Arithmetic(few_shot=0)


def full_logits(policy, r: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every position (no chunking, no prefix sharing) and the labels: the naive reference."""
    ids, mask, labels = candidate_tensors(r, policy.tokenizer.pad_token_id, "cpu")
    with policy.inference():
        return policy.model(input_ids=ids, attention_mask=mask).logits.float(), labels


def positions(labels: torch.Tensor, i: int) -> list[int]:
    """The positions whose distribution produced candidate i's response tokens."""
    return [t - 1 for t in range(labels.shape[1]) if labels[i, t] != -100]


# ---------------------------------------------------------------------------------------------- votes
def test_vote_signals_hand_values():
    c = answers_only([["84", "84.0", "85", None], [None, None, "7"]])
    assert MajorityAnswer()(c, None)[:4].tolist() == [1, 1, 0, 0] and MajorityAnswer()(c, None)[4:].isnan().all()
    assert VoteShare()(c, None)[:4].tolist() == pytest.approx([2 / 3] * 4)
    want = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(3)
    entropy = AnswerEntropy()(c, None)
    assert entropy[0].item() == pytest.approx(want) and entropy[4:].isnan().all()  # one parsed answer: no vote
    assert answer_clusters(c).tolist() == [0, 0, 1, -1, -1, -1, 0]


def test_majority_and_gold_on_a_hand_made_group(rollout):
    policy, r = rollout
    assert MajorityAnswer()(r, policy).tolist() == [1, 0, 1, 0, 1, 1, 0, 0]
    assert GoldAnswer()(r, policy).tolist() == [1, 0, 1, 0, 0, 0, 0, 1]


def empo_reference(answers: list[str | None]) -> list[float]:
    """EMPO's `semantic_entropy_math_reward` for one group, written as its official loop: every unparsable answer
    is the prediction '' and `verify('', x)` is False, so each is a cluster of its own; entropy over cluster shares;
    share reward below log G, else 0."""
    predictions = ["" if a is None else a for a in answers]
    ids, reps = [], []
    for p in predictions:
        k = next((k for k, r in enumerate(reps) if r != "" and p != "" and TASK.same(r, p)), None)
        if k is None:
            k = len(reps)
            reps.append(p)
        ids.append(k)
    probs = [ids.count(k) / len(ids) for k in range(len(reps))]
    total = -sum(q * math.log(q) for q in probs)
    if not total < math.log(len(ids)) - 1e-12:
        return [0.0] * len(ids)
    return [0.0 if p == "" else probs[k] for p, k in zip(predictions, ids)]


def test_cluster_share_hand_values_and_the_official_loop():
    c = answers_only([["4", "4.0", "5", None], ["1", "2", "3", None], ["1", "2", None, None]])
    got = ClusterShare()(c, None).tolist()
    assert got[:4] == [0.5, 0.5, 0.25, 0.0]
    assert got[4:8] == [0.0] * 4  # every answer different (the unparsable one its own cluster): no signal
    assert got[8:] == [0.0] * 4  # each unparsable answer its own cluster: all different (official)
    pooled = ClusterShare(unparsable="one_cluster")(c, None).tolist()
    assert pooled[8:] == [0.25, 0.25, 0.0, 0.0]  # the option: two unparsable answers form one cluster
    rng = random.Random(0)
    groups = [[rng.choice(["1", "2", "2.0", "3", None]) for _ in range(rng.randint(2, 6))] for _ in range(200)]
    c = answers_only(groups)
    want = [x for g in groups for x in empo_reference(g)]
    assert ClusterShare()(c, None).tolist() == pytest.approx(want)


def test_weighted_vote_and_best_of_k_hand_values():
    c = answers_only([["4", "5", "5", None], ["7", "8"]])
    assert weighted_vote(c, torch.ones(6)) == ["5", "7"]  # plain vote; a tie goes to the first seen
    assert weighted_vote(c, torch.tensor([3.0, 1, 1, 9, 0, 1])) == ["4", "8"]  # the unparsable one never votes
    assert weighted_vote(answers_only([[None, None]]), torch.ones(2)) == [None]
    assert best_of_k(torch.tensor([0.1, 0.9, 0.9, math.nan, math.nan, math.nan]), c.group, 2).tolist() == [1, 4]
    torch.testing.assert_close(rank_weights(torch.tensor([0.2, 0.9, 0.5, math.nan]), torch.zeros(4, dtype=torch.long),
                                            power=1.0), torch.tensor([1.0, 3.0, 2.0, 0.0]))


# ---------------------------------------------------------------------------------------------- the model's own
def test_self_certainty_and_negative_entropy_against_a_naive_loop(rollout):
    policy, r = rollout
    logits, labels = full_logits(policy, r)
    certainty, mean_neg, sum_neg = SelfCertainty()(r, policy), NegativeEntropy(unparsable_value=None)(r, policy), \
        NegativeEntropy(reduction="sum", unparsable_value=None)(r, policy)
    last2 = NegativeEntropy(last_k=2, unparsable_value=None)(r, policy)
    for i in range(len(r)):
        at = positions(labels, i)
        log_p = [logits[i, t].log_softmax(-1) for t in at]
        kl = [(-lp.mean() - math.log(logits.shape[-1])).item() for lp in log_p]
        h = [-(lp.exp() * lp).sum().item() for lp in log_p]
        assert certainty[i].item() == pytest.approx(sum(kl) / len(kl), rel=1e-4)
        assert mean_neg[i].item() == pytest.approx(-sum(h) / len(h), rel=1e-4)  # RENT: the mean
        assert sum_neg[i].item() == pytest.approx(-sum(h), rel=1e-4)  # EM-RL: the sum
        assert last2[i].item() == pytest.approx(-sum(h[-2:]) / 2, rel=1e-4)
    rent = NegativeEntropy()(r, policy)
    assert rent[3].item() == -7.0  # "no idea": RENT's fixed penalty (entropy_base 7.0)
    assert torch.equal(rent[:3], mean_neg[:3])
    lowest = NegativeEntropy(unparsable_value="lowest")(r, policy)
    assert lowest[3].item() == pytest.approx(-math.log(len(policy.tokenizer)))


def test_deepconf_against_a_naive_loop_and_hand_traces(rollout):
    policy, r = rollout
    logits, labels = full_logits(policy, r)
    signal = DeepConf(top_k=5, window=2)
    got = signal(r, policy)
    for i in range(len(r)):
        c = [-logits[i, t].log_softmax(-1).topk(5).values.mean().item() for t in positions(labels, i)]
        groups = [sum(c[j : j + 2]) / 2 for j in range(len(c) - 1)] or [sum(c) / len(c)]
        assert got[i].item() == pytest.approx(min(groups), rel=1e-4)
    trace = torch.tensor([3.0, 1.0, 2.0, 4.0, 5.0])
    assert DeepConf(window=2).trace_score(trace) == pytest.approx(1.5)  # lowest of (2, 1.5, 3, 4.5)
    assert DeepConf(window=2, reduce="tail").trace_score(trace) == pytest.approx(4.5)
    assert DeepConf(window=2, reduce="mean").trace_score(trace) == pytest.approx(3.0)
    assert DeepConf(window=9).trace_score(trace) == pytest.approx(3.0)  # shorter than the window: one group
    assert DeepConf(window=2, reduce="bottom", bottom_percent=0.5).trace_score(trace) == pytest.approx(1.75)
    assert DeepConf(window=2, reduce="bottom").trace_score(trace) == pytest.approx(1.5)  # at least one group
    sampled = DeepConf(top_k=5, window=2, include_sampled=True)(r, policy)
    stored = []  # the sampled tokens' log-probs, as sampling stores them
    for i in range(len(r)):  # the sampled token joins the k when it is not among them: k + 1 values
        c = []
        stored.append([logits[i, t].log_softmax(-1)[labels[i, t + 1]].item() for t in positions(labels, i)])
        for t in positions(labels, i):
            lp, y = logits[i, t].log_softmax(-1), labels[i, t + 1]
            top = lp.topk(5).values
            c.append(-(top.sum() + lp[y]).item() / 6 if lp[y] < top[-1] else -top.mean().item())
        groups = [sum(c[j : j + 2]) / 2 for j in range(len(c) - 1)] or [sum(c) / len(c)]
        assert sampled[i].item() == pytest.approx(min(groups), rel=1e-4)
    from_stored = DeepConf(top_k=5, window=2, include_sampled=True)(replace(r, logprobs=stored), policy)
    assert from_stored.tolist() == pytest.approx(sampled.tolist(), rel=1e-4)  # no second pass for stored log-probs


def test_token_nll_from_stored_log_probs_equals_the_teacher_forced_pass(tiny_model_dir):
    from datamodules.generation import sample
    from lightning_modules.policy import Policy

    policy = Policy(tiny_model_dir)
    task = Arithmetic(few_shot=1)
    candidates = sample(policy, task.load("test", 3), task, n=2, temperature=1.0, max_new_tokens=6, progress=False)
    stored = TokenNLL()(candidates, policy)
    assert stored.tolist() == pytest.approx([-sum(lp) / len(lp) for lp in candidates.logprobs])
    forced = TokenNLL()(replace(candidates, logprobs=None), policy)
    torch.testing.assert_close(stored, forced, rtol=1e-4, atol=1e-4)


def test_judges_and_their_ranges(rollout):
    policy, r = rollout
    prob = SelfEvaluation()(r, policy)
    assert prob.shape == (8,) and ((prob >= 0) & (prob <= 1)).all()
    assert set(SelfEvaluation(mode="sampled")(r, policy).tolist()) <= {0.0, 1.0}
    rating = SelfRating()(r, policy)
    assert ((rating >= 0) & (rating <= 10)).all()
    torch.testing.assert_close(SelfRating(scale=True)(r, policy), rating / 10)
    assert parse_rating("Score: 7") == 7 and parse_rating("I'd say score : 12/10") == 10
    assert parse_rating("maybe 3 out of 10") == 3 and parse_rating("no idea") == 0 and parse_rating("Score: -2") == 0
    assert parse_rating("5", low=1, high=10) == 5 and parse_rating("none", low=1, high=10) == 1


@contextlib.contextmanager
def adapter_moved(policy):
    """The adapter's B matrices (zero at the start) set to random values, as training would move them; restored
    after, the tiny policy being shared."""
    saved = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_B" in n}
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n in saved:
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


def test_the_initial_judge_ignores_the_adapter(rollout):
    policy, r = rollout
    before = {j: SelfEvaluation(judge=j)(r, policy) for j in ("initial", "current")}
    with adapter_moved(policy):
        assert torch.equal(SelfEvaluation(judge="initial")(r, policy), before["initial"])
        assert not torch.equal(SelfEvaluation(judge="current")(r, policy), before["current"])


def test_ds_weight_without_its_valid_set_names_the_settings():
    with pytest.raises(ValueError, match="DSWeight has no valid set: give DSWeight.valid_questions"):
        DSWeight().check()
    with pytest.raises(ValueError, match="valid_questions must be at least 1"):
        DSWeight(valid_questions=0)


def test_ds_weight_cache_is_keyed_by_the_initial_weights_the_texts_and_the_settings(rollout, tmp_path, monkeypatch):
    import lightning_modules.signals.ds_weight as module

    policy, r = rollout

    def signal(**kwargs):
        ds = DSWeight(valid_questions=1, **kwargs)
        ds.use_labeled(r.questions[:1], r.tasks[0])
        return ds

    expected, expected_clipped = signal()(r, policy), signal(clip_like_reference=True)(r, policy)
    assert torch.equal(signal(cache_dir=str(tmp_path))(r, policy), expected)
    assert len(list(tmp_path.glob("ds_losses-*.pt"))) == 2  # the valid set's losses and the candidates'

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(module, "sample_losses", no_scoring)
    assert torch.equal(signal(cache_dir=str(tmp_path))(r, policy), expected)  # read back, bit for bit
    assert torch.equal(signal(cache_dir=str(tmp_path), clip_like_reference=True)(r, policy), expected_clipped)
    for other in (dict(tokens="completion"), dict(batch_size=3)):  # another setting: another key
        with pytest.raises(AssertionError, match="scored again"):
            signal(cache_dir=str(tmp_path), **other)(r, policy)
    with pytest.raises(AssertionError, match="scored again"):  # other texts
        signal(cache_dir=str(tmp_path))(replace(r, texts=[t + "!" for t in r.texts]), policy)

    initial, current = policy.fingerprint(initial=True), policy.fingerprint()
    with adapter_moved(policy):  # training moves the adapter, not the model that judges
        assert policy.fingerprint(initial=True) == initial and policy.fingerprint() != current


# ---------------------------------------------------------------------------------------------- the checked call
class Length(Signal):
    """A signal defined here, in one class: shorter answers score higher. Usable everywhere with no other edit."""

    higher_is_better = False
    calls: list[int] = []

    def forward(self, candidates, policy):
        Length.calls.append(len(candidates))
        return torch.tensor([float(len(t)) for t in candidates.texts])


def test_score_checks_length_and_values_and_scores_only_what_is_asked(rollout):
    policy, r = rollout
    Length.calls = []
    got = score(Length(), r, policy, where=torch.tensor([True, False] * 4))
    assert Length.calls == [4] and got[1::2].isnan().all() and got[0].item() == len(r.texts[0])

    class Short(Signal):
        def forward(self, candidates, policy):
            return torch.zeros(len(candidates) - 1)

    class Broken(Signal):
        def forward(self, candidates, policy):
            return torch.tensor([0.0, math.nan] + [0.0] * (len(candidates) - 2))

    with pytest.raises(ValueError, match=r"signal short returned \(6,\) for 7 candidates"):  # 7 distinct answers
        score(Short(), r, policy)
    with pytest.raises(ValueError, match="signal broken returned 1 non-finite values .first at candidate 1"):
        score(Broken(), r, policy)
    assert score(MajorityAnswer(), replace(r, answers=[None] * 7 + ["1"]), policy).isnan().all()  # abstains: fine


def test_score_scores_each_distinct_answer_of_a_question_once(rollout):
    """Question 1's "The answer is 7." twice: a deterministic signal sees it once and both get its value; a
    sampling judge (not deterministic) sees every candidate; the same text under another question is its own."""
    policy, r = rollout
    Length.calls = []
    got = score(Length(), r, policy)
    assert Length.calls == [7] and got.tolist() == [float(len(t)) for t in r.texts]

    class Drawn(Length):
        deterministic = False

    Length.calls = []
    score(Drawn(), r, policy)
    assert Length.calls == [8]
    same_text = replace(r, texts=[r.texts[4]] * 8, response_ids=[r.response_ids[4]] * 8, answers=[r.answers[4]] * 8)
    Length.calls = []
    score(Length(), same_text, policy)
    assert Length.calls == [2]  # one per question
    Length.calls = []
    score(Length(), replace(same_text, answers=["1", "2"] * 4), policy)  # same text, other answers: not the same
    assert Length.calls == [4]


# ---------------------------------------------------------------------------------------------- quality metrics
def test_auroc_and_ranking_auc_against_naive_pair_counts():
    gen = torch.Generator().manual_seed(0)
    values, correct = torch.randint(0, 5, (60,), generator=gen).float(), torch.rand(60, generator=gen) < 0.4
    values[3] = math.nan
    group = torch.arange(60) // 6
    has = [i for i in range(60) if not math.isnan(values[i])]
    pairs = [(i, j) for i in has for j in has if correct[i] and not correct[j]]
    naive = sum(float(values[i] > values[j]) + 0.5 * float(values[i] == values[j]) for i, j in pairs) / len(pairs)
    assert auroc(values, correct) == pytest.approx(naive)
    within = [(i, j) for i in range(60) for j in range(60) if group[i] == group[j] and correct[i] and not correct[j]]
    v = values.nan_to_num(float("-inf"))
    naive = sum(float(v[i] > v[j]) + 0.5 * float(v[i] == v[j]) for i, j in within) / len(within)
    assert ranking_auc(values, correct, group) == pytest.approx(naive)


# ---------------------------------------------------------------------------------------------- three uses, no edit
def test_a_new_signal_is_a_filter_a_reward_and_a_vote_weight(tiny_model_dir, tmp_path):
    import lightning as L

    from callbacks.task_evaluation import TaskEvaluation
    from datamodules.questions import QuestionDataModule
    from datamodules.selection import PercentileFilter
    from datamodules.self_generated import SelfGeneratedDataModule
    from lightning_modules.policy import Policy
    from lightning_modules.rl import SelfRewardRLModule
    from lightning_modules.sft import WeightedSFTModule

    def trainer(**kwargs):
        return L.Trainer(default_root_dir=tmp_path, enable_progress_bar=False, limit_val_batches=0,
                         logger=L.pytorch.loggers.TensorBoardLogger(tmp_path), **kwargs)

    # selection: the shorter half of the candidates
    data = SelfGeneratedDataModule(Arithmetic(few_shot=1), [PercentileFilter(Length(), keep=0.5)], num_questions=4,
                                   n=4, temperature=1.0, max_new_tokens=8, tokenizer=tiny_model_dir, batch_size=4)
    fit = trainer(max_epochs=1)
    fit.fit(WeightedSFTModule(Policy(tiny_model_dir), export_adapter=False), data)
    rows = [json.loads(x) for x in (Path(fit.log_dir) / "round-0" / "selected.jsonl").read_text().splitlines()]
    lengths = data.reports[0].signals["length"]
    assert len(rows) == data.reports[0].kept >= 8 and all(r["length"] <= lengths.median() for r in rows)
    # RL: the reward
    module = SelfRewardRLModule(Policy(tiny_model_dir), [Length()], max_new_tokens=6)
    trainer(max_steps=1).fit(module, QuestionDataModule(Arithmetic(), num_questions=2, batch_size=2,
                                                         tokenizer=tiny_model_dir))
    assert "reward/length_mean" in module.trainer.callback_metrics
    # evaluation: a vote weighted by it and its best-of-k pick
    evaluation = TaskEvaluation(Arithmetic(), num_questions=3, k=4, max_new_tokens=6, signals=[Length()])
    task = Arithmetic()
    rows = evaluation.evaluate(Policy(tiny_model_dir), task, task.load("test", 3)).rows
    assert {"vote/length", "best/length"} <= set(rows[0])
    assert {"vote@4/length", "best@4/length"} <= set(evaluation._metrics(rows, torch.device("cpu")))


def test_a_vote_weighted_by_the_values_themselves(rollout):
    from lightning_modules.evaluation import judge_samples

    policy, r = rollout

    class Confidence(Signal):
        judge, deterministic = "none", False  # values by position, not by answer

        def forward(self, candidates, policy):
            return torch.tensor([5.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 3.0])

    judged = judge_samples(r, policy, [Confidence()], vote_weighting="value")["confidence"]
    assert judged["vote"] == [r.answers[0], r.answers[7]]  # 5 vs 0 for "3"; gold's 3 beats 7's 1 + 1
    assert judge_samples(r, policy, [Confidence()])["confidence"]["vote"][1] == "7"  # Borda ranks: 7 wins
    with pytest.raises(ValueError, match="needs a higher-is-better signal with non-negative values; length"):
        judge_samples(r, policy, [Length()], vote_weighting="value")


@pytest.mark.slow  # an end-to-end run of more than 5 s
def test_the_signal_quality_report_end_to_end(tiny_cli, tmp_path):
    cli = tiny_cli("configs/eval/signals.yaml", "--data.init_args.num_questions=4", "--data.init_args.batch_size=4",
                   "--data.init_args.task.init_args.unfinished=read",  # the tiny model never finishes an answer
                   subcommand="test", run=True)
    run = Path(cli.trainer.log_dir)
    report = json.loads((run / "signal_quality.json").read_text())
    names = ["majority_answer", "cluster_share", "answer_entropy", "token_nll", "self_certainty", "negative_entropy",
             "deep_conf", "self_evaluation", "self_rating", "ds_weight"]
    assert set(names) <= set(report) and report["baselines"]["questions"] == 4 and report["baselines"]["k"] == 8
    assert all((run / f"signal_quality-{n}.png").stat().st_size > 1000 for n in names)
    table = (run / "signal_quality.md").read_text()
    assert all(f"| {n} |" in table for n in names)
    assert len((run / "signal_quality.jsonl").read_text().splitlines()) == 4


def test_the_signal_quality_report_stops_after_the_first_batch_when_nothing_parses(tiny_cli, monkeypatch):
    """A model none of whose answers can be read (the tiny model's, read as unreadable): the report says so with the
    figures after the first test batch, not after all the sampling."""
    from lightning_modules import evaluation

    chunks = []
    original = evaluation.sample

    def unreadable(*args, **kwargs):
        out = original(*args, **kwargs)
        chunks.extend([1] * (args[3].n > 1))  # the sampled answers' calls, not the greedy ones
        return replace(out, answers=[None] * len(out))

    monkeypatch.setattr(evaluation, "sample", unreadable)
    readable = r"no question among the first 32 has two readable answers \(parse rate 0/256; \d+ answers hit"
    with pytest.raises(ValueError, match=readable):
        tiny_cli("configs/eval/signals.yaml", "--data.init_args.num_questions=64", "--data.init_args.batch_size=32",
                 subcommand="test", run=True)
    assert len(chunks) == 1  # 64 questions are 2 test batches of 32: it stopped after the first
