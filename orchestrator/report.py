"""Rich tables of one run's results (accuracy matrix, forgetting, generation per stage)."""

from __future__ import annotations

import io
import math
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
    table.add_column("trial", no_wrap=True)
    for column in ("status", *(k.removeprefix("config.") for k in config_keys)):
        table.add_column(column)
    for column in ("tasks", "avg acc", "forgetting", "retention", "open-vocab acc", "gen acc", "gen FD", "inter-modal"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.get("trial_name") or row["trial_id"],
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


GROUPED_FORMATS = ("table", "markdown", "latex", "csv", "json", "parquet")
ZERO_SHOT = "zero-shot"  # the method-less base model's group in a results collection


def is_results_collection(path) -> bool:
    """A JSON-lines file of ``results.json`` records (``benchmarks/digits_methods.py`` writes one)
    or a folder holding ``results.json`` files (``mode-cl run --no-ray`` outputs), not a sweep."""
    from pathlib import Path

    from orchestrator.sweep_store import SWEEP_FILE

    path = Path(path)
    if path.is_dir() and (path / SWEEP_FILE).is_file():  # a sweep keeps its trials' results.json too
        return False
    return (path.suffix == ".jsonl" and path.is_file()) or (
        path.is_dir() and next(path.rglob("results.json"), None) is not None
    )


def result_rows(path) -> list[dict[str, Any]]:
    """Rows shaped like a sweep's trial table from a results collection: every config field whose
    value differs between runs becomes a ``config.<field>`` column (seed and tasks always, since
    runs are paired on them), and each run's summary metrics its last stage's values (``gen_acc``
    and ``gen_fd`` are per-stage lists in ``results.json``). When runs differ in ``method.name``,
    each (seed, tasks) also gives one ``zero-shot`` row: the base model's stage 0 (understanding
    and generation before any training), as the paper's zero-shot row."""
    import json
    from pathlib import Path

    from trainables.config_rules import ConfigError

    path = Path(path)
    try:
        if path.is_dir():
            results = [json.loads(f.read_text()) for f in sorted(path.rglob("results.json"))]
        else:
            results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(str(path), f"not a results collection: {type(error).__name__}: {error}") from None
    if not results or not all(isinstance(r, dict) and "config" in r and "acc_matrix" in r for r in results):
        raise ConfigError(str(path), "no results.json records (with config and acc_matrix) in it")
    flat = [flatten_config(r["config"]) for r in results]
    varying = [
        k
        for k in dict.fromkeys(k for f in flat for k in f)
        if len({repr(f.get(k)) for f in flat}) > 1
        and not (k != "seed" and all(f.get(k) == f.get("seed") for f in flat))  # data.seed etc. follow the seed
    ]
    keys = list(dict.fromkeys(["seed", "tasks", *varying]))
    rows, bases = [], {}
    for result, config in zip(results, flat, strict=True):
        row: dict[str, Any] = {"status": "TERMINATED"}
        row |= {f"config.{k}": (",".join(v) if isinstance(v, list) else v) for k, v in config.items() if k in keys}
        for metric in ("avg_acc", "forgetting", "retention", "bwt", "open_avg_acc", "inter_modal_forgetting"):
            row[metric] = result.get(metric)
        for metric in ("gen_acc", "gen_fd"):
            row[metric] = result[metric][-1] if result.get(metric) else None
        row["engine_seconds"] = result.get("profile", {}).get("seconds", {}).get("total")
        rows.append(row)
        if "method.name" in varying:
            base = {
                k: (ZERO_SHOT if k == "config.method.name" else v) for k, v in row.items() if k.startswith("config.")
            }
            base["status"] = "TERMINATED"
            base["avg_acc"] = sum(result["acc_matrix"][0]) / len(result["acc_matrix"][0])
            if result.get("open_acc_matrix"):
                base["open_avg_acc"] = sum(result["open_acc_matrix"][0]) / len(result["open_acc_matrix"][0])
            for metric in ("gen_acc", "gen_fd"):
                base[metric] = result[metric][0] if result.get(metric) else None
            bases.setdefault((row.get("config.seed"), row.get("config.tasks")), base)
    return [*bases.values(), *rows]


def sweep_rows(directory) -> list[dict[str, Any]]:
    """A sweep's trial table, each trial completed from the ``results.json`` it wrote: its seed and
    task order (an extra trial such as a baseline sets neither, but runs them) and its engine
    seconds. A trial that wrote none keeps only what Tune recorded."""
    import json
    from pathlib import Path

    from orchestrator.sweep import trial_table
    from orchestrator.sweep_store import train_run_name

    rows = trial_table(Path(directory))
    for row in rows:
        results_file = Path(directory) / "train" / train_run_name(row["trial_id"]) / "results.json"
        if not results_file.is_file():
            continue
        result = json.loads(results_file.read_text())
        config = result.get("config", {})
        for key in ("seed", "tasks"):
            if key in config and row.get(f"config.{key}") is None:
                row[f"config.{key}"] = column_value(config[key])
        seconds = result.get("profile", {}).get("seconds", {}).get("total")
        if seconds is not None and row.get("engine_seconds") is None:
            row["engine_seconds"] = seconds
    return rows


def column_value(value: Any) -> Any:
    """A config value as a table cell: a list (a task order) joined with commas."""
    return ",".join(value) if isinstance(value, list) else value


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``method.r``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flatten_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def report_groups(
    directory,
    by: list[str],
    baseline: str | None,
    half_width: float | None,
    output_format: str,
    output: str | None,
) -> int:
    """``mode-cl report --group-by``: the trials of a sweep grouped (default: by every swept key but
    the seed), each summary metric as mean ± 95 % Student t interval, optionally paired differences
    against ``--baseline KEY=VALUE`` (runs paired on seed and task order) and the runs a group needs
    for ``--half-width``."""
    from pathlib import Path

    source = result_rows(directory) if is_results_collection(directory) else sweep_rows(Path(directory))
    folder = Path(directory) if Path(directory).is_dir() else Path(directory).parent
    return render_grouped(source, by, baseline, half_width, output_format, output, folder)


def render_grouped(
    source: list[dict[str, Any]],
    by: list[str],
    baseline: str | None,
    half_width: float | None,
    output_format: str,
    output: str | None,
    folder,
    *plain_keys: str,
) -> int:
    """The grouped table of finished rows (``config.<key>`` columns and metrics), printed or
    written to ``output`` (parquet: ``folder/groups.parquet`` by default). ``plain_keys`` are
    grouping columns without the ``config.`` prefix (``source`` in ``mode-cl compare``)."""
    import csv
    import io
    import json
    from pathlib import Path

    import yaml

    from orchestrator.aggregate import INTERVAL, SUMMARY_METRICS, grouped_table
    from trainables.config_rules import ConfigError

    rows = [r for r in source if r.get("status") == "TERMINATED"]
    if not rows:
        raise ConfigError(str(folder), "no finished trial to group")
    swept = [k for k in rows[0] if k.startswith("config.") or k in plain_keys]

    def column(key: str, what: str) -> str:
        name = key if key.startswith("config.") or key in plain_keys else f"config.{key}"
        if name not in swept:
            known = ", ".join(k.removeprefix("config.") for k in swept)
            raise ConfigError(what, f"{key!r} is not a swept key of this sweep (swept: {known})")
        return name

    keys = [column(k, "--group-by") for k in by] or [k for k in swept if k != "config.seed"]
    reference = None
    if baseline is not None:
        key, separator, value = baseline.partition("=")
        if not separator:
            raise ConfigError("--baseline", f"expected KEY=VALUE (e.g. method.name=seq_lora), got {baseline!r}")
        reference = (column(key, "--baseline"), yaml.safe_load(value))
        if reference[0] not in keys:
            keys.append(reference[0])
    pair_on = [k for k in ("config.seed", "config.tasks") if k in swept and k not in keys]
    metrics = [m for m in (*SUMMARY_METRICS, "engine_seconds") if any(r.get(m) is not None for r in rows)]
    try:
        records = grouped_table(rows, keys, metrics, reference, pair_on, half_width)
    except ValueError as error:
        raise ConfigError("--baseline", str(error)) from None
    names = lambda columns: ", ".join(k.removeprefix("config.") for k in columns) or "nothing"  # noqa: E731
    title = f"mean ± 95 % {INTERVAL} interval over runs, grouped by {names(keys)}"
    if reference is not None:
        title += f"; Δ rows: group − {baseline} on runs paired by {names(pair_on)}"
    if output_format in ("json", "csv", "parquet"):
        if output_format == "json":
            text = json.dumps(records, indent=2)
        elif output_format == "csv":
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in records for k in r)))
            writer.writeheader()
            writer.writerows(records)
            text = buffer.getvalue()
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            target = Path(output) if output else Path(folder) / "groups.parquet"
            pq.write_table(pa.Table.from_pylist(records), target)
            print(f"wrote {len(records)} groups to {target}")
            return 0
    else:
        text = _render_groups(records, keys, metrics, half_width, output_format, title)
    if output:
        Path(output).write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {output}")
    else:
        print(text.rstrip("\n"))
    return 0


