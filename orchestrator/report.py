"""Rich tables of one run's results (accuracy matrix, forgetting, generation per stage)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table


def wide_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output goes to a file or pipe."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def print_results(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or wide_console()
    tasks = results["tasks"]
    matrix = Table(title=f"accuracy matrix ({results['method']}, seed {results['seed']}) and generation per stage")
    matrix.add_column("after")
    for task in tasks:
        matrix.add_column(task, justify="right")
    for column in ("gen acc", "gen FD", "image NLL"):
        matrix.add_column(column, justify="right")
    for stage, row in enumerate(results["acc_matrix"]):
        name = "base" if stage == 0 else f"{stage}: {tasks[stage - 1]}"
        matrix.add_row(
            name,
            *(_f(v, 2) for v in row),
            _f(results["gen_acc"][stage]),
            _f(results["gen_fd"][stage], 2),
            _f(results["gen_nll"][stage]),
        )
    console.print(matrix)
    summary = Table(title="forgetting")
    columns = ["avg acc", "forgetting", "retention", "BWT", "FWT", "inter-modal forgetting (gen acc drop)"]
    open_scored = "open_avg_acc" in results  # answers also scored over the whole vocabulary
    for column in (*columns, "gen FD increase", *(("open-vocab avg acc", "open-vocab forgetting") * open_scored)):
        summary.add_column(column, justify="right")
    summary.add_row(
        _f(results["avg_acc"]),
        _f(results["forgetting"]),
        _f(results.get("retention")),
        _f(results["bwt"]),
        _f(results["fwt"]),
        _f(results["inter_modal_forgetting"]),
        _f(results["gen_fd_increase"], 2),
        *((_f(results["open_avg_acc"]), _f(results["open_forgetting"])) * open_scored),
    )
    console.print(summary)


def print_trials(rows: list[dict[str, Any]], objective: str, console: Console | None = None) -> None:
    console = console or wide_console()
    table = Table(title=f"trials (sorted by {objective})")
    config_keys = sorted({k for r in rows for k in r if k.startswith("config.")})
    for column in ("trial", "status", *(k.removeprefix("config.") for k in config_keys)):
        table.add_column(column)
    for column in ("tasks", "avg acc", "forgetting", "retention", "open-vocab acc", "gen acc", "gen FD", "inter-modal"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["trial_id"],
            row["status"],
            *(str(row.get(k, "")) for k in config_keys),
            str(row.get("tasks_done") if row.get("tasks_done") is not None else "—"),
            _f(row.get("avg_acc")),
            _f(row.get("forgetting")),
            _f(row.get("retention")),
            _f(row.get("open_avg_acc")),
            _f(row.get("gen_acc")),
            _f(row.get("gen_fd"), 2),
            _f(row.get("inter_modal_forgetting")),
        )
    console.print(table)


def report_trials(directory, output_format: str, output: str | None) -> int:
    import json
    from pathlib import Path

    from orchestrator.sweep import trial_table

    rows = trial_table(Path(directory))
    if output_format == "json":
        print(json.dumps(rows, indent=2))
    elif output_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        target = Path(output) if output else Path(directory) / "trials.parquet"
        pq.write_table(pa.Table.from_pylist(rows), target)
        print(f"wrote {len(rows)} trials to {target}")
    else:
        print_trials(rows, "objective")
    return 0


def print_plan(plan: dict[str, Any], config) -> None:
    """``mode-cl run --dry-run``: the resource plan of ``config`` (see :mod:`trainables.plan`)."""
    console = wide_console()
    table = Table(title=f"resource plan: method {config.method.name}, tasks {list(config.tasks)} (no weights loaded)")
    table.add_column("item")
    table.add_column("value", overflow="fold")
    table.add_row("model shape from", plan["model_source"])
    table.add_row("base parameters", f"{plan['base_params']:,} (VQ-VAE {plan['vq_params']:,}), {plan['dtype']}")
    table.add_row("adapter parameters", f"{plan['adapter_params']:,} ({100 * plan['adapter_share']:.2f} % of base)")
    table.add_row(
        "batch",
        f"global {plan['global_batch']} = {plan['workers']} worker(s) × {plan['micro_batch_per_worker']}, "
        f"max length {plan['max_length']}, gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}",
    )
    memory = plan["memory_gib_per_worker"]
    parts = ", ".join(f"{name} {value:.1f}" for name, value in memory.items() if name != "total")
    table.add_row("GPU memory per worker (estimate)", f"{memory['total']:.1f} GiB ({parts} GiB)")
    steps = ", ".join(
        f"{task} {n if n is not None else '? (not imported yet)'}" for task, n in plan["steps_per_task"].items()
    )
    table.add_row("steps per task", steps)
    console.print(table)
    console.print(f"config ok (hash {config.config_hash()}); nothing was started")


def print_collection(directory, result, work_dir, dry_run: bool) -> None:
    """``mode-cl gc``: what was (or would be) removed, and the disk footprint after it."""
    from orchestrator.gc import tree_size

    console = wide_console()
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{len(result.finished)} finished trial(s): {verb} {len(result.removed)} checkpoint(s), "
        f"{result.freed_bytes / 2**20:.1f} MiB; {len(result.unfinished)} unfinished trial(s) left as they are"
    )
    table = Table(title="disk footprint")
    table.add_column("what")
    table.add_column("MiB", justify="right")
    table.add_row(f"sweep {directory.name} (Tune/Train state, checkpoints)", f"{tree_size(directory) / 2**20:.1f}")
    for name, what in (("mlflow", "MLflow store (all sweeps)"), ("base", "base models"), ("data", "task data"),
                       ("teacher_cache", "teacher caches")):  # fmt: skip
        table.add_row(f"{what}: {work_dir / name}", f"{tree_size(work_dir / name) / 2**20:.1f}")
    console.print(table)
