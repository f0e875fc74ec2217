"""The TTA methods as objects: their maths against hand values and naive loops, predictions made before the
update, the level and optimizer checks, and resets inside a real fit."""

import contextlib
import math
from dataclasses import replace

import pytest
import torch
from tiny import ROOT

from datamodules.tasks import Comparison
from lightning_modules.losses.functional import entropy
from lightning_modules.optim.sam import SAM
from lightning_modules.tta import (
    ROID,
    SAR,
    TLM,
    BatchCalibration,
    InfoMax,
    LabelView,
    NoAdaptation,
    PseudoLabel,
    Tent,
    TestTimeAdaptationModule,
)
from lightning_modules.tta.infomax import information_maximisation
from lightning_modules.tta.tlm import tlm_loss


class NoOptions(Comparison):
    """Comparison with the two numbers in the question text: no options to rotate (exemplars only)."""

    def make(self, split, n):
        return [replace(q, question=f"Which is larger, {q.options[0]} or {q.options[1]}?", options=None)
                for q in super().make(split, n)]


def test_information_maximisation_hand_value_and_naive_loop():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # p = (.5, .5), (.75, .25)
    loss, per_sample, diversity = information_maximisation(logits, eps=0.0)
    h = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    assert per_sample.item() == pytest.approx((h([0.5, 0.5]) + h([0.75, 0.25])) / 2)
    assert diversity.item() == pytest.approx(h([0.625, 0.375]))
    assert loss.item() == pytest.approx(0.627741 - 0.661563, abs=1e-5)
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)) * 2
    probs = logits.softmax(-1).tolist()
    naive_ent = sum(-sum(p * math.log(p + 1e-5) for p in row) for row in probs) / 6
    mean = [sum(row[c] for row in probs) / 6 for c in range(3)]
    naive = naive_ent + sum(m * math.log(m + 1e-5) for m in mean)  # SHOT's code: eps inside both logs
    assert information_maximisation(logits)[0].item() == pytest.approx(naive, abs=1e-6)


@pytest.mark.parametrize("average", ["log_probs", "probs"])
def test_batch_calibration_hand_case_and_naive_loop(average):
    # both reviews lean to class 0, but the second less than the batch does: calibration flips it
    log_q = torch.tensor([[math.log(0.9), math.log(0.1)], [math.log(0.6), math.log(0.4)]])
    assert log_q.argmax(-1).tolist() == [0, 0]
    assert BatchCalibration(average).decide(log_q).tolist() == [0, 1]
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)) * 2
    q = logits.softmax(-1).tolist()
    if average == "log_probs":
        prior = [sum(math.log(row[c]) for row in q) / 8 for c in range(3)]
    else:
        prior = [math.log(sum(row[c] for row in q) / 8) for c in range(3)]
    naive = [max(range(3), key=lambda c, row=row: math.log(row[c]) - prior[c]) for row in q]
    assert BatchCalibration(average).decide(logits).tolist() == naive


def test_tlm_loss_hand_values_and_naive_loop():
    ce = torch.tensor([2.0, 4.0, 5.0], requires_grad=True)
    loss, mask = tlm_loss(ce, ce.detach())
    assert mask.tolist() == [False, True, True]
    assert loss.item() == pytest.approx((0.1 * math.e * 4 + 0.1 * math.e ** 2 * 5) / 2)
    loss.backward()
    assert ce.grad.tolist() == pytest.approx([0.0, 0.1 * math.e / 2, 0.1 * math.e ** 2 / 2])
    nothing, mask = tlm_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    assert nothing.item() == 0.0 and not mask.any()  # no item passes P0: the masked mean is 0 (official)
    gen = torch.Generator().manual_seed(2)
    ce, select = torch.rand(7, generator=gen) * 6, torch.rand(7, generator=gen) * 6
    kept = [i for i in range(7) if select[i] > 3]
    naive = sum(0.1 * math.exp(select[i] - 3) * ce[i] for i in kept) / len(kept)
    assert tlm_loss(ce, select)[0].item() == pytest.approx(float(naive), rel=1e-6)


class _StubPolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.in_reference = False

    @contextlib.contextmanager
    def reference(self):
        self.in_reference = True
        yield self
        self.in_reference = False


