"""Batch plans (shuffled, in order, or length-bucketed; one plan for every rank) and a data loader that resumes
mid-epoch. The tokenisation and padding of training samples live in `lightning_modules/batching.py` (the signals
score with them too).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from lightning_modules.batching import SFTExample, TokenizedExample, collate, tokenize_example

__all__ = ["LengthBucketSampler", "ResumableDataLoader", "SFTExample", "ShardedBatchSampler", "TokenizedExample",
           "collate", "ranks", "tokenize_example", "train_loader"]


class ShardedBatchSampler(BatchSampler):
    """One global plan of batches, the same on every rank and deterministic for (seed, epoch): the samples shuffled
    (`randperm` seeded with seed + epoch) or in order, cut into batches. Under several ranks each takes every
    `world_size`-th batch, all ranks the same number (the last batches that cannot go to every rank are dropped,
    so no rank waits on a collective the others never reach). `skip` batches of the epoch are left out once
    (a resume, see `ResumableDataLoader`).

    It follows `BatchSampler`'s API so that Lightning's DDP can rebuild it with a `sampler` of its own (a
    `DistributedSampler`): that sampler is kept but not read, since every rank already builds the same global plan
    and takes its own batches from it."""

    def __init__(
        self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
        sampler: Sampler | None = None, drop_last: bool = False,
    ) -> None:
        # BatchSampler.__init__ is not called: its sampler-driven batching is replaced by the plan
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.sampler, self.drop_last = rank, world_size, sampler, drop_last
        if len(self) == 0:
            raise ValueError(f"{n} samples make {math.ceil(n / batch_size)} batches of {batch_size}, fewer than the "
                             f"{world_size} ranks: nothing would run; lower batch_size")
        self.epoch = 0
        self.skip = 0  # batches of this epoch already done before a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, generator: torch.Generator) -> list[int]:
        return torch.randperm(self.n, generator=generator).tolist() if self.shuffle else list(range(self.n))

    def _all_batches(self) -> list[list[int]]:
        order = self._order(torch.Generator().manual_seed(self.seed + self.epoch))
        return [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]

    def __iter__(self):
        batches = self._all_batches()
        skip, self.skip = self.skip, 0
        return iter(batches[self.rank :: self.world_size][skip : len(self)])

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size) // self.world_size


class LengthBucketSampler(ShardedBatchSampler):
    """Batches of similar length: shuffle, cut into pools of `pool_batches` batches, sort each pool by
    length, split into batches, shuffle the batches. Sharded and resumable as `ShardedBatchSampler`."""

    def __init__(
        self, lengths: list[int], batch_size: int, shuffle: bool = True, seed: int = 0,
        pool_batches: int = 50, rank: int = 0, world_size: int = 1, sampler: Sampler | None = None,
        drop_last: bool = False,
    ) -> None:
        self.lengths, self.pool_batches = lengths, pool_batches
        super().__init__(len(lengths), batch_size, shuffle, seed, rank, world_size, sampler, drop_last)

    def _all_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = self._order(g)
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, self.n, pool):
            chunk = sorted(order[start : start + pool], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ShardedBatchSampler` that Lightning checkpoints mid-epoch: its state is the epoch
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


def ranks(trainer) -> dict[str, int]:
    """A batch plan's `rank` and `world_size`: the trainer's, or one process when there is no trainer."""
    return {"rank": trainer.global_rank, "world_size": trainer.world_size} if trainer else {"rank": 0, "world_size": 1}


def train_loader(dataset, sampler: ShardedBatchSampler, collate_fn: Callable, trainer=None,
                 num_workers: int = 0) -> DataLoader:
    """The fit loader: resumable mid-epoch under a trainer (its position is in the checkpoint), else plain."""
    if trainer is None:
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
                               batches_done=lambda: progress.processed)
