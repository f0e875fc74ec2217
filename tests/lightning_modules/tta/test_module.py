"""Test-time adaptation: the SAR step on a small torch model, resets, weight ensembling, the methods' maths, and fits
on the tiny LM (label level, and token level on an open-ended stream)."""

import copy

import lightning as L
import pytest
import torch
from tiny import ROOT

from lightning_modules.losses.functional import entropy, prior_correction
from lightning_modules.optim.sam import SAM
from lightning_modules.tta import ROID, SAR, sar_adapt_step


def _linear_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.mul_(3)  # confident enough that some, not all, entropies are below 0.4 ln 3
    x = torch.randn(16, 4) * 2
    return model, x


def test_sar_step_matches_a_hand_written_two_pass_update():
    model, x = _linear_problem()
    ref = torch.nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    margin = 0.4 * torch.log(torch.tensor(3.0)).item()
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
    first, ema = sar_adapt_step(lambda: entropy(model(x)), opt, margin, None)

    # by hand
    params = list(ref.parameters())
    ent = entropy(ref(x))
    s1 = ent < margin
    grads = torch.autograd.grad(ent[s1].mean(), params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(0.05 * g / (norm + 1e-12))
    ent2 = entropy(ref(x))
    s2 = s1 & (ent2 < margin)
    loss2 = ent2[s2].mean()
    grads2 = torch.autograd.grad(loss2, params)
    with torch.no_grad():
        for p, g, g2 in zip(params, grads, grads2):
            p.sub_(0.05 * g / (norm + 1e-12))  # back to theta
            p.sub_(0.1 * g2)  # SGD's first step: the momentum buffer is the gradient itself
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), q.detach())
    assert ema == pytest.approx(loss2.item())
    assert 0 < s2.sum() <= s1.sum() < 16  # the reliable filter left some samples out
    assert not first.requires_grad

    seen = []

    def recording():
        out = entropy(model(x))
        seen.append(out.detach())
        return out

    _, ema2 = sar_adapt_step(recording, opt, margin, ema)
    first, second = seen
    s1 = first < margin
    loss2 = second[s1 & (second < margin)].mean().item()
    assert ema2 == pytest.approx(0.9 * ema + 0.1 * loss2)


def test_sar_step_with_no_reliable_sample_changes_nothing_and_is_not_nan():
    model, x = _linear_problem()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9)
    first, ema = sar_adapt_step(lambda: entropy(model(x)), opt, margin=0.0, ema=None)  # entropy is never < 0
    assert ema is None and torch.isfinite(first).all()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # reliable in the first pass but not the second: the perturbation is undone, no update
    calls = []

    def logits_fn():
        calls.append(1)
        return entropy(torch.tensor([[5.0, 0.0, 0.0]]) * (1 if len(calls) == 1 else 0) + model(x[:1]) * 0)
    _, ema = sar_adapt_step(logits_fn, opt, margin=0.5, ema=None)
    assert ema is None and len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _attached(method, **params):
    """The method attached to plain parameters (what the module hands it: the policy's trainable ones)."""
    named = {n: torch.nn.Parameter(v.clone()) for n, v in params.items()}
    method.attach(named)
    return method, named


def test_reset_restores_parameters_optimizer_and_method_state_bit_exactly():
    roid, params = _attached(ROID(), w=torch.ones(3))
    opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    initial = copy.deepcopy(opt.state_dict())
    for _ in range(2):
        opt.zero_grad()
        (params["w"] ** 3).sum().backward()
        opt.step()
        roid.loss(torch.randn(4, 2))
    assert not torch.equal(params["w"].detach(), torch.ones(3)) and opt.state and roid.class_probs_ema.numel()
    roid.reset(opt)
    assert torch.equal(params["w"].detach(), torch.ones(3)) and not opt.state
    assert opt.state_dict() == initial  # the state of a fresh optimizer, learning rate kept
    assert roid.class_probs_ema.numel() == 0  # pi_bar back to its start (uniform on next use)


