"""The rank and world of a trial's ``torch.distributed`` group (world 1 without one).

Ray Train sets the group up; the engine, methods and sharded evaluation only read it through
:class:`Distributed`, so the same code runs in one process and on many workers.
"""

from __future__ import annotations

from typing import Any

import torch


class Distributed:
    """Rank/world of a torch.distributed group (world 1 without one)."""

    def __init__(self) -> None:
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world = torch.distributed.get_world_size() if initialized else 1
        self.rank = torch.distributed.get_rank() if initialized else 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's share of a global batch (ranks take interleaved samples)."""
        return indices[self.rank :: self.world]

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        for param in params:
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad)
                param.grad /= self.world

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        return float(total.item()) / self.world

    def from_rank0(self, value: Any) -> Any:
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
