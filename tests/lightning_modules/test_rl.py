"""Online RL: advantage and PPO-clip maths, rewards on the tiny model, and a short fit per recipe."""

import math
from dataclasses import replace

import pytest
import torch
from tiny import ROOT

from datamodules.tasks import Arithmetic
from lightning_modules.candidates import candidate_tensors
from lightning_modules.losses.policy_gradient import PPOClipLoss, group_advantages, kl_k3
from lightning_modules.policy import Policy
from lightning_modules.rl import SelfRewardRLModule
from lightning_modules.signals import GoldAnswer, MajorityAnswer, SelfCertainty
from lightning_modules.signals.quality import ranking_auc


def test_group_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    adv = group_advantages(rewards, group, "grpo", eps=0.0)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # mean 0.5, Bessel
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert adv[4:].tolist() == [0.0, 0.0, 0.0]  # equal rewards and a group of one: no signal
    rloo = group_advantages(rewards, group, "rloo")
    torch.testing.assert_close(rloo[:4], torch.tensor([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]))
    assert rloo[6] == 0.0


def test_ppo_clip_hand_values_and_kl():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    old = torch.log(torch.tensor([[0.25, 0.2]]))  # ratio 2 (clipped to 1.2 for A > 0) and 1
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = PPOClipLoss(clip_eps=0.2, kl_beta=0.0)(logp, old, logp, torch.tensor([1.0]), mask)
    assert out.loss.item() == pytest.approx(-(1.2 + 1.0) / 2)
    assert out.metrics["clip_fraction"].item() == 0.5
    neg = PPOClipLoss(clip_eps=0.2, kl_beta=0.0)(logp, old, logp, torch.tensor([-1.0]), mask)
    assert neg.loss.item() == pytest.approx((2.0 + 1.0) / 2)  # min picks the unclipped ratio for A < 0
    ref = torch.log(torch.tensor([[0.25, 0.1]]))
    k3 = kl_k3(logp, ref)
    torch.testing.assert_close(k3, torch.tensor([[0.5 - math.log(0.5) - 1, 0.5 - math.log(0.5) - 1]]))
    assert (kl_k3(torch.randn(50), torch.randn(50)) >= 0).all()


def test_reward_ranking_hand_values_and_naive_loop():
    rewards = torch.tensor([0.9, 0.2, 0.2, 0.5, 0.7, 0.1])
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    # group 0: correct {0.9, 0.2} vs incorrect {0.2, 0.5}: 0.9 beats both, 0.2 ties 0.2 and loses to 0.5
    assert ranking_auc(rewards, correct, group) == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert ranking_auc(rewards[4:], correct[4:], group[4:]) is None  # group 1 has no incorrect response
    gen = torch.Generator().manual_seed(0)
    rewards, correct = torch.randint(0, 4, (40,), generator=gen).float(), torch.rand(40, generator=gen) < 0.5
    group = torch.arange(5).repeat_interleave(8)
    scores = [float(rewards[i] > rewards[j]) + 0.5 * float(rewards[i] == rewards[j])
              for i in range(40) for j in range(40) if group[i] == group[j] and correct[i] and not correct[j]]
    assert ranking_auc(rewards, correct, group) == pytest.approx(sum(scores) / len(scores))


def test_loss_types_hand_values():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([1.0, 0.0])  # per-token loss: -1 on response 0's one token, 0 elsewhere

    def loss(loss_type, **kw):
        return PPOClipLoss(kl_beta=0.0, loss_type=loss_type, **kw)(logp, logp, logp, adv, mask).loss.item()

    assert loss("bnpo") == pytest.approx(-1 / 4)  # sum / 4 response tokens
    assert loss("dapo") == pytest.approx(-1 / 4)  # the same in one process
    assert loss("grpo") == pytest.approx(-1 / 2)  # (-1/1 + 0/3) / 2 responses
    assert loss("dr_grpo", max_completion_length=8) == pytest.approx(-1 / 16)  # sum / (2 x 8)
    with pytest.raises(ValueError, match="max_completion_length"):
        PPOClipLoss(loss_type="dr_grpo")


def test_loss_types_against_a_naive_loop():
    gen = torch.Generator().manual_seed(0)
    n, t = 5, 7
    logp, old, ref = (-torch.rand(n, t, generator=gen) * 3 for _ in range(3))
    adv = torch.randn(n, generator=gen)
    mask = torch.rand(n, t, generator=gen) < 0.7
    mask[:, 0] = True
    beta, eps, c, k = 0.04, 0.2, 3.0, 0.05

    def token_loss(i, j):
        r = math.exp(logp[i, j] - old[i, j])
        a = adv[i].item()
        pg = -min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
        if a < 0:
            pg = min(pg, -c * a)  # dual clip
        d = (ref[i, j] - logp[i, j]).item()
        kl = min(max(math.exp(d) - d - 1, -k), k)  # clamped k3
        return pg + beta * kl

    rows = [[token_loss(i, j) for j in range(t) if mask[i, j]] for i in range(n)]
    want = {"grpo": sum(sum(r) / len(r) for r in rows) / n, "bnpo": sum(map(sum, rows)) / sum(map(len, rows)),
            "dr_grpo": sum(map(sum, rows)) / (n * 10), "dapo": sum(map(sum, rows)) / sum(map(len, rows))}
    for loss_type, value in want.items():
        loss = PPOClipLoss(eps, beta, loss_type, max_completion_length=10, dual_clip=c, kl_clamp=k)
        assert loss(logp, old, ref, adv, mask).loss.item() == pytest.approx(value, rel=1e-5), loss_type


