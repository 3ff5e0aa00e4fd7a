"""A sequence's results from its progress: the accuracy matrix, generation scores and the
continual-learning metrics computed from them (same for every run path)."""

from __future__ import annotations

import json
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
