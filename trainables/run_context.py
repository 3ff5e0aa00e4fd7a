"""What a method's hooks can see of the run they are part of."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainables.distributed import Distributed

if TYPE_CHECKING:
    from trainables.benchmarks import Benchmark
    from trainables.config import RunConfig

Log = Callable[[str], None]


class PhaseTimer:
    """Wall seconds per phase of a run (summed over repeats), for the overhead breakdown."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - started)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


SHARED_BUILD_THREADS = 2  # torch threads of what every trial reads: the base model, the teacher cache


@contextlib.contextmanager
def torch_threads(count: int = SHARED_BUILD_THREADS) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` in this thread for the duration, then restored.

    A reduction split over another number of threads rounds differently (seen on an AVX-512 Xeon:
    a base model pretrained with 1 and with 2 threads differed), so what a sweep's driver builds
    and what a trial would build itself are built with one fixed count, whoever's threads run it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seeded_generator(*key: int) -> torch.Generator:
    """A generator seeded from ``key`` alone, so any step's data can be recomputed after a restart."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


@dataclass
class RunContext:
    """One run's fixed surroundings, handed to every method hook.

    Randomness a hook draws per step must come from :meth:`generator` keyed by the step (never from
    a stream that advances), so a resumed run draws exactly what the uninterrupted one drew.
    """

    config: RunConfig
    work_dir: Path
    bench: Benchmark
    device: torch.device
    dist: Distributed
    log: Log
    timer: PhaseTimer

    def generator(self, *key: int) -> torch.Generator:
        """A generator seeded from the run's seed and ``key`` (e.g. task index, step, purpose)."""
        return seeded_generator(self.config.seed, *key)
