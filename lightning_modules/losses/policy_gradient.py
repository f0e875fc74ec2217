"""Group-relative advantages and the PPO-clip loss with a KL penalty to the reference model (SPEC §6).

Advantages within each prompt's group of G responses:
- `grpo`: (r_i - mean_g r) / (std_g r + eps), std with Bessel's correction (0 for a group of one);
- `rloo`: r_i - mean of the other G - 1 rewards of its group (leave-one-out baseline).
Per response token t: ratio = exp(log pi(t) - log pi_old(t));
  pg = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A);  kl = exp(ref - log pi) - (ref - log pi) - 1 (k3, >= 0);
  loss_t = pg + beta kl.
`normalization="token"`: sum over all response tokens / their count (long answers weigh more);
`"sequence"`: each response's token mean, then the mean over responses (every response weighs the same).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_modules.losses.base import LossOutput


def group_advantages(rewards: Tensor, group: Tensor, mode: Literal["grpo", "rloo"] = "grpo",
                     eps: float = 1e-6) -> Tensor:
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


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


class PPOClipLoss(nn.Module):
    def __init__(self, clip_eps: float = 0.2, kl_beta: float = 0.04,
                 normalization: Literal["token", "sequence"] = "token") -> None:
        super().__init__()
        self.clip_eps, self.kl_beta, self.normalization = clip_eps, kl_beta, normalization

    def forward(self, logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor) -> LossOutput:
        """logp, old_logp, ref_logp, mask: (N, T); advantages (N,)."""
        mask = mask.float()
        ratio = torch.exp(logp - old_logp)  # (N, T)
        adv = advantages[:, None]
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * adv)
        kl = kl_k3(logp, ref_logp)
        per_token = pg + self.kl_beta * kl
        if self.normalization == "token":
            loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
        else:
            loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()
        n = mask.sum().clamp_min(1)
        clipped = ((ratio - 1).abs() > self.clip_eps).float()
        return LossOutput(loss, {"kl": ((kl * mask).sum() / n).detach(), "clip_fraction": ((clipped * mask).sum() / n),
                                 "ratio": ((ratio * mask).sum() / n).detach()})