def test_tlm_selects_with_the_frozen_model_offline_and_the_current_one_online():
    policy = _StubPolicy()

    class View:
        level, policy_ = "token", policy

        def __init__(self):
            self.policy = policy

        def predictions(self):
            return None

        def input_nll(self):  # the frozen model finds item 0 hard, the adapted one item 1
            return policy.w * (torch.tensor([4.0, 1.0, 1.0]) if policy.in_reference else torch.tensor([1.0, 4.0, 1.0]))

    for reference, kept in (("offline", 0), ("online", 1)):
        policy.w.data.fill_(1.0)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        _, metrics = TLM(reference=reference).adapt(View(), opt)
        assert metrics["kept_fraction"].item() == pytest.approx(1 / 3)
        assert policy.w.grad.nonzero().flatten().tolist() == [kept]


def test_tent_token_loss_is_the_mean_of_each_answers_token_mean():
    w = torch.nn.Parameter(torch.ones(()))
    ent = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    at = torch.tensor([[False, True, True, False], [False, True, False, False]])

    class View:
        level, answers = "token", "greedy answers"

        def token_entropy(self, candidates):
            assert candidates == "greedy answers"
            return ent * w, at

    _, metrics = Tent().adapt(View(), torch.optim.SGD([w], lr=0.0))
    assert metrics["loss"].item() == pytest.approx(((1 + 2) / 2 + 3) / 2)  # EM-FT: each answer's mean, then the mean
    _, metrics = Tent(average="tokens").adapt(View(), torch.optim.SGD([w], lr=0.0))
    assert metrics["loss"].item() == pytest.approx((1 + 2 + 3) / 3)  # the option: every token of the batch
    at[1] = False  # an empty answer is left out of the mean
    _, metrics = Tent().adapt(View(), torch.optim.SGD([w], lr=0.0))
    assert metrics["loss"].item() == pytest.approx((1 + 2) / 2)


def test_pseudo_label_trains_on_one_majority_answer_per_question(rollout):
    policy, candidates = rollout  # question 0: gold, 3, gold, unparsable -> majority gold; question 1: 7, 7, 8, gold
    w = torch.nn.Parameter(torch.ones(()))
    seen = {}

    class View:
        level = "token"

        def __init__(self):
            self.policy = policy

        def sample(self, n, temperature, generator):
            assert (n, temperature) == (4, 0.7)
            return candidates

        def response_nll(self, targets):
            seen["texts"] = targets.texts
            nll = torch.tensor([[1.0, 3.0], [2.0, 0.0]]) * w
            return nll, torch.tensor([[True, True], [True, False]])

    _, metrics = PseudoLabel().adapt(View(), torch.optim.SGD([w], lr=0.0))
    assert seen["texts"] == [candidates.texts[0], "The answer is 7."]  # the first answer agreeing with each majority
    assert metrics["kept_fraction"].item() == 1.0
    assert metrics["loss"].item() == pytest.approx((2.0 + 2.0) / 2)  # each target's mean token NLL, then the mean


@pytest.fixture(scope="module")
def label_batch(tiny_model_dir):
    from datamodules.stream import StreamDataModule
    from datamodules.tasks import Comparison

    dm = StreamDataModule(Comparison(), num_questions=8, batch_size=8, tokenizer=tiny_model_dir)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("method", [Tent(), InfoMax(), ROID(), SAR(margin_factor=1.0), TLM(threshold=0.0),
                                    BatchCalibration(), NoAdaptation()], ids=lambda m: type(m).__name__)
def test_predictions_reported_are_those_made_before_the_update(method, tiny_model_dir, label_batch):
    from lightning_modules.policy import Policy

    policy = Policy(tiny_model_dir, adapt="norm")
    method.attach({n: p for n, p in policy.model.named_parameters() if p.requires_grad})
    with torch.no_grad():
        before = LabelView(policy, label_batch).logits()
    params = policy.trainable_parameters()
    start = [p.detach().clone() for p in params]
    opt = SAM(params, lr=10.0) if isinstance(method, SAR) else torch.optim.SGD(params, lr=10.0)
    predictions, _ = method.adapt(LabelView(policy, label_batch), opt)
    torch.testing.assert_close(predictions, before, rtol=0, atol=0)
    moved = any(not torch.equal(a, p) for a, p in zip(start, params))
    assert moved == (not isinstance(method, BatchCalibration | NoAdaptation))
    with torch.no_grad():
        after = LabelView(policy, label_batch).logits()
    assert moved == (not torch.equal(after, before))