def test_dual_clip_caps_a_negative_advantage():
    logp, old = torch.log(torch.tensor([[0.8]])), torch.log(torch.tensor([[0.1]]))  # ratio 8
    mask = torch.ones(1, 1, dtype=torch.bool)
    plain = PPOClipLoss(kl_beta=0.0)(logp, old, logp, torch.tensor([-1.0]), mask).loss.item()
    dual = PPOClipLoss(kl_beta=0.0, dual_clip=3.0)(logp, old, logp, torch.tensor([-1.0]), mask).loss.item()
    assert plain == pytest.approx(8.0) and dual == pytest.approx(3.0)  # -min(8 x -1, 1.2 x -1) = 8, capped at 3


def test_advantage_eps_is_trls_and_intuitors():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.001]), torch.zeros(4, dtype=torch.long))
    assert adv[-1].item() == pytest.approx(1.25, rel=1e-3)  # spread 1e-4: not blown up to full scale
    assert group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.001]), torch.zeros(4, dtype=torch.long),
                            eps=1e-6)[-1].item() == pytest.approx(1.497, rel=1e-3)


def test_ppo_epochs_must_be_positive(rollout):
    with pytest.raises(ValueError, match="ppo_epochs"):
        SelfRewardRLModule(rollout[0], [GoldAnswer()], ppo_epochs=0)


def test_kl_is_zero_while_the_adapter_is_zero(rollout):
    policy, r = rollout
    policy.eval()
    ids, mask, labels = candidate_tensors(r, policy.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        logp = -policy.token_nll(ids, mask, labels)
        with policy.reference():
            ref = -policy.token_nll(ids, mask, labels)
    assert torch.equal(kl_k3(logp, ref), torch.zeros_like(logp))  # LoRA B starts at zero


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "rl").glob("*.yaml")), ids=lambda p: p.stem)
def test_two_step_fit_changes_only_adapter_weights(config, tiny_cli):
    cli = tiny_cli(config, "--trainer.max_steps=2", "--model.init_args.max_new_tokens=6",
                   "--model.init_args.optimizer.init_args.lr=0.01", "--data.init_args.num_questions=4",
                   "--data.init_args.batch_size=2")
    before = {n: p.detach().clone() for n, p in cli.model.named_parameters()}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2
    changed = {n for n, p in cli.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)
    metrics = cli.trainer.callback_metrics
    assert {"rl/reward", "rl/kl", "rl/clip_fraction", "rl/response_length", "rl/entropy",
            "rl/sample_accuracy"} <= set(metrics)
    if config.stem not in ("intuitor", "rent", "scrl"):  # rewards in [0, 1]; self-certainty, -entropy, SCRL not
        assert "rl/reward_accuracy" in metrics
    assert "rl/sample_accuracy" in cli.model.step_metrics and set(cli.model.step_metrics) <= set(metrics)


def _fit_one_step(module: SelfRewardRLModule, tiny_model_dir, rollout=None) -> None:
    """One training step on two questions; with `rollout`, on that hand-made batch (log-probs 0) in place of samples."""
    import lightning as L

    from datamodules.questions import QuestionDataModule

    if rollout is not None:
        module.rollout = lambda batch: replace(rollout, logprobs=[[0.0] * len(x) for x in rollout.response_ids])
    L.Trainer(max_steps=1, enable_progress_bar=False, logger=False, enable_checkpointing=False).fit(
        module, QuestionDataModule(Arithmetic(), num_questions=2, batch_size=2, tokenizer=tiny_model_dir))


def test_rewards_normalised_each_on_its_own_or_summed_first(rollout, tiny_model_dir):
    policy, r = rollout
    seen = []

    class Recording(PPOClipLoss):
        def forward(self, logp, old, ref, advantages, mask):
            seen.append(advantages.cpu())
            return super().forward(logp, old, ref, advantages, mask)

    majority, gold = MajorityAnswer()(r, policy), GoldAnswer()(r, policy)
    each = group_advantages(majority, r.group) + 2 * group_advantages(gold, r.group)
    for combination, want in (("normalize_every_reward", each),
                              ("sum_then_normalize", group_advantages(majority + 2 * gold, r.group))):
        module = SelfRewardRLModule(Policy(tiny_model_dir), [MajorityAnswer(), GoldAnswer()], reward_weights=[1, 2],
                                    reward_combination=combination, loss=Recording())
        _fit_one_step(module, tiny_model_dir, r)
        torch.testing.assert_close(seen[-1], want)
    assert not torch.allclose(seen[0], seen[1])  # the two readings differ on this group


