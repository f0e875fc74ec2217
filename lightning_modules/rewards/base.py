"""What a reward module sees: one rollout batch (G responses for each of P prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.losses.functional import IGNORE_INDEX


@dataclass
class Rollout:
    """N = P x G responses, grouped by prompt (`group[i]` is response i's prompt index)."""

    questions: list[Any]  # (P,) the data side's question objects (text in `.question`, gold in `.answer`)
    tasks: list[Any]  # (P,) objects with `extract(text)`, `same(a, b)`, `majority(answers)`, `format_question(q)`
    group: Tensor  # (N,) long
    texts: list[str]  # (N,) response texts
    answers: list[str | None]  # (N,) extracted answers
    prompt_ids: list[list[int]]  # (P,) each prompt's ids after the shared prefix
    response_ids: list[list[int]]  # (N,)
    prefix_ids: list[int] = field(default_factory=list)  # shared by every prompt (a task's few-shot exemplars)


class Reward(nn.Module):
    """A reward: `forward(rollout, policy) -> (N,)` float tensor, computed without gradient."""

    def forward(self, rollout: Rollout, policy) -> Tensor:
        raise NotImplementedError


def rollout_tensors(rollout: Rollout, pad_token_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded prompt + response ids (N, T), their attention mask, and `labels` holding the response tokens
    (IGNORE_INDEX elsewhere), aligned so that `policy.token_nll(ids, mask, labels, rollout.prefix_ids)` scores
    the response. The rows continue `rollout.prefix_ids`, which they leave out."""
    seqs = [rollout.prompt_ids[int(g)] + r for g, r in zip(rollout.group, rollout.response_ids)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (g, r) in enumerate(zip(rollout.group, rollout.response_ids)):
        n_prompt = len(rollout.prompt_ids[int(g)])
        ids[i, : len(seqs[i])] = torch.tensor(seqs[i])
        mask[i, : len(seqs[i])] = 1
        labels[i, n_prompt : len(seqs[i])] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), mask.to(device), labels.to(device)
