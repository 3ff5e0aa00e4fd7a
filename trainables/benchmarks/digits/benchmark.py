"""The embedded digits benchmark opened for one run: test sets, the reference classifier that
scores generated digits, and the distillation stream."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainables.batching import SampleSet
from trainables.benchmarks.digits.base_model import load_base, pretrain_base
from trainables.benchmarks.digits.data import (
    GENERATION_TASK,
    SequenceBuilder,
    build_digits,
    data_hash,
    read_tasks,
    task_spec,
    vocabulary,
)
from trainables.benchmarks.digits.evaluate import ReferenceClassifier, answer_accuracies, generation_scores
from trainables.benchmarks.digits.tokenizers import PixelQuantizer
from trainables.config import RunConfig
from trainables.distributed import Distributed
from trainables.vocab import TokenIds


class DigitsBenchmark:
    """Everything training and evaluation need, loaded once per run. Evaluation runs on rank 0
    (the tiny model evaluates in seconds); the engine broadcasts its result."""

    sharded_eval = False

    def __init__(self, config: RunConfig, task_file: Path, base_dir: Path) -> None:
        self.config = config
        self.base_dir = base_dir
        self.builder = SequenceBuilder(vocabulary(config.data), PixelQuantizer(config.data.levels))
        self.ids: TokenIds = self.builder.ids
        self.task_file = task_file
        train_images = read_tasks(task_file, [GENERATION_TASK], "train")
        test_images = read_tasks(task_file, [GENERATION_TASK], "test")
        quantizer = self.builder.quantizer
        real_train = quantizer.decode(quantizer.encode(np.asarray(train_images.column("image").to_pylist())))
        labels = np.asarray(train_images.column("digit").to_pylist())
        self.reference = ReferenceClassifier.cached(real_train, labels, Path(task_file).parent)
        self.real_test_images = np.asarray(test_images.column("image").to_pylist())
        self.test_generation = SampleSet.from_table(test_images, self.ids.pad)
        # Distillation stream: image-only sequences (begin-image … end-image) of train images.
        spans = [self.builder.image_span(np.asarray(img)) for img in train_images.column("image").to_pylist()]
        self.stream = SampleSet(spans, [True] * len(spans), self.ids.pad)
        self.tests = {}
        for task in config.tasks:
            table = read_tasks(task_file, [task], "test")
            answer_ids = self.builder.words.encode(" ".join(task_spec(task).answers))
            self.tests[task] = (
                table.column("input_ids").to_pylist(),
                table.column("answer_start").to_pylist(),
                answer_ids,
            )

    def load_base_model(self) -> nn.Module:
        return load_base(self.base_dir)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def train_set(self, task: str) -> SampleSet:
        return SampleSet.from_table(read_tasks(self.task_file, [task], "train"), self.ids.pad)

    def evaluate(
        self,
        model: nn.Module,
        stage: int,
        tasks: Sequence[int],
        generation: bool = True,
        dist: Distributed | None = None,
    ) -> tuple[list[float], dict[str, float]]:
        """Accuracy on each task in ``tasks`` (NaN for the others; constrained to the task's
        answers) and the stage's other scores: ``open_accuracy``, the open-vocabulary row, and if
        ``generation`` the generation scores (else NaN). Not sharded: ``dist`` is ignored."""
        model.eval()
        asked = {index: task for index, task in enumerate(self.config.tasks) if index in tasks}
        scored = answer_accuracies(model, {task: self.tests[task] for task in asked.values()}, self.builder)
        answers = {index: scored[task] for index, task in asked.items()}
        row = [answers[index].constrained if index in answers else math.nan for index in range(len(self.config.tasks))]
        open_row = [answers[index].open if index in answers else math.nan for index in range(len(self.config.tasks))]
        word = self.builder.words.id_to_word.get
        predictions: dict[str, Any] = {
            "answers": {
                "task": [self.config.tasks[i] for i, a in answers.items() for _ in a.targets],
                "sample": [n for a in answers.values() for n in range(len(a.targets))],
                "target": [word(t) for a in answers.values() for t in a.targets],
                "prediction": [word(p) for a in answers.values() for p in a.predicted],
                "open_prediction": [word(p, "<code>") for a in answers.values() for p in a.open_predicted],
            }
        }
        if not generation:
            scores = {"accuracy": math.nan, "frechet": math.nan, "nll": math.nan, "open_accuracy": open_row}
            return row, {**scores, "predictions": predictions}
        scores = generation_scores(
            model,
            self.builder,
            self.reference,
            self.real_test_images,
            self.test_generation,
            self.config.eval.gen_samples_per_digit,
            self.config.eval.gen_temperature,
            seed=self.config.seed * 1000 + stage,
        )
        predictions["generation"] = {"prompted": scores.prompted, "recognized": scores.recognized}
        summary = {"accuracy": scores.accuracy, "frechet": scores.frechet, "nll": scores.nll}
        return row, {**summary, "open_accuracy": open_row, "predictions": predictions}


def task_file(config: RunConfig, work_dir: Path) -> Path:
    """The task file for ``config.data``, built once per data hash under ``work_dir``."""
    directory = Path(work_dir) / "data" / data_hash(config.data)
    if not (directory / "tasks.parquet").is_file():
        build_digits(directory, config.data)
    return directory / "tasks.parquet"


def prepare(config: RunConfig, work_dir: Path, show_progress: bool = True) -> Path:
    """Build (or find cached) the task file and the pretrained base model; returns the base model's
    directory."""
    return pretrain_base(config.base, config.data, task_file(config, work_dir), Path(work_dir), show_progress)


def open(
    config: RunConfig,
    work_dir: Path,
    log: Callable[[str], None] = print,
    show_progress: bool = True,
    timer: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> DigitsBenchmark:
    timer = timer or (lambda phase: contextlib.nullcontext())
    with timer("data"):
        tasks = task_file(config, work_dir)
    with timer("base_model"):
        base_dir = pretrain_base(config.base, config.data, tasks, Path(work_dir), show_progress=show_progress)
    torch.manual_seed(config.seed)
    with timer("benchmark"):
        return DigitsBenchmark(config, tasks, base_dir)


def check_inputs(config: RunConfig) -> None:
    """Nothing to check beyond the run config: the data ship with scikit-learn."""
