"""Tokenisation with prompt masking, padding collation, and length-bucketed batches.

A training sample is `prompt` (formatted with the chat template, masked from the loss) followed by
`response + eos` (the loss targets). Prompt and response are tokenised separately and concatenated, so
the boundary between them is exact whatever the tokenizer merges across it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Sampler

from lightning_modules.losses.functional import IGNORE_INDEX


@dataclass
class SFTExample:
    prompt: str  # the formatted prompt text, chat template included
    response: str
    weight: float = 1.0
    where: str = ""  # file:line it came from


@dataclass
class TokenizedExample:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt tokens carry no loss
    weight: float
    truncated: bool


def tokenize_example(tokenizer, example: SFTExample, max_length: int) -> TokenizedExample:
    """Prompt ids + response ids + eos, cut to `max_length`: the response loses its end first; a prompt
    too long to leave one response token loses its beginning. A special token's text inside the response (say
    "<|im_end|>") is read as plain text, so the only end-of-sequence target is the real one at the end."""
    prompt = tokenizer(example.prompt, add_special_tokens=not tokenizer.chat_template)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    response += [tokenizer.eos_token_id]
    truncated = len(prompt) + len(response) > max_length
    if truncated:
        prompt = prompt[-(max_length - 1) :] if len(prompt) >= max_length else prompt
        response = response[: max_length - len(prompt)]
    return TokenizedExample(prompt + response, len(prompt), example.weight, truncated)


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (prompt and padding = IGNORE_INDEX), weight."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)  # (B, T)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.input_ids)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        labels[i, e.n_prompt : len(ids)] = ids[e.n_prompt :]
    weight = torch.tensor([e.weight for e in examples], dtype=torch.float32)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weight": weight}


class LengthBucketSampler(BatchSampler):
    """Batches of similar length: shuffle, cut into pools of `pool_batches` batches, sort each pool by
    length, split into batches, shuffle the batches. Deterministic for (seed, epoch). Under several ranks
    each takes every `world_size`-th batch, all ranks getting the same number of batches.

    It follows `BatchSampler`'s API so that Lightning's DDP can rebuild it with a `sampler` of its own (a
    `DistributedSampler`): that sampler is kept but not read, since every rank already builds the same global plan
    and takes its own batches from it."""

    def __init__(
        self, lengths: list[int], batch_size: int, shuffle: bool = True, seed: int = 0,
        pool_batches: int = 50, rank: int = 0, world_size: int = 1, sampler: Sampler | None = None,
        drop_last: bool = False,
    ) -> None:
        # BatchSampler.__init__ is not called: its sampler-driven batching is replaced by the length plan
        self.lengths, self.batch_size, self.shuffle, self.seed = lengths, batch_size, shuffle, seed
        self.pool_batches, self.rank, self.world_size = pool_batches, rank, world_size
        self.sampler, self.drop_last = sampler, drop_last
        if len(self) == 0:
            raise ValueError(f"{len(lengths)} samples make {math.ceil(len(lengths) / batch_size)} batches of "
                             f"{batch_size}, fewer than the {world_size} ranks: nothing would train; lower batch_size")
        self.epoch = 0
        self.skip = 0  # batches of this epoch already trained before a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, n, pool):
            chunk = sorted(order[start : start + pool], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self):
        batches = self._all_batches()
        per_rank = len(batches) // self.world_size if self.world_size > 1 else len(batches)
        skip, self.skip = self.skip, 0
        return iter(batches[self.rank :: self.world_size][skip:per_rank])

    def __len__(self) -> int:
        n_batches = math.ceil(len(self.lengths) / self.batch_size)
        return n_batches // self.world_size if self.world_size > 1 else n_batches


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `LengthBucketSampler` that Lightning checkpoints mid-epoch: its state is the epoch
    and the number of batches already trained in it (`batches_done`, read from the trainer at save time);
    after a resume the epoch's order is rebuilt and those batches are skipped, so nothing is seen twice or lost."""

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch, "batches_done": self._batches_done()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.set_epoch(state["epoch"])
        self.batch_sampler.skip = state["batches_done"]
