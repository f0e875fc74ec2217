"""Test-time adaptation: the SAR step on a small torch model, resets, weight ensembling, and fits on the tiny LM."""

from pathlib import Path

import pytest
import torch

from callbacks.model_reset import ModelReset
from callbacks.weight_ensembling import WeightEnsembling
from lightning_modules.losses.functional import entropy
from lightning_modules.optim.sam import SAM
from lightning_modules.tta import sar_adapt_step

ROOT = Path(__file__).parents[1]


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
    logits, ema = sar_adapt_step(lambda: model(x), opt, margin, None)

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
    assert not logits.requires_grad

    seen = []

    def recording():
        out = model(x)
        seen.append(out.detach())
        return out

    _, ema2 = sar_adapt_step(recording, opt, margin, ema)
    first, second = entropy(seen[0]), entropy(seen[1])
    s1 = first < margin
    loss2 = second[s1 & (second < margin)].mean().item()
    assert ema2 == pytest.approx(0.9 * ema + 0.1 * loss2)


def test_sar_step_with_no_reliable_sample_changes_nothing_and_is_not_nan():
    model, x = _linear_problem()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9)
    logits, ema = sar_adapt_step(lambda: model(x), opt, margin=0.0, ema=None)  # entropy is never < 0
    assert ema is None and torch.isfinite(logits).all()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # reliable in the first pass but not the second: the perturbation is undone, no update
    calls = []

    def logits_fn():
        calls.append(1)
        return torch.tensor([[5.0, 0.0, 0.0]]) * (1 if len(calls) == 1 else 0) + model(x[:1]) * 0
    _, ema = sar_adapt_step(logits_fn, opt, margin=0.5, ema=None)
    assert ema is None and len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _Stub(torch.nn.Module):
    """A LightningModule-shaped stand-in for the callbacks: `policy`, `loss`, named parameters, `log`."""

    def __init__(self, adapt="norm"):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
        self.policy = type("P", (), {"adapt": adapt})()
        from lightning_modules.losses.roid import SoftLikelihoodRatioLoss
        self.loss = SoftLikelihoodRatioLoss()

    def log(self, *args, **kwargs):
        pass


def test_model_reset_restores_parameters_optimizer_and_loss_state_bit_exactly():
    module = _Stub()
    opt = torch.optim.SGD([module.w], lr=0.1, momentum=0.9)
    trainer = type("T", (), {"optimizers": [opt], "global_step": 0})()
    reset = ModelReset(every_n_steps=3)
    reset.on_train_start(trainer, module)
    for step in range(1, 3):
        opt.zero_grad()
        (module.w ** 3).sum().backward()
        opt.step()
        module.loss(torch.randn(4, 2))
        trainer.global_step = step
        reset.on_train_batch_end(trainer, module, None, None, step)
    assert not torch.equal(module.w.detach(), torch.ones(3)) and opt.state and module.loss.class_probs_ema.numel()
    trainer.global_step = 3
    reset.on_train_batch_end(trainer, module, None, None, 3)
    assert reset.reset_steps == [3]
    assert torch.equal(module.w.detach(), torch.ones(3)) and not opt.state
    assert module.loss.class_probs_ema.numel() == 0  # pi_bar back to its start (uniform on next use)


def test_sar_ema_rule_absolute_and_relative():
    from lightning_modules.losses.sar import ReliableEntropy

    module = _Stub()
    module.loss = ReliableEntropy()
    trainer = type("T", (), {"optimizers": [], "global_step": 1})()
    absolute, relative = ModelReset(ema_threshold=0.2), ModelReset(ema_threshold=None, relative=0.5)
    module.loss.update_ema(0.3)
    assert not absolute.should_reset(trainer, module) and not relative.should_reset(trainer, module)
    module.loss.update_ema(0.14)
    assert absolute.should_reset(trainer, module) and relative.should_reset(trainer, module)


@pytest.mark.parametrize("adapt", ["lora", "norm"])
def test_weight_ensembling(adapt):
    module = _Stub(adapt)
    if adapt == "lora":
        module.lora_B = torch.nn.Parameter(torch.full((2,), 2.0))
        module.lora_A = torch.nn.Parameter(torch.full((2,), 5.0))
    cb = WeightEnsembling(momentum=0.99)
    trainer = type("T", (), {"global_step": 0})()
    cb.on_train_start(trainer, module)
    with torch.no_grad():
        module.w.fill_(3.0)
    cb.on_train_batch_end(trainer, module, None, None, 0)  # no step happened: nothing changes
    assert torch.equal(module.w.detach(), torch.full((3,), 3.0))
    trainer.global_step = 1
    cb.on_train_batch_end(trainer, module, None, None, 1)
    if adapt == "lora":
        torch.testing.assert_close(module.lora_B.detach(), torch.full((2,), 1.98))
        assert torch.equal(module.lora_A.detach(), torch.full((2,), 5.0))
        assert torch.equal(module.w.detach(), torch.full((3,), 3.0))
    else:
        torch.testing.assert_close(module.w.detach(), torch.full((3,), 0.99 * 3 + 0.01 * 1))
    assert torch.equal(module.frozen, torch.ones(3))


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "tta").glob("*.yaml")), ids=lambda p: p.stem)
def test_two_step_fit_changes_only_adapted_parameters(config, tiny_model_dir, tmp_path, monkeypatch):
    from lightning_modules.cli import build_cli

    monkeypatch.chdir(ROOT)
    args = ["-c", str(config), f"--model.init_args.policy.init_args.model={tiny_model_dir}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--data.init_args.num_questions=8", "--data.init_args.batch_size=4",
            "--data.init_args.tasks=datamodules.tasks.Comparison"]  # its verbalizers are single tiny-tokenizer tokens
    if "token" in config.stem:
        args.append("--model.init_args.max_new_tokens=5")
    cli = build_cli(args, run=False)
    before = {n: p.detach().clone() for n, p in cli.model.named_parameters()}
    if "sar" in config.stem:  # the tiny model is never confident: widen the margin so SAR adapts
        cli.model.loss.margin_factor = 1.0
    cli.trainer.fit(cli.model, cli.datamodule)
    after = dict(cli.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(before[n], p.detach())}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert changed and changed <= trainable
    metrics = cli.trainer.callback_metrics
    assert 0 <= metrics["tta/online_accuracy"] <= 1 and torch.isfinite(metrics["tta/entropy"])


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
    with pytest.raises(ValueError, match="classification tasks"):
        StreamDataModule([Comparison(), Arithmetic()], tokenizer=tiny_model_dir).setup("fit")