def test_a_method_is_refused_at_a_level_it_does_not_support(tiny_model_dir):
    from lightning_modules.policy import Policy

    policy = Policy(tiny_model_dir, adapt="norm")
    with pytest.raises(ValueError, match="ROID adapts at the label level, not level='token'"):
        TestTimeAdaptationModule(policy, ROID(), level="token")
    with pytest.raises(ValueError, match="PseudoLabel adapts at the token level"):
        TestTimeAdaptationModule(policy, PseudoLabel())
    with pytest.raises(TypeError, match="SAR's update is two-pass"):
        SAR().check(torch.optim.SGD(policy.trainable_parameters(), lr=1.0))
    with pytest.raises(TypeError, match="Tent makes plain steps"):
        Tent().check(SAM(policy.trainable_parameters(), lr=1.0))
    for level, expected in (("label", SAR(margin_factor=0.4)), ("token", SAR(percentile=50))):
        class View:
            num_classes = 4
        View.level = level
        e0 = expected.margin(View(), torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")]))
        assert e0 == pytest.approx(0.4 * math.log(4) if level == "label" else 2.5)  # token: the batch's median


def _cli(config, tiny_model_dir, tmp_path, monkeypatch, *extra, task="Comparison"):
    from tiny import tiny_args

    from lightning_modules.cli import build_cli

    monkeypatch.chdir(ROOT)
    return build_cli(tiny_args(f"configs/tta/{config}", tiny_model_dir, tmp_path, "--data.init_args.num_questions=12",
                               "--data.init_args.batch_size=4", f"--data.init_args.tasks=datamodules.tasks.{task}",
                               *extra), run=False)


def test_a_stream_without_verbalizers_is_refused_at_the_label_level_naming_the_task(
        tiny_model_dir, tmp_path, monkeypatch):
    cli = _cli("tent.yaml", tiny_model_dir, tmp_path, monkeypatch, task="Arithmetic")
    with pytest.raises(ValueError, match="level: label adapts on a classification stream, but task 'arithmetic' has "
                                         "no verbalizers"):
        cli.trainer.fit(cli.model, cli.datamodule)


@pytest.mark.parametrize("like_reference", [False, True])
def test_sar_resets_inside_a_real_fit(like_reference, tiny_model_dir, tmp_path, monkeypatch):
    cli = _cli("sar.yaml", tiny_model_dir, tmp_path, monkeypatch,
               "--model.init_args.method.init_args.margin_factor=1.0",
               "--model.init_args.method.init_args.reset_below=100.0",  # any EMA is below it: reset after each step
               f"--model.init_args.method.init_args.like_reference={like_reference}")
    source = {n: p.detach().clone() for n, p in cli.model.policy.model.named_parameters() if p.requires_grad}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.model.reset_steps == [1, 2, 3]  # three steps, each followed by a reset
    assert cli.trainer.callback_metrics["tta/resets"] == 3
    for n, p in cli.model.policy.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), source[n])  # the reset target is the source model
    assert (cli.model.method.ema is None) != like_reference  # the reference's reset keeps the EMA


def test_episodic_reset_every_batch_inside_a_real_fit(tiny_model_dir, tmp_path, monkeypatch):
    cli = _cli("tent.yaml", tiny_model_dir, tmp_path, monkeypatch,
               "--model.init_args.reset_every=2")
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.model.reset_steps == [2]  # after the second of three batches


def test_online_accuracy_counts_every_item_of_the_stream(tiny_model_dir, tmp_path, monkeypatch):
    cli = _cli("batch_calibration.yaml", tiny_model_dir, tmp_path, monkeypatch,
               "--data.init_args.num_questions=10")
    cli.trainer.fit(cli.model, cli.datamodule)  # batches of 4, 4, 2
    assert cli.model.online_accuracy.weight.item() == 10  # every item once, the partial batch included
    metrics = cli.trainer.callback_metrics
    assert metrics["tta/online_accuracy"] == metrics["tta/source_accuracy"]  # no update: the same predictions
    outcomes = cli.model.outcomes
    assert len(outcomes) == 10 and metrics["tta/online_accuracy"].item() == pytest.approx(sum(outcomes) / 10)
    assert entropy(torch.zeros(2)).item() == pytest.approx(math.log(2))  # uniform over 2 classes


