"""The continual-learning engine: one method, one task order → accuracy matrix and generation metrics.

Plain Python, no Ray: the CLI's in-process path, the tests and (later) the Ray Train worker call
:func:`run_sequence`. Order of work:

    prepare data (cached) → base model (cached) → attach method → evaluate stage 0 (base)
    for each task i: fresh AdamW + warmup-cosine → train (task CE + method terms, e.g. λ·KD on
        the image stream) → evaluate every task and generation (stage i) → save adapter checkpoint
    → metrics of the accuracy matrix and of the generation scores per stage
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from trainables import __version__
from trainables.base_model import load_base, pretrain_base
from trainables.batching import SampleSet
from trainables.config import RunConfig
from trainables.data.digits import GENERATION_TASK, SequenceBuilder, build_digits, data_hash, read_tasks, vocabulary
from trainables.data.tokenizers import PixelQuantizer
from trainables.evaluate import ReferenceClassifier, answer_accuracy, generation_scores
from trainables.methods import build_method
from trainables.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer, inter_modal_forgetting
from trainables.vocab import TokenIds

Log = Callable[[str], None]


def prepare_data(config: RunConfig, work_dir: Path) -> Path:
    """The benchmark's task file for ``config.data``, built once per data hash."""
    directory = Path(work_dir) / "data" / data_hash(config.data)
    if not (directory / "tasks.parquet").is_file():
        build_digits(directory, config.data)
    return directory / "tasks.parquet"


class DigitsBenchmark:
    """Everything evaluation needs, loaded once per run."""

    def __init__(self, config: RunConfig, task_file: Path) -> None:
        self.config = config
        self.builder = SequenceBuilder(vocabulary(config.data), PixelQuantizer(config.data.levels))
        self.ids: TokenIds = self.builder.ids
        self.task_file = task_file
        train_images = read_tasks(task_file, [GENERATION_TASK], "train")
        test_images = read_tasks(task_file, [GENERATION_TASK], "test")
        quantizer = self.builder.quantizer
        real_train = quantizer.decode(quantizer.encode(np.asarray(train_images.column("image").to_pylist())))
        self.reference = ReferenceClassifier(real_train, np.asarray(train_images.column("digit").to_pylist()))
        self.real_test_images = np.asarray(test_images.column("image").to_pylist())
        self.test_generation = SampleSet.from_table(test_images, self.ids.pad)
        # Distillation stream: image-only sequences (begin-image … end-image) of train images.
        spans = [self.builder.image_span(np.asarray(img)) for img in train_images.column("image").to_pylist()]
        self.stream = SampleSet(spans, [True] * len(spans), self.ids.pad)
        self.tests = {}
        for task in config.tasks:
            table = read_tasks(task_file, [task], "test")
            self.tests[task] = (table.column("input_ids").to_pylist(), table.column("answer_start").to_pylist())

    def train_set(self, task: str) -> SampleSet:
        return SampleSet.from_table(read_tasks(self.task_file, [task], "train"), self.ids.pad)

    def evaluate(self, model: torch.nn.Module, stage: int) -> tuple[list[float], dict[str, float]]:
        model.eval()
        row = [answer_accuracy(model, *self.tests[task], self.builder) for task in self.config.tasks]
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
        return row, asdict(scores)


def train_task(method, model, samples: SampleSet, stream: SampleSet, config: RunConfig, task_index: int) -> float:
    """One task: fresh optimizer and warmup-cosine schedule; returns the mean loss of the last epoch."""
    train = config.train
    generator = torch.Generator().manual_seed(config.seed * 1000 + task_index)
    params = list(method.trainable_parameters(model))
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    steps = train.epochs * -(-len(samples) // train.batch_size)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(train.warmup_ratio * steps), steps)
    model.train()
    losses: list[float] = []
    for _ in range(train.epochs):
        losses = []
        for batch in samples.batches(train.batch_size, generator):
            stream_batch = stream.stream_batch(train.batch_size, generator) if method.USES_KD else None
            terms = method.loss_terms(model, batch, stream_batch)
            loss = sum(terms.values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    return float(np.mean(losses))


def summarize(tasks: list[str], acc_matrix: list[list[float]], generation: list[dict[str, float]]) -> dict[str, Any]:
    gen_acc = [g["accuracy"] for g in generation]
    gen_fd = [g["frechet"] for g in generation]
    return {
        "tasks": tasks,
        "acc_matrix": acc_matrix,
        "avg_acc": average_accuracy(acc_matrix),
        "forgetting": forgetting(acc_matrix),
        "bwt": backward_transfer(acc_matrix),
        "fwt": forward_transfer(acc_matrix),
        "gen_acc": gen_acc,
        "gen_fd": gen_fd,
        "gen_nll": [g["nll"] for g in generation],
        "inter_modal_forgetting": inter_modal_forgetting(gen_acc),
        "gen_fd_increase": gen_fd[-1] - gen_fd[0],
    }


def run_sequence(config: RunConfig, work_dir: Path, out_dir: Path | None = None, log: Log = print) -> dict[str, Any]:
    """Run ``config``'s task sequence; returns (and writes to ``out_dir/results.json``) the results."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    task_file = prepare_data(config, work_dir)
    base_dir = pretrain_base(config.base, config.data, task_file, Path(work_dir))
    timings["prepare"] = time.perf_counter() - started

    torch.manual_seed(config.seed)
    bench = DigitsBenchmark(config, task_file)
    method = build_method(config.method, bench.ids)
    model = method.attach(load_base(base_dir))

    acc_matrix: list[list[float]] = []
    generation: list[dict[str, float]] = []
    row, scores = bench.evaluate(model, 0)
    acc_matrix.append(row)
    generation.append(scores)
    log(f"stage 0 (base): acc {_fmt(row)}  gen acc {scores['accuracy']:.3f}  gen FD {scores['frechet']:.2f}")
    for index, task in enumerate(config.tasks, start=1):
        task_started = time.perf_counter()
        loss = train_task(method, model, bench.train_set(task), bench.stream, config, index)
        row, scores = bench.evaluate(model, index)
        acc_matrix.append(row)
        generation.append(scores)
        if out_dir is not None:
            method.save(model, Path(out_dir) / "checkpoints" / f"task_{index:02d}")
        log(
            f"stage {index} ({task}): loss {loss:.3f}  acc {_fmt(row)}  gen acc {scores['accuracy']:.3f}  "
            f"gen FD {scores['frechet']:.2f}  [{time.perf_counter() - task_started:.1f}s]"
        )
    timings["total"] = time.perf_counter() - started
    results = {
        **summarize(list(config.tasks), acc_matrix, generation),
        "method": config.method.name,
        "seed": config.seed,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "base_model": str(base_dir),
        "mode_cl_version": __version__,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(out / "results.json")
    return results


def _fmt(row: list[float]) -> str:
    return "[" + " ".join(f"{v:.2f}" for v in row) + "]"
