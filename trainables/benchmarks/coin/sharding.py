"""Splitting evaluation work across a trial's ranks and gathering it back in a fixed order.

Every helper works without a process group too (``dist`` None or of world 1): then the whole
input is this process's share and nothing is gathered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def shard_indices(dist, count: int) -> list[int]:
    """This rank's share of ``range(count)`` (all of it without ``dist``)."""
    indices = list(range(count))
    return indices if dist is None else dist.shard(indices)


def gather(dist, value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (``[value]`` without a process group)."""
    if dist is None or dist.world == 1:
        return [value]
    out: list[Any] = [None] * dist.world
    torch.distributed.all_gather_object(out, value)
    return out


def in_order(dist, count: int, indices: list[int], values: list) -> list:
    """The full list of ``count`` values from every rank's ``(indices, values)`` share."""
    if dist is None or dist.world == 1:
        return list(values)
    full: list = [None] * count
    for shard, part in gather(dist, (indices, list(values))):
        for index, value in zip(shard, part, strict=True):
            full[index] = value
    return full


def rows_in_order(dist, count: int, indices: list[int], rows: torch.Tensor) -> torch.Tensor:
    """The ``[count, D]`` CPU tensor whose rows ``indices`` each rank holds as ``rows``."""
    if dist is None or dist.world == 1:
        return rows
    parts = gather(dist, (indices, rows.detach().cpu()))
    full = parts[0][1].new_empty((count, parts[0][1].shape[1]))
    for shard, part in parts:
        if shard:
            full[torch.tensor(shard, dtype=torch.long)] = part
    return full
