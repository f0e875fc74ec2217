"""torch.distributed in a few helpers (Lightning's strategies set up the process group; nothing here starts one)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (`[obj]` when not distributed); every rank must call it alike."""
    world = dist_info()[1]
    if world == 1:
        return [obj]
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, obj)
    return parts


def all_ranks(flag: bool) -> bool:
    """Whether `flag` holds on every rank: a decision to skip an update (a non-finite loss, an empty filter) must be
    the same everywhere, or the ranks that step wait forever on the gradient all-reduce of those that do not."""
    return all(gather_objects(bool(flag)))


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on some rank (see `all_ranks`)."""
    return any(gather_objects(bool(flag)))


def gather_all(values: Tensor) -> Tensor:
    """All ranks' values concatenated in rank order (the values themselves when not distributed)."""
    parts = gather_objects(values.cpu())
    return values if len(parts) == 1 else torch.cat(parts).to(values.device)


def kept_anywhere(keep: Tensor) -> bool:
    """Whether any rank keeps a candidate (every rank must call it alike)."""
    return sum(gather_objects(int(keep.sum()))) > 0


def global_percentile(values: Tensor, q: float) -> float:
    """The q-th percentile (0..100, linear interpolation, like numpy's default) over all ranks' finite values."""
    pooled = gather_all(values.double())
    pooled = pooled[torch.isfinite(pooled)]
    if pooled.numel() == 0:
        return math.nan
    return torch.quantile(pooled, q / 100).item()


def global_sum(count: int) -> int:
    """A count summed over ranks (itself when not distributed); every rank must call it alike."""
    return sum(gather_objects(count))