def test_sar_reset_like_reference_keeps_the_ema_and_the_momentum():
    """SAR's official reset: weights back, the EMA and the base optimizer's momentum buffers left in place, so
    resets repeat while the EMA stays low (SPEC §5.3)."""
    runs = {}
    for like_reference in (False, True):
        sar, params = _attached(SAR(reset_below=0.2, like_reference=like_reference), w=torch.ones(3))
        opt = SAM(params.values(), lr=0.1, momentum=0.9)
        w = params["w"]

        def cubic(w=w):
            loss = (w ** 3).sum()
            loss.backward()
            return loss

        opt.zero_grad()
        cubic()
        opt.step(closure=cubic)
        sar.update_ema(0.1)
        assert sar.should_reset()
        sar.reset(opt)
        runs[like_reference] = (sar.ema, opt.base_optimizer.state, params["w"].detach().clone())
    assert runs[False][0] is None and not runs[False][1]  # clean: EMA and momentum gone
    assert runs[True][0] == 0.1 and "momentum_buffer" in next(iter(runs[True][1].values()))  # both survive
    assert torch.equal(runs[False][2], torch.ones(3)) and torch.equal(runs[True][2], torch.ones(3))


def test_roid_predictions_use_the_reference_prior_correction_on_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3, generator=gen) * 3
    on_logits = prior_correction(logits, on_logits=True).argmax(-1)
    on_probs = prior_correction(logits.softmax(-1)).argmax(-1)
    assert not torch.equal(on_logits, on_probs)  # the two readings differ on this batch
    assert torch.equal(ROID().decide(logits), on_logits)
    assert torch.equal(ROID(prior_correction_on="probabilities").decide(logits), on_probs)
    assert torch.equal(ROID(prior_correction=False).decide(logits), logits.argmax(-1))
    partial = logits[:4]
    own, configured = ROID().loss(partial)[0], ROID(batch_size=16).loss(partial)[0]
    torch.testing.assert_close(configured, own * 4 / 16)  # the reference divides a partial batch by 16


def test_sar_ema_rule_absolute_and_relative():
    absolute, relative = SAR(reset_below=0.2), SAR(reset_below=None, relative=0.5)
    for sar in (absolute, relative):
        sar.update_ema(0.3)
    assert not absolute.should_reset() and not relative.should_reset()
    for sar in (absolute, relative):
        sar.update_ema(0.14)
    assert absolute.should_reset() and relative.should_reset()