def test_the_one_padding_helper_pads_right_or_left_and_places_the_targets():
    from lightning_modules.batching import pad
    from lightning_modules.losses.functional import IGNORE_INDEX as X

    ids, mask, labels = pad([[5, 6, 7], [8]], pad_token_id=0, targets_from=[1, 0])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[X, 6, 7], [8, X, X]]
    ids, mask, labels = pad([[5, 6, 7], [8]], pad_token_id=0, left=True, targets_from=[2, 0])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert labels.tolist() == [[X, X, 7], [X, X, 8]]
    assert (pad([[1], [2, 3]], 0)[2] == X).all()  # no targets: every label ignored


def test_symmetric_cross_entropy_hand_value_and_naive_loop():
    from lightning_modules.losses.functional import symmetric_cross_entropy

    x, ref = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])  # p = (.5, .5), p_ref = (.75, .25)
    hand = -0.5 * math.log(0.5) - 0.25 * (math.log(0.75) + math.log(0.25))
    assert symmetric_cross_entropy(x, ref).item() == pytest.approx(hand, abs=1e-6)
    gen = torch.Generator().manual_seed(3)
    x, ref = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    p, q = x.softmax(-1).tolist(), ref.softmax(-1).tolist()
    naive = [-(0.7 * sum(q[i][c] * math.log(p[i][c]) for c in range(3))
               + 0.3 * sum(p[i][c] * math.log(q[i][c]) for c in range(3))) for i in range(5)]
    assert symmetric_cross_entropy(x, ref, alpha=0.3).tolist() == pytest.approx(naive, abs=1e-5)


def test_text_views_rotate_options_or_reverse_exemplars_and_map_back(tiny_model_dir, label_batch):
    from datamodules.stream import StreamDataModule
    from lightning_modules.policy import Policy

    tok = Policy(tiny_model_dir).tokenizer
    original = tok.decode(label_batch["input_ids"][0][label_batch["attention_mask"][0] == 1])
    view = tok.decode(label_batch["view_input_ids"][0][label_batch["view_attention_mask"][0] == 1])
    q = label_batch["questions"][0]
    assert f"(A) {q.options[0]} (B) {q.options[1]}" in original and f"(A) {q.options[1]} (B) {q.options[0]}" in view
    assert label_batch["view_perm"][0].tolist() == [1, 0]  # the view's A is the item's B
    policy = Policy(tiny_model_dir, adapt="norm")
    with torch.no_grad():
        mapped = LabelView(policy, label_batch).view_logits()
        raw = LabelView(policy, {**label_batch, "input_ids": label_batch["view_input_ids"],
                                 "attention_mask": label_batch["view_attention_mask"]}).logits()
    torch.testing.assert_close(mapped, raw.flip(-1))
    shots = StreamDataModule(NoOptions(few_shot=2), num_questions=4, tokenizer=tiny_model_dir)
    shots.setup("fit")
    item = shots.items[0]
    assert item["view_perm"] == [0, 1] and item["view_ids"] != item["ids"] and shots.view_problem is None
    zero = StreamDataModule(NoOptions(few_shot=0), num_questions=4, tokenizer=tiny_model_dir)
    zero.setup("fit")
    assert "'comparison' has neither options" in zero.view_problem and "view_input_ids" not in next(
        iter(zero.train_dataloader()))


def test_roid_consistency_adds_the_weighted_symmetric_cross_entropy(tiny_model_dir, label_batch):
    from lightning_modules.losses.functional import symmetric_cross_entropy
    from lightning_modules.policy import Policy

    policy = Policy(tiny_model_dir, adapt="norm")
    with torch.no_grad():
        view = LabelView(policy, label_batch)
        logits, view_logits = view.logits(), view.view_logits()
        plain, metrics = ROID().loss(logits)
        both, _ = ROID(consistency=True).loss(logits, view_logits)
    weights = metrics["weights"]
    keep = weights > 0
    extra = (symmetric_cross_entropy(view_logits, logits) * weights)[keep].sum() / len(logits)
    torch.testing.assert_close(both, plain + extra)
    assert extra > 0 and ROID(consistency=True).needs_views and not ROID().needs_views


def test_roid_consistency_refuses_a_stream_without_text_views(tiny_model_dir):
    import lightning as L

    from datamodules.stream import StreamDataModule
    from lightning_modules.policy import Policy

    module = TestTimeAdaptationModule(Policy(tiny_model_dir, adapt="norm"), ROID(consistency=True))
    stream = StreamDataModule(NoOptions(few_shot=0), num_questions=4, tokenizer=tiny_model_dir)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="ROID compares each item with a text view of it, but task 'comparison' has "
                                         "neither options"):
        trainer.fit(module, stream)
