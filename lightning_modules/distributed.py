"""torch.distributed in a few helpers (Lightning's strategies set up the process group; nothing here starts one)."""

from __future__ import annotations

import torch


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