@pytest.mark.parametrize("adapt", ["lora", "norm"])
def test_weight_ensembling(adapt):
    params = {"lora_A": torch.full((2,), 5.0), "lora_B": torch.zeros(2)} if adapt == "lora" else {"w": torch.ones(3)}
    roid, named = _attached(ROID(momentum_src=0.99), **params)
    with torch.no_grad():
        for p in named.values():
            p.fill_(3.0 if adapt == "norm" else p.item() if p.numel() == 1 else 2.0)
    roid.ensemble()
    if adapt == "lora":
        torch.testing.assert_close(named["lora_B"].detach(), torch.full((2,), 1.98))  # B A shrinks by 0.99
        assert torch.equal(named["lora_A"].detach(), torch.full((2,), 2.0))  # A is left alone
    else:
        torch.testing.assert_close(named["w"].detach(), torch.full((3,), 0.99 * 3 + 0.01 * 1))


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "tta").glob("*.yaml")), ids=lambda p: p.stem)
def test_two_step_fit_changes_only_adapted_parameters(config, tiny_cli):
    from lightning_modules.cli import recipe_configs

    args = ["--data.init_args.num_questions=8", "--data.init_args.batch_size=4"]
    token = any("level: token" in f.read_text() for f in recipe_configs(config))
    if token:  # an open-ended stream
        args += ["--data.init_args.tasks=datamodules.tasks.Arithmetic", "--model.init_args.max_new_tokens=5"]
    else:
        args.append("--data.init_args.tasks=datamodules.tasks.Comparison")  # single-token verbalizers here
    cli = tiny_cli(config, *args)
    before = {n: p.detach().clone() for n, p in cli.model.named_parameters()}
    if config.stem == "sar":  # the tiny model is never confident: widen the margin so SAR adapts
        cli.model.method.margin_factor = 1.0
    if config.stem == "sar_token":  # the tiny model gives every answer the same entropy: let all of them adapt
        cli.model.method.margin = lambda view, first: float("inf")
    if config.stem == "infomax":  # the tiny model's label distributions are nearly alike: IM's gradient is tiny
        cli.model.optimizer_factory.keywords["lr"] = 10.0
    modes = []

    class Modes(L.Callback):  # the mode rule: every forward of a step runs without dropout, whatever the trainer set
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.policy.train()

    decoder = cli.model.policy.causal_lm.get_decoder()
    decoder.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    cli.trainer.callbacks.append(Modes())
    cli.trainer.fit(cli.model, cli.datamodule)
    assert modes and not any(modes)
    after = dict(cli.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert changed <= trainable
    if config.stem == "batch_calibration":
        assert not changed  # gradient-free
    elif config.stem != "pseudo_label":  # a random model's answers rarely have a majority: tested on its own
        assert changed
    metrics = cli.trainer.callback_metrics
    outcomes = cli.model.outcomes  # each item right or wrong, predicted before its update
    assert outcomes and cli.model.online_accuracy.weight.item() == len(outcomes)
    assert metrics["tta/online_accuracy"].item() == pytest.approx(sum(outcomes) / len(outcomes))
    assert "tta/entropy" not in metrics or torch.isfinite(metrics["tta/entropy"])


def test_stream_orders_shifts_and_mixes(tiny_model_dir):
    from datamodules.stream import StreamDataModule
    from datamodules.tasks import Arithmetic, Comparison

    def stream(**kwargs):
        dm = StreamDataModule(Comparison(few_shot=1), num_questions=12, tokenizer=tiny_model_dir, batch_size=4,
                              **kwargs)
        dm.setup("fit")
        return dm

    by_label = [it["label"] for it in stream(order="by_label").items]
    assert by_label == sorted(by_label) and set(by_label) == {0, 1}  # one class, then the other
    shuffled = stream(order="random", seed=1)
    assert [it["label"] for it in shuffled.items] != by_label
    shifted = stream(format_shift_at=0.5, shifted_few_shot=0, shifted_template="plain")
    lengths = [len(it["ids"]) for it in shifted.items]
    assert min(lengths[:6]) > max(lengths[6:])  # the exemplar disappears after the shift
    plain = shifted.tokenizer.decode(shifted.items[-1]["ids"])
    assert plain.startswith("Q: Which number") and plain.endswith("\nA: The answer is (")  # plain format
    mixed = StreamDataModule([Comparison(seed=0), Comparison(seed=5, low=10, high=99)], num_questions=4,
                             tokenizer=tiny_model_dir)
    mixed.setup("fit")
    assert [it["question"].options[0].__len__() for it in mixed.items][:2] == [3, 2]  # interleaved domains
    batch = next(iter(shifted.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["verbalizer_ids"].shape == (4, 2)
    mixed = StreamDataModule([Comparison(), Arithmetic()], tokenizer=tiny_model_dir, num_questions=4)
    mixed.setup("fit")  # fine at the token level
    assert "'arithmetic' has no verbalizers" in mixed.label_problem and "label" not in mixed.items[0]
    with pytest.raises(ValueError, match="by_label.*'arithmetic' has no verbalizers"):
        StreamDataModule(Arithmetic(), tokenizer=tiny_model_dir, order="by_label").setup("fit")


# Produced by running the official SAR code (mr-eggplant/SAR, sar.py + sam.py at 20f6e24, torch 2.13 CPU) on the
# model and stream built below: SAR(model, SAM(norm params, SGD, lr 0.05, momentum 0.9), margin_e0 = 0.4 ln 4),
# 60 batches. Only the numbers are kept: the reset steps, the EMA after each step, the final LayerNorm parameters.
SAR_REFERENCE_RESETS = [22, 33, 34, 46, 56]
SAR_REFERENCE_EMAS = [
    0.3063639998435974, 0.30407688915729525, 0.3011473706364632, 0.3103321305811405, 0.30666579412519934,
    0.2901055122056604, 0.2909954879855216, 0.2850712428249509, 0.27396893707730685, 0.26747096366719886,
    0.26297742832037646, 0.2604721877723888, 0.2522269943729003, 0.24250856572761773, 0.23449554176069473,
    0.22888645348790743, 0.22954734848001712, 0.22824744897537633, 0.21487070710170153, 0.2069983296755661,
    0.20078657983217024, 0.19337290154522704, 0.20665834212266843, 0.2025463568922589, 0.20710487107247497,
    0.21440027302334058, 0.21199797969307912, 0.21649899227541458, 0.2199283463637987, 0.22130337264069552,
    0.21311735128696532, 0.202896567571185, 0.1898712939512926, 0.19898921488155702, 0.20259218578126828,
    0.20653031019497037, 0.20773752106542695, 0.20861354535801985, 0.20756683408603468, 0.20968728058980762,
    0.2104339119206088, 0.20717571673484597, 0.20632642952524383, 0.20014024926354967, 0.20021540808496313,
    0.19515466887787675, 0.20317936121555294, 0.21627111595093124, 0.21963716472285014, 0.22298072807577568,
    0.22568193405199632, 0.21923087235684918, 0.21544097390528671, 0.21539197588046924, 0.20201352140975476,
    0.19411461563413573, 0.2049185038641563, 0.21273340592105427, 0.20098041498052394, 0.20362071546960456,
]
SAR_REFERENCE_WEIGHT = [
    1.0933313369750977, 0.9928125143051147, 0.9582842588424683, 1.0485105514526367, 1.126686930656433,
    1.011101245880127, 0.9597641229629517, 1.0316253900527954, 1.0313695669174194, 0.9736487865447998,
    1.0266474485397339, 1.0049744844436646, 1.0236492156982422, 1.1020680665969849, 1.0013095140457153,
    1.2428185939788818,
]
SAR_REFERENCE_BIAS = [
    0.09069143980741501, -0.05056910961866379, -0.07947299629449844, 0.025873500853776932, 0.08204705268144608,
    0.01672298274934292, -0.06726222485303879, 0.04842421039938927, 0.038010433316230774, -0.03051527962088585,
    0.05942216515541077, -0.028045330196619034, 0.06426475197076797, 0.08376665413379669, -0.10880697518587112,
    0.2661406099796295,
]


class _ModelView:
    """A label-level view over a plain torch model (what `LabelView` is over the policy)."""

    level, num_classes = "label", 4

    def __init__(self, model, x):
        self.model, self.x, self.first = model, x, None

    def logits(self):
        out = self.model(self.x)
        if self.first is None:
            self.first = out.detach()
        return out

    def entropy(self):
        return entropy(self.logits())

    def predictions(self):
        return self.first


def test_sar_with_like_reference_reproduces_the_official_trace_bit_for_bit():
    torch.manual_seed(0)
    layers = torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        model[3].weight.mul_(9.0)  # confident enough for the EMA to cross 0.2 several times
    model.requires_grad_(False)
    model[1].requires_grad_(True)
    generator = torch.Generator().manual_seed(1)
    stream = [torch.randn(16, 6, generator=generator) for _ in range(60)]

    def run(like_reference: bool):
        net = copy.deepcopy(model)
        sar = SAR(reset_below=0.2, like_reference=like_reference)
        sar.attach({n: p for n, p in net.named_parameters() if p.requires_grad})
        opt = SAM([p for p in net.parameters() if p.requires_grad], torch.optim.SGD, lr=0.05, momentum=0.9)
        sar.check(opt)
        resets, emas = [], []
        for step, x in enumerate(stream, 1):
            view = _ModelView(net, x)
            predictions, _ = sar.adapt(view, opt)
            assert torch.equal(predictions, view.first)
            if sar.should_reset():
                sar.reset(opt)
                resets.append(step)
            emas.append(sar.ema)
        return resets, emas, net[1]

    resets, emas, norm = run(like_reference=True)
    assert resets == SAR_REFERENCE_RESETS and emas == SAR_REFERENCE_EMAS
    assert norm.weight.tolist() == SAR_REFERENCE_WEIGHT and norm.bias.tolist() == SAR_REFERENCE_BIAS
    clean_resets, _, _ = run(like_reference=False)
    assert clean_resets == [22, 42]  # the default clean reset: the EMA starts anew, so resets are rarer
