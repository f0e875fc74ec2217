"""Group-relative advantages and the PPO-clip loss with a KL penalty to the reference model (SPEC §6).

Advantages within each prompt's group of G responses:
- `grpo`: (r_i - mean_g r) / (std_g r + eps), std with Bessel's correction (0 for a group of one); eps = 1e-4
  as in TRL and Intuitor (with 1e-6, rewards 1, 1, 1, 1.001 gave the last one a full-scale 1.50; now 1.25);
- `rloo`: r_i - mean of the other G - 1 rewards of its group (leave-one-out baseline).
Per response token t: ratio = exp(log pi(t) - log pi_old(t));
  pg = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)   (option `dual_clip` c, verl: for A < 0, min(pg, -c A));
  kl = exp(ref - log pi) - (ref - log pi) - 1 (k3, >= 0; option `kl_clamp` k, verl: clamped to [-k, k]);
  loss_t = pg + beta kl.
Reduction, `loss_type` with the names TRL and verl use:
- `grpo`: each response's token mean, then the mean over responses (every response weighs the same);
- `bnpo` (default): sum over the batch's response tokens / their count (long answers weigh more);
- `dr_grpo`: sum / (N x max_completion_length) (Dr. GRPO: no length normalisation);
- `dapo`: sum / the response-token count of the global batch, all ranks (in one process the same as `bnpo`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_modules.losses.base import LossOutput, PolicyGradientLoss

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


def group_advantages(rewards: Tensor, group: Tensor, mode: Literal["grpo", "rloo"] = "grpo",
                     eps: float = 1e-4) -> Tensor:
    """rewards (N,), group (N,) long -> advantages (N,)."""
    rewards = rewards.float()
    n_groups = int(group.max()) + 1 if len(group) else 0
    count = torch.zeros(n_groups).index_add_(0, group, torch.ones_like(rewards))  # (P,)
    total = torch.zeros(n_groups).index_add_(0, group, rewards)
    mean = (total / count)[group]
    if mode == "rloo":
        others = (count[group] - 1).clamp_min(1)
        return torch.where(count[group] > 1, rewards - (total[group] - rewards) / others, torch.zeros_like(rewards))
    sq = torch.zeros(n_groups).index_add_(0, group, (rewards - mean) ** 2)
    std = (sq / (count - 1).clamp_min(1)).sqrt()[group]
    informative = (count[group] > 1) & (std > 0)  # a group of one, or of equal rewards, carries no signal
    return torch.where(informative, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def combined_advantages(rewards: Tensor, weights: Sequence[float], alone: Sequence[bool], group: Tensor,
                        mode: Literal["grpo", "rloo"] = "grpo", eps: float = 1e-4) -> Tensor:
    """rewards (N, R), one weight per reward -> advantages (N,): each reward marked `alone` normalised on its own
    and weighted, plus the weighted sum of the others normalised once. None alone is `sum_then_normalize`;
    self-certainty alone is Intuitor's combination; all alone, `normalize_every_reward`."""
    w, alone = torch.tensor(weights, dtype=torch.float32), torch.tensor(alone, dtype=torch.bool)
    out = group_advantages((rewards[:, ~alone].float() * w[~alone]).sum(-1), group, mode, eps)
    for j in alone.nonzero().flatten().tolist():
        out += w[j] * group_advantages(rewards[:, j], group, mode, eps)
    return out


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


class PPOClipLoss(PolicyGradientLoss):
    """Args:
        clip_eps: the clip range of the ratio (0.2).
        kl_beta: weight of the k3 KL to the reference (0.04).
        loss_type: the reduction (module docstring): `grpo`, `bnpo` (default), `dr_grpo`, `dapo`.
        max_completion_length: the `dr_grpo` constant (the RL module's `max_new_tokens`); required for it.
        dual_clip: verl's dual-clip constant c (3) for negative advantages; None = off.
        kl_clamp: clamp each token's KL term to [-kl_clamp, kl_clamp] (verl: 10); None = off.
    """

    def __init__(self, clip_eps: float = 0.2, kl_beta: float = 0.04, loss_type: LossType = "bnpo",
                 max_completion_length: int | None = None, dual_clip: float | None = None,
                 kl_clamp: float | None = None) -> None:
        super().__init__()
        if loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
            raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")
        if loss_type == "dr_grpo" and not max_completion_length:
            raise ValueError("loss_type dr_grpo divides by N x max_completion_length: set max_completion_length")
        if dual_clip is not None and dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (verl uses 3), got {dual_clip}")
        self.clip_eps, self.kl_beta, self.loss_type = clip_eps, kl_beta, loss_type
        self.max_completion_length, self.dual_clip, self.kl_clamp = max_completion_length, dual_clip, kl_clamp

    def forward(self, logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor) -> LossOutput:
        """logp, old_logp, ref_logp, mask: (N, T); advantages (N,)."""
        mask = mask.float()
        ratio = torch.exp(logp - old_logp)  # (N, T)
        adv = advantages[:, None]  # (N, 1)
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * adv)  # (N, T)
        if self.dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -self.dual_clip * adv), pg)
        kl = kl_k3(logp, ref_logp)  # (N, T)
        if self.kl_clamp is not None:
            kl = kl.clamp(-self.kl_clamp, self.kl_clamp)
        per_token = (pg + self.kl_beta * kl) * mask
        if self.loss_type == "grpo":
            loss = (per_token.sum(-1) / mask.sum(-1).clamp_min(1)).mean()
        elif self.loss_type == "bnpo":
            loss = per_token.sum() / mask.sum().clamp_min(1)
        elif self.loss_type == "dr_grpo":
            loss = per_token.sum() / (mask.shape[0] * self.max_completion_length)
        else:
            loss = per_token.sum() / global_token_count(mask).clamp_min(1)
        n = mask.sum().clamp_min(1)
        clipped = ((ratio - 1).abs() > self.clip_eps).float()
        return LossOutput(loss, {"kl": ((kl * mask).sum() / n).detach(), "clip_fraction": ((clipped * mask).sum() / n),
                                 "ratio": ((ratio * mask).sum() / n).detach()})


def global_token_count(mask: Tensor) -> Tensor:
    """The response-token count of the whole batch over all ranks, divided by the number of ranks (DDP averages
    the gradients, so each rank divides its sum by this); the local count when not distributed."""
    count = mask.sum().detach()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        count = count.clone()
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return count
