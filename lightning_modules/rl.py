"""SelfRewardRLModule: online RL where the rewards are computed by the model itself (SPEC §6–7).

Each training step, for a batch of P unlabeled prompts:
1. the current policy samples a group of G responses per prompt (no gradient; the shared few-shot prefix and
   each prompt are prefilled once), keeping each token's log-probability at temperature 1 (log pi_old);
2. label-free signals (`lightning_modules/signals/`, any of them) score the P x G responses; the reward is their
   weighted sum; a signal that has no value for a response (NaN: a vote with fewer than two parsed answers)
   rewards it 0, counted in `reward/<name>_no_value`;
3. advantages are normalised within each prompt's group (`grpo` or `rloo`): the weighted sum of the rewards
   (`reward_combination: sum_then_normalize`); Intuitor's combination (`normalize_each`, sunblaze-ucb/Intuitor
   `intuitor_trainer.py`): self-certainty normalised on its own, plus the weighted sum of the other rewards
   normalised once; or each reward normalised on its own before the weighted sum (`normalize_every_reward`, ours);
4. `ppo_epochs` passes of the PPO-clip loss on the response tokens, plus beta x KL(pi || pi_ref) per token (k3) to
   the reference = the adapter-disabled model (`policy.reference()`), whose log-probs are computed once.
   These teacher-forced passes run the shared few-shot prefix once too (`prefix_ids`); the first PPO pass also
   gives the entropy of the distributions that produced the response tokens (`rl/entropy`).
Mode rule (SPEC §6): RL trains with dropout off, every pass in eval mode (TRL's `disable_dropout`), so the
log-probs that sampled a response and the first PPO pass see the same network: the first-epoch ratio is 1 up to
float rounding and nothing is clipped (with LoRA dropout in train mode it reached 1.34, 3% of tokens clipped).
The reference RLC code used trlx PPO with a value head and an adaptive KL; this is the group-normalised,
critic-free variant the spec asks for. Gold answers (where the task has them) are read only for evaluation
metrics: the accuracy of the sampled answers, how often the reward agrees with gold (`rl/reward_accuracy`:
reward > 0.5 vs correct, for rewards in [0, 1]) and how often it ranks a correct response of a group above an
incorrect one (`rl/reward_ranking`, any reward scale: `signals.quality.ranking_auc`).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_modules.candidates import Candidates, candidate_tensors, sample
from lightning_modules.checkpointing import TrainableStateMixin, save_config_hyperparameters
from lightning_modules.guard import FiniteGuard
from lightning_modules.losses.base import PolicyGradientLoss, check_loss
from lightning_modules.losses.functional import IGNORE_INDEX
from lightning_modules.losses.policy_gradient import PPOClipLoss, combined_advantages
from lightning_modules.policy import Policy
from lightning_modules.sampling import SamplingParams
from lightning_modules.signals import SelfCertainty, Signal, score, signal_names
from lightning_modules.signals.quality import ranking_auc

PROGRESS_BAR = ("rl/loss", "rl/reward", "rl/sample_accuracy")


class SelfRewardRLModule(TrainableStateMixin, L.LightningModule):
    """Args:
        policy: the model; with LoRA the reference is the same network with the adapter disabled.
        rewards: the signals that reward; `reward_weights` (default all 1) weigh their sum.
        group_size, temperature, top_p, max_new_tokens: the G sampled responses per prompt.
        advantage, advantage_eps: `grpo` ((r - mean) / (std + eps), eps 1e-4 as TRL and Intuitor) or `rloo`.
        reward_combination: `sum_then_normalize` (default), `normalize_each` (Intuitor's: needs a `SelfCertainty`
            reward; its weight multiplies its advantage, 1 in Intuitor) or `normalize_every_reward` (see step 3).
        loss: the policy loss (default `PPOClipLoss(clip_eps=0.2, kl_beta=0.04, loss_type="bnpo")`).
        ppo_epochs: optimisation passes over each rollout.
        max_nonfinite_steps: skipped non-finite updates in a row before the run stops (`guard.py`).
    """

    def __init__(
        self, policy: Policy, rewards: list[Signal], reward_weights: list[float] | None = None,
        group_size: int = 4, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 96,
        advantage: Literal["grpo", "rloo"] = "grpo", advantage_eps: float = 1e-4,
        reward_combination: Literal["sum_then_normalize", "normalize_each", "normalize_every_reward"] =
            "sum_then_normalize",
        loss: PolicyGradientLoss | None = None, ppo_epochs: int = 1,
        optimizer: OptimizerCallable = torch.optim.AdamW, seed: int = 0, max_nonfinite_steps: int = 5,
    ) -> None:
        super().__init__()
        save_config_hyperparameters(self)
        self.automatic_optimization = False
        self.policy, self.rewards = policy, nn.ModuleList(rewards)
        self.reward_weights = reward_weights or [1.0] * len(rewards)
        if len(self.reward_weights) != len(rewards):
            raise ValueError("reward_weights needs one weight per reward")
        self.params = SamplingParams(group_size, temperature, top_p, max_new_tokens, seed)
        if group_size < 2:
            raise ValueError(f"group_size must be at least 2 (advantages are normalised within each prompt's group), "
                             f"got {group_size}")
        if ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be at least 1, got {ppo_epochs}")
        self.advantage, self.advantage_eps, self.ppo_epochs = advantage, advantage_eps, ppo_epochs
        if reward_combination == "normalize_each" and not any(isinstance(r, SelfCertainty) for r in rewards):
            raise ValueError("reward_combination: normalize_each normalises self-certainty on its own and the other "
                             "rewards' weighted sum once (Intuitor); the rewards hold no SelfCertainty: use "
                             "normalize_every_reward or sum_then_normalize")
        self.reward_combination = reward_combination
        self.loss = check_loss(loss, PolicyGradientLoss, "SelfRewardRLModule") if loss is not None else PPOClipLoss()
        self.optimizer_factory = optimizer
        self.generator = torch.Generator().manual_seed(seed)
        self.guard = FiniteGuard(max_nonfinite_steps)
        self.step_metrics: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        self.generator.manual_seed(self.params.seed + self.global_rank)  # each rank samples its own responses

    def run_state(self) -> dict:
        return super().run_state() | {"generator": self.generator.get_state()}

    def load_run_state(self, state: dict) -> None:
        super().load_run_state(state)
        self.generator.set_state(state["generator"])

    def configure_optimizers(self):
        return self.optimizer_factory(self.policy.trainable_parameters())

    def rollout(self, batch: dict) -> Candidates:
        """G responses per prompt from the current policy, with their tokens' log-probs at temperature 1."""
        p = len(batch["suffix_ids"])
        return sample(self.policy, batch["questions"], [batch["task"]] * p, self.params, self.generator,
                      batch["suffix_ids"], batch["prefix_ids"])

    def _aligned(self, values: list[list[float]], labels: Tensor) -> Tensor:
        """Per-response token values placed at the response's label positions. (N, T)."""
        out = torch.zeros(labels.shape, device=labels.device)
        mask = labels != IGNORE_INDEX
        return out.masked_scatter(mask, torch.tensor([v for row in values for v in row], device=labels.device))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self.policy.eval()  # the mode rule: dropout off for sampling, reference and PPO passes alike
        rollout = self.rollout(batch)
        n = len(rollout)
        values = torch.zeros(n, len(self.rewards))  # (N, R) each reward, no value -> 0
        for j, (module, name) in enumerate(zip(self.rewards, signal_names(self.rewards))):
            r = score(module, rollout, self.policy)
            no_value = torch.isnan(r)
            values[:, j] = r = r.nan_to_num(0.0)
            self.log(f"reward/{name}_mean", r.mean(), batch_size=n)
            self.log(f"reward/{name}_std", r.std() if n > 1 else 0.0, batch_size=n)
            self.log(f"reward/{name}_no_value", no_value.float().mean(), batch_size=n)
        rewards = values @ torch.tensor(self.reward_weights, dtype=torch.float32)
        mode = self.reward_combination
        alone = [mode == "normalize_every_reward" or (mode == "normalize_each" and isinstance(m, SelfCertainty))
                 for m in self.rewards]
        advantages = combined_advantages(values, self.reward_weights, alone, rollout.group, self.advantage,
                                         self.advantage_eps)
        advantages = advantages.to(self.device)
        ids, mask, labels = candidate_tensors(rollout, self.policy.tokenizer.pad_token_id, self.device)
        response = labels != IGNORE_INDEX  # (N, T)
        old_logp = self._aligned(rollout.logprobs, labels)
        prefix = rollout.prefix_ids
        with torch.no_grad(), self.policy.reference():
            ref_logp = -self.policy.token_nll(ids, mask, labels, prefix)
        optimizer = self.optimizers()
        for epoch in range(self.ppo_epochs):
            if epoch == 0:  # also the entropy of the distributions that produced the response (before any update)
                nll, token_entropy = self.policy.token_nll(ids, mask, labels, prefix, with_entropy=True)
                entropy = (token_entropy * response).sum() / response.sum().clamp_min(1)
            else:
                nll = self.policy.token_nll(ids, mask, labels, prefix)
            out = self.loss(-nll, old_logp, ref_logp, advantages, response)
            optimizer.zero_grad(set_to_none=True)
            finite = self.guard.loss_ok(out.loss, self.global_step)
            if finite:
                self.manual_backward(out.loss)
                finite = self.guard.grads_ok(self.policy.trainable_parameters(), self.global_step)
            optimizer.step()  # without gradients (a skipped update) it changes nothing but the step count
            if finite:
                self.guard.updated(self.policy.named_parameters(), self.global_step)
        self._log_step(rollout, rewards, advantages, out, response, entropy)

    def _log_step(self, rollout: Candidates, rewards: Tensor, advantages: Tensor, out, response: Tensor,
                  entropy: Tensor) -> None:
        """Logs the step's figures; they are also kept in `step_metrics` (floats), only those of this step."""
        n = len(rollout.texts)
        moved = torch.zeros(len(rollout.questions)).index_add_(0, rollout.group, (advantages != 0).float().cpu())
        metrics = {"rl/loss": out.loss.detach(), "rl/reward": rewards.mean(),
                   "rl/zero_advantage_groups": (moved == 0).float().mean(),
                   **{f"rl/{name}": value for name, value in out.metrics.items()},
                   "rl/response_length": response.sum(-1).float().mean(), "rl/entropy": entropy,
                   "rl/parsed_fraction": sum(a is not None for a in rollout.answers) / n,
                   "rl/skipped_steps": float(self.guard.skipped)}
        gold = [rollout.questions[int(g)].answer for g in rollout.group]
        if all(x is not None for x in gold):  # evaluation only
            correct = torch.tensor([rollout.tasks[int(g)].same(a, y)
                                    for a, y, g in zip(rollout.answers, gold, rollout.group)], dtype=torch.float)
            metrics["rl/sample_accuracy"] = correct.mean()
            if rewards.min() >= 0 and rewards.max() <= 1:  # a threshold only means something for [0, 1] rewards
                metrics["rl/reward_accuracy"] = ((rewards > 0.5).float() == correct).float().mean()
            ranking = ranking_auc(rewards, correct, rollout.group)
            if ranking is not None:
                metrics["rl/reward_ranking"] = ranking
        for name, value in metrics.items():
            self.log(name, value, batch_size=n, prog_bar=name in PROGRESS_BAR)
        self.step_metrics = {name: float(value) for name, value in metrics.items()}