def _render_groups(records, keys, metrics, half_width, output_format: str, title: str) -> str:
    from orchestrator.aggregate import Interval

    headers = ["", *(k.removeprefix("config.") for k in keys), "n", *metrics]
    body = []
    for record in records:
        cells = []
        for m in metrics:
            cell = Interval(record[f"{m}_n"], record[m], record[f"{m}_ci"], math.nan).text()
            needed = record.get(f"{m}_seeds_needed")
            cells.append(f"{cell} (n≥{needed})" if needed else cell)
        n = max(record[f"{m}_n"] for m in metrics)
        kind = "" if record["kind"] == "group" else "Δ"
        body.append([kind, *("—" if record[k] is None else str(record[k]) for k in keys), str(n), *cells])
    note = f"; (n≥k): runs needed for ± {half_width}" if half_width is not None else ""
    if output_format == "markdown":
        lines = [f"{title}{note}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in body)])
    if output_format == "latex":
        escape = _latex
        columns = "l" * (len(keys) + 2) + "r" * len(metrics)
        lines = [f"% {title}{note}", r"\begin{tabular}{" + columns + "}", r"\toprule"]
        lines.append(" & ".join(escape(h) for h in headers) + r" \\")
        lines.append(r"\midrule")
        lines += [" & ".join(escape(c) for c in row) + r" \\" for row in body]
        return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])
    table = Table(title=f"{title}{note}")
    for header in headers:
        table.add_column(header, justify="right" if header in metrics or header == "n" else "left")
    for row in body:
        table.add_row(*row)
    console = Console(width=220, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def _latex(text: str) -> str:
    return text.replace("_", r"\_").replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("≥", r"$\geq$")


RECOMPUTED = ("acc_matrix", "open_acc_matrix", "avg_acc", "forgetting", "retention", "bwt", "fwt", "gen_acc")
RECOMPUTED += ("inter_modal_forgetting", "open_avg_acc", "open_forgetting")


def recompute_report(path) -> int:
    """``mode-cl report PATH --recompute``: for every ``results.json`` under PATH with its
    ``predictions.parquet`` beside it, every metric recomputed from the predictions alone and
    compared with the value logged; prints one line per run and per differing metric. Exit 0
    when all agree (to 1e-12), 1 otherwise."""
    import json
    from pathlib import Path

    import numpy as np
    import pyarrow.parquet as pq

    from trainables.config_rules import ConfigError
    from trainables.results import PREDICTIONS_FILE, recompute

    path = Path(path)
    files = [path] if path.name == "results.json" else sorted(path.rglob("results.json")) if path.is_dir() else []
    runs = [f for f in files if (f.parent / PREDICTIONS_FILE).is_file()]
    if not runs:
        raise ConfigError(
            str(path), f"no results.json with a {PREDICTIONS_FILE} beside it (runs of mode-cl ≥ 0.1 on digits)"
        )
    differing = 0
    for file in runs:
        logged = json.loads(file.read_text())
        again = recompute(logged, pq.read_table(file.parent / PREDICTIONS_FILE))
        bad = []
        for key in RECOMPUTED:
            if key not in again or key not in logged:
                continue
            a = np.asarray(again[key], dtype=float)
            b = np.asarray(logged[key], dtype=float)
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True):
                bad.append(f"  {key}: logged {logged[key]}, recomputed {again[key]}")
        differing += bool(bad)
        print(f"{file.parent}: {'DIFFERS' if bad else 'equal'} ({len(RECOMPUTED)} metrics from {PREDICTIONS_FILE})")
        for line in bad:
            print(line)
    print(f"{len(runs) - differing} of {len(runs)} runs recompute to their logged metrics")
    return 1 if differing else 0
