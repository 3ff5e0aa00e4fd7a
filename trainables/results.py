"""A sequence's results from its progress: the accuracy matrix, generation scores and the
continual-learning metrics computed from them (same for every run path)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from trainables import __version__
from trainables.checkpoint import Progress
from trainables.config import RunConfig
from trainables.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    inter_modal_forgetting,
    retention,
)


def summarize(tasks: list[str], acc_matrix: list[list[float]], generation: list[dict[str, float]]) -> dict[str, Any]:
    """Every summary metric of an accuracy matrix (rows: base, after task 1, …) and the other
    scores of the same stages (generation; the open-vocabulary accuracy row where the benchmark
    scores answers two ways, whose metrics get an ``open_`` prefix)."""
    gen_acc = [g["accuracy"] for g in generation]
    gen_fd = [g["frechet"] for g in generation]
    open_rows = {}
    if generation and all("open_accuracy" in g for g in generation):
        open_matrix = [list(g["open_accuracy"])[: len(tasks)] for g in generation]
        open_rows = {
            "open_acc_matrix": open_matrix,
            "open_avg_acc": average_accuracy(open_matrix),
            "open_forgetting": forgetting(open_matrix),
        }
    return {
        "tasks": tasks,
        "acc_matrix": acc_matrix,
        "avg_acc": average_accuracy(acc_matrix),
        "forgetting": forgetting(acc_matrix),
        "retention": retention(acc_matrix),
        "bwt": backward_transfer(acc_matrix),
        "fwt": forward_transfer(acc_matrix),
        "gen_acc": gen_acc,
        "gen_fd": gen_fd,
        "gen_nll": [g["nll"] for g in generation],
        "inter_modal_forgetting": inter_modal_forgetting(gen_acc),
        "gen_fd_increase": gen_fd[-1] - gen_fd[0],
        **open_rows,
    }


def metrics_so_far(config: RunConfig, progress: Progress) -> dict[str, Any]:
    """The metrics of the stages done so far (reported with every checkpoint)."""
    done = progress.next_task
    if done == 0:  # the base model: objective-style numbers exist already, forgetting does not
        generation = progress.generation[0]
        return {
            "tasks_done": 0,
            "avg_acc": float(np.mean(progress.acc_matrix[0])),
            "gen_acc": [generation["accuracy"]],
            "gen_fd": [generation["frechet"]],
            "gen_nll": [generation["nll"]],
        }
    matrix = [row[:done] for row in progress.acc_matrix[: done + 1]]
    summary = summarize(list(config.tasks[:done]), matrix, progress.generation[: done + 1])
    return {"tasks_done": done, **summary}


def results_from_progress(config: RunConfig, progress: Progress) -> dict[str, Any]:
    """The results of a finished sequence, from its final progress (same for every run path)."""
    return {
        **summarize(list(config.tasks), progress.acc_matrix, progress.generation),
        "method": config.method.name,
        "seed": config.seed,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "task_log": progress.task_log,
        "losses": progress.losses,
        "mode_cl_version": __version__,
    }


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    """``results.json`` in ``out_dir``, written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    return tmp.replace(out_dir / "results.json")


PREDICTIONS_FILE = "predictions.parquet"
PREDICTION_COLUMNS = ("stage", "kind", "task", "sample", "target", "prediction", "correct", "open_prediction")


def stage_predictions(stage: int, scores: dict[str, Any]) -> dict[str, list] | None:
    """One evaluation stage's per-sample predictions as columns (:data:`PREDICTION_COLUMNS`), or
    None when the benchmark keeps none. Rows of ``kind`` "answer": the task, the sample's index in
    the task's test set, the reference answer, the constrained and the open-vocabulary prediction;
    rows of ``kind`` "generation": the generated image's index, the digit asked for (``target``)
    and the reference classifier's reading of it (``prediction``)."""
    kept = scores.get("predictions")
    if kept is None:
        return None
    answers, generated = kept["answers"], kept.get("generation") or {"prompted": [], "recognized": []}
    n, m = len(answers["target"]), len(generated["prompted"])
    return {
        "stage": [stage] * (n + m),
        "kind": ["answer"] * n + ["generation"] * m,
        "task": [*answers["task"], *[None] * m],
        "sample": [*answers["sample"], *range(m)],
        "target": [*answers["target"], *(str(d) for d in generated["prompted"])],
        "prediction": [*answers["prediction"], *(str(d) for d in generated["recognized"])],
        "correct": [
            *(p == t for p, t in zip(answers["prediction"], answers["target"], strict=True)),
            *(p == r for p, r in zip(generated["prompted"], generated["recognized"], strict=True)),
        ],
        "open_prediction": [*answers["open_prediction"], *[None] * m],
    }


def predictions_table(stages: list[dict[str, Any]], first_stage: int = 0):
    """The per-sample predictions of these stages' scores as one Arrow table (None when the
    benchmark keeps none)."""
    import pyarrow as pa

    parts = [stage_predictions(first_stage + i, scores) for i, scores in enumerate(stages)]
    if not parts or any(part is None for part in parts):
        return None
    types = {"stage": pa.int32(), "sample": pa.int32(), "correct": pa.bool_()}
    columns = {k: [v for part in parts for v in part[k]] for k in PREDICTION_COLUMNS}
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in columns.items()})


def write_predictions(progress: Progress, out_dir: Path) -> Path | None:
    """``predictions.parquet`` in ``out_dir`` (atomically), when the benchmark keeps predictions."""
    import pyarrow.parquet as pq

    table = predictions_table(progress.generation)
    if table is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{PREDICTIONS_FILE}.tmp"
    pq.write_table(table, tmp)
    return tmp.replace(out_dir / PREDICTIONS_FILE)


def recompute(results: dict[str, Any], table) -> dict[str, Any]:
    """The results' accuracy matrices, generation accuracies and every metric derived from them,
    recomputed from a predictions table alone (the Fréchet distance and image NLL cannot be: they
    are taken from ``results``). Accuracy of a task at a stage = share of its answer rows whose
    prediction equals the target (NaN where the stage did not evaluate the task); generation
    accuracy = share of the stage's generation rows the classifier read as the digit asked for."""
    tasks = list(results["tasks"])
    rows = table.to_pylist()
    stages = len(results["acc_matrix"])

    def share(selected: list[bool]) -> float:
        return sum(selected) / len(selected) if selected else math.nan

    acc, open_acc, generation = [], [], []
    for stage in range(stages):
        mine = [r for r in rows if r["stage"] == stage]
        answers = {task: [r for r in mine if r["kind"] == "answer" and r["task"] == task] for task in tasks}
        acc.append([share([r["prediction"] == r["target"] for r in answers[t]]) for t in tasks])
        open_acc.append([share([r["open_prediction"] == r["target"] for r in answers[t]]) for t in tasks])
        drawn = [r["prediction"] == r["target"] for r in mine if r["kind"] == "generation"]
        generation.append(
            {
                "accuracy": share(drawn),
                "frechet": results["gen_fd"][stage],
                "nll": results["gen_nll"][stage],
                "open_accuracy": open_acc[-1],
            }
        )
    return summarize(tasks, acc, generation)
