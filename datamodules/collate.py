"""Length-bucketed batches (one plan for every rank) and a data loader that resumes mid-epoch. The tokenisation
and padding of training samples live in `lightning_modules/batching.py` (the signals score with them too).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from lightning_modules.batching import SFTExample, TokenizedExample, collate, tokenize_example

__all__ = ["LengthBucketSampler", "ResumableDataLoader", "SFTExample", "TokenizedExample", "collate",
           "tokenize_example"]


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
