"""Benchmarks: what a continual-learning run learns and how each stage is scored.

A benchmark is one package under ``trainables/benchmarks/`` whose ``benchmark`` module exposes three
functions —
``prepare(config, work_dir)`` (build what is cached and shared by every trial, on the driver),
``open(config, work_dir, log, show_progress, timer)`` (→ a :class:`Benchmark`) and
``check_inputs(config)`` (fail fast, one line, before anything starts) — and a class that follows
the :class:`Benchmark` protocol. The engine knows only this protocol; :func:`benchmark_module`
picks the package for a run config.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import nn

    from trainables.batching import SampleSet
    from trainables.config import RunConfig
    from trainables.distributed import Distributed
    from trainables.vocab import TokenIds

Log = Callable[[str], None]
Timer = Callable[[str], contextlib.AbstractContextManager]


class Benchmark(Protocol):
    """What the engine needs from a benchmark, opened for one run.

    Attributes:
        ids: the model's special token ids (image span, separator, pad), read from its vocabulary.
        stream: image-only sequences (begin-image … end-image) of training images, for methods
            that distil image generation from the frozen base model.
        sharded_eval: True if :meth:`evaluate` splits its work across the trial's ranks (every
            rank calls it); False if rank 0 evaluates alone and the engine broadcasts the result.
    """

    ids: TokenIds
    stream: SampleSet
    sharded_eval: bool

    def load_base_model(self) -> nn.Module:
        """The frozen base model the method is attached to (a fresh copy per call)."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model after the method is attached, made ready for training (e.g. activation
        checkpointing); most benchmarks return it unchanged."""

    def train_set(self, task: str) -> SampleSet:
        """The training samples of ``task``."""

    def evaluate(
        self, model: nn.Module, stage: int, tasks: Sequence[int], generation: bool, dist: Distributed | None
    ) -> tuple[list[float], dict[str, float]]:
        """Answer accuracy of each task index in ``tasks`` (NaN for the others) and the stage's other
        scores: if ``generation``, the generation scores ``accuracy``, ``frechet``, ``nll`` (else
        NaN); optionally ``open_accuracy``, a second accuracy row (open-vocabulary exact match where
        the first is constrained to each task's answers), which results and tracking pick up."""


BENCHMARKS = ("digits", "coin")


def benchmark_name(config: RunConfig) -> str:
    """The benchmark a run config selects: ``coin`` when it has a ``coin`` section, else ``digits``."""
    return "coin" if config.coin is not None else "digits"


def benchmark_module(config: RunConfig) -> ModuleType:
    """The ``benchmark`` module of the run's benchmark package (imported on first use: CoIN pulls in
    heavier modules)."""
    return importlib.import_module(f"trainables.benchmarks.{benchmark_name(config)}.benchmark")


def prepare(config: RunConfig, work_dir: Path, show_progress: bool = True) -> None:
    """Build what the run's benchmark caches in ``work_dir`` and every trial shares (on the driver,
    once, before workers start)."""
    benchmark_module(config).prepare(config, Path(work_dir), show_progress)


def prepare_all(configs: Sequence[RunConfig], work_dir: Path, show_progress: bool = True) -> None:
    """:func:`prepare` for every config of a sweep: trials that differ in seed may need their own
    data and base model (each is built once; configs that share them find them cached)."""
    for config in configs:
        prepare(config, work_dir, show_progress)


def open_benchmark(
    config: RunConfig, work_dir: Path, log: Log = print, show_progress: bool = True, timer: Timer | None = None
) -> Benchmark:
    """The run's benchmark, with its data loaded (``timer(phase)`` times the phases)."""
    timer = timer or (lambda phase: contextlib.nullcontext())
    return benchmark_module(config).open(config, Path(work_dir), log, show_progress, timer)


def check_inputs(config: RunConfig) -> None:
    """Raise a one-line user error if the run's model or data are unusable, before anything starts."""
    benchmark_module(config).check_inputs(config)
