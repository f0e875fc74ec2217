"""Rewards from the extracted answers: the group's majority (TTRL) and, for oracle comparisons only, gold.

MajorityVoteReward (TTRL, arXiv 2504.16084): 1 if the response's answer equals the majority answer of its
prompt's group (votes over the whole group; unparsable answers get no vote and reward 0). A group is always
sampled on one rank, so the vote sees all of it. GoldReward needs gold answers: an upper bound, never a default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.rewards.base import Reward, Rollout


class MajorityVoteReward(Reward):
    def forward(self, rollout: Rollout, policy) -> Tensor:
        rewards = torch.zeros(len(rollout.texts))
        for p, task in enumerate(rollout.tasks):
            members = torch.nonzero(rollout.group == p).flatten().tolist()
            majority, _, _ = task.majority([rollout.answers[i] for i in members])
            for i in members:
                rewards[i] = float(rollout.answers[i] is not None and task.same(rollout.answers[i], majority))
        return rewards


class GoldReward(Reward):
    def forward(self, rollout: Rollout, policy) -> Tensor:
        return torch.tensor([
            float(rollout.tasks[int(g)].same(a, rollout.questions[int(g)].answer))
            for a, g in zip(rollout.answers, rollout.group)
        ])