def test_zero_advantage_groups_counts_the_groups_that_teach_nothing(rollout, tiny_model_dir):
    """The fixture's group 1 (7, 7, 8, gold) has no strict majority: CuMa's mask silences it, TTRL's reward not."""
    from lightning_modules.signals import Gated, VoteShare

    for reward, want in ((MajorityAnswer(), 0.0), (Gated(MajorityAnswer(), VoteShare(), 0.51), 0.5)):
        module = SelfRewardRLModule(Policy(tiny_model_dir), [reward])
        _fit_one_step(module, tiny_model_dir, rollout[1])
        assert module.step_metrics["rl/zero_advantage_groups"] == want


def test_the_first_ppo_epoch_sees_the_network_that_sampled(tiny_model_dir):
    """Dropout configured (LoRA 0.5) and a non-zero adapter: the mode rule makes the first-epoch ratio 1."""
    from lightning_modules.policy import LoraSettings

    policy = Policy(tiny_model_dir, lora=LoraSettings(dropout=0.5))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    module = SelfRewardRLModule(policy, [MajorityAnswer()], temperature=1.0, max_new_tokens=6)
    _fit_one_step(module, tiny_model_dir)
    assert module.step_metrics["rl/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert module.step_metrics["rl/clip_fraction"] == 0.0


def test_a_reward_is_the_same_twice_on_one_rollout(rollout, tiny_model_dir):
    from lightning_modules.policy import LoraSettings

    policy = Policy(tiny_model_dir, lora=LoraSettings(dropout=0.5))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    policy.train()
    first, second = SelfCertainty()(rollout[1], policy), SelfCertainty()(rollout[1], policy)
    assert torch.equal(first, second) and policy.training  # eval for the pass, train mode restored


def _guarded_fit(tiny_model_dir, guard, max_steps=4):
    import lightning as L

    from datamodules.questions import QuestionDataModule

    module = SelfRewardRLModule(Policy(tiny_model_dir), [MajorityAnswer()], temperature=1.0, max_new_tokens=6,
                                optimizer=lambda params: torch.optim.AdamW(params, lr=0.05))
    initial = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = L.Trainer(max_steps=max_steps, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                        callbacks=[guard])
    trainer.fit(module, QuestionDataModule(Arithmetic(), num_questions=8, batch_size=2, tokenizer=tiny_model_dir))
    return trainer, module, initial


def test_collapse_guard_stops_after_patience_steps_out_of_band(tiny_model_dir):
    from callbacks.collapse_guard import CollapseGuard

    guard = CollapseGuard({"rl/entropy": [None, 0.0], "rl/response_length": [1, None]}, patience=2)
    trainer, module, _ = _guarded_fit(tiny_model_dir, guard)
    assert trainer.global_step == 2  # sampled entropy is above 0 at every step: stopped after the second
    assert [e["step"] for e in guard.events] == [2] and guard.events[0]["action"] == "stop"
    assert "rl/entropy" in guard.events[0]["why"][0] and len(guard.events[0]["why"]) == 1
    assert trainer.callback_metrics["collapse/events"] == 1


def test_collapse_guard_reset_restores_the_initial_adapter(tiny_model_dir):
    from callbacks.collapse_guard import CollapseGuard

    guard = CollapseGuard({"rl/entropy": [None, 0.0]}, patience=1, action="reset")
    trainer, module, initial = _guarded_fit(tiny_model_dir, guard, max_steps=3)
    assert trainer.global_step == 3 and len(guard.events) == 3  # reset after every step, training went on
    for name, p in module.named_parameters():
        if name in initial:
            assert torch.equal(p.detach(), initial[name]), name
    assert all(not o.state for o in trainer.optimizers)  # AdamW's moments cleared


def test_collapse_guard_refuses_a_metric_that_is_not_logged_and_bad_bands(tiny_model_dir):
    from callbacks.collapse_guard import CollapseGuard

    with pytest.raises(KeyError, match="rl/entropie.*not log.*rl/entropy"):
        _guarded_fit(tiny_model_dir, CollapseGuard({"rl/entropie": [0.1, None]}), max_steps=1)
    with pytest.raises(ValueError, match="low 2 is above high 1"):
        CollapseGuard({"rl/entropy": [2, 1]})


def test_normalize_each_needs_self_certainty(tiny_model_dir):
    with pytest.raises(ValueError, match="normalize_each normalises self-certainty on its own"):
        SelfRewardRLModule(Policy(tiny_model_dir), [MajorityAnswer(), GoldAnswer()],
                           reward_combination="normalize_each")
