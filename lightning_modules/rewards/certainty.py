"""Rewards from the policy's own token distributions on its response (no gradient).

SelfCertaintyReward (Intuitor, arXiv 2505.19590): mean over response tokens of KL(U || p_t)
= mean_t [ -log|V| - (1/|V|) sum_v log p_t(v) ], computed with the current policy.
NegativeEntropyReward (EM-RL, arXiv 2505.15134): -sum_t H(p_t) over the response tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.losses.functional import predicting_labels
from lightning_modules.rewards.base import Reward, Rollout, rollout_tensors


class SelfCertaintyReward(Reward):
    def forward(self, rollout: Rollout, policy) -> Tensor:
        ids, mask, produced = _produced(rollout, policy)
        with policy.inference():
            kl = policy.token_map(ids, mask, produced, _kl_from_uniform, rollout.prefix_ids)  # (N, T)
        return ((kl * produced).sum(-1) / produced.sum(-1).clamp_min(1)).cpu()


class NegativeEntropyReward(Reward):
    def forward(self, rollout: Rollout, policy) -> Tensor:
        ids, mask, produced = _produced(rollout, policy)
        with policy.inference():
            return -(policy.token_entropy(ids, mask, produced, rollout.prefix_ids) * produced).sum(-1).cpu()


def _produced(rollout: Rollout, policy) -> tuple[Tensor, Tensor, Tensor]:
    """ids, attention mask, and the positions whose next-token distribution produced a response token."""
    ids, mask, labels = rollout_tensors(rollout, policy.tokenizer.pad_token_id, next(policy.parameters()).device)
    return ids, mask, predicting_labels(labels)


def _kl_from_uniform(logits: Tensor) -> Tensor:
    log_p = logits.float().log_softmax(-1)
    return -log_p.mean(-1) - torch.log(torch.tensor(float(logits.shape[-1])))
