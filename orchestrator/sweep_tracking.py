"""A sweep's MLflow side on the driver: the parent run, its status, and the summary at the end.

Each trial logs into its own child run (:class:`trainables.tracking.TrialTracker`, on the trial's
rank-0 worker); this module owns the parent: it is created with the sweep, marked FAILED/KILLED
when the driver dies, RUNNING again on resume, and finished with ``trials.parquet``/``.csv``, the
understanding-vs-generation Pareto plot, and the best trial's adapter in the model registry.
:func:`tracking_and_ray` starts a sweep command's MLflow server and Ray side by side.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Log = Callable[[str], None]


@dataclass(frozen=True)
class ParentRun:
    """A sweep's parent run on a tracking server."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


@dataclass(frozen=True)
class TrackingChoice:
    """Where a sweep command logs: ``uri`` (flag or MLFLOW_TRACKING_URI), else an embedded server
    on ``store``; nowhere with ``disabled``."""

    uri: str | None
    disabled: bool
    store: Path

    @property
    def embedded(self) -> bool:
        """Whether the sweep command runs its own server on ``store``."""
        return not (self.disabled or self.uri)

    def server_booting(self) -> contextlib.AbstractContextManager[None]:
        """The embedded server starts now when its store exists, and boots while the command
        imports and checks its input (:func:`orchestrator.mlflow_server.server_booting`); nothing
        for a configured or disabled one."""
        from orchestrator.mlflow_server import server_booting

        return server_booting(self.store) if self.embedded else contextlib.nullcontext()


def tracking_and_ray(
    choice: TrackingChoice,
    address: str | None,
    log: Log,
    body: Callable[[str | None], T],
    prepare: Callable[[str | None], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> T:
    """``body(tracking_uri)`` with the tracking server up (the embedded one started here unless a
    server is configured). Ray starts, then ``prepare(tracking_uri)`` runs (work that needs Ray but
    not yet the server), while the server boots. With ``on_ready(tracking_uri)``, ``body`` does not
    wait for the server: ``on_ready`` is called once it answers (directly, for a configured one)."""
    from orchestrator.mlflow_server import tracking_server
    from orchestrator.ray_runtime import init_ray

    def start(tracking_uri: str | None) -> None:
        init_ray(address)
        if prepare is not None:
            prepare(tracking_uri)

    if not choice.embedded:
        uri = None if choice.disabled else choice.uri
        if prepare is not None:
            start(uri)
        if on_ready is not None and uri:
            on_ready(uri)
        return body(uri)
    with tracking_server(choice.store, log=log, while_starting=start, on_ready=on_ready) as local_uri:
        return body(local_uri)


# The MLflow UI (3.x) opens an experiment in its GenAI view unless this tag says otherwise.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def create_parent_run(tracking_uri: str, space_path: Path, sweep_name: str) -> ParentRun:
    """The sweep's experiment (by name) and a new parent run holding the space file."""
    import ray
    import torch
    from mlflow.tracking import MlflowClient

    from trainables import __version__

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(sweep_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(sweep_name)
    if experiment is None or EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind set by the user stays
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    tags = {"sweep": sweep_name, "mode_cl_version": __version__, "ray": ray.__version__, "torch": torch.__version__}
    tags["git_commit"] = _git_commit()
    parent = client.create_run(experiment_id, run_name=f"{sweep_name} (sweep)", tags=tags)
    client.log_artifact(parent.info.run_id, str(space_path))
    return ParentRun(tracking_uri, experiment_id, parent.info.run_id)


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


@contextmanager
def parent_status_on_failure(parent: ParentRun | None) -> Iterator[None]:
    """A sweep that dies with an exception (or Ctrl-C) marks its parent run FAILED / KILLED
    instead of leaving it RUNNING; `mode-cl resume` sets it back to RUNNING."""
    try:
        yield
    except BaseException as error:
        if parent is not None:
            from mlflow.tracking import MlflowClient

            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            MlflowClient(parent.tracking_uri).set_terminated(parent.parent_run_id, status)
        raise


def parent_run_reopener(parent: ParentRun | None) -> Callable[[], None]:
    """A call that sets the sweep's parent run (FAILED/KILLED when its driver died) RUNNING again.

    MLflow is imported and the client built here, on the caller's thread, so that the call itself
    imports nothing: ``mode-cl resume`` makes it from a watcher thread while ``Tuner.fit`` imports
    on the main thread, and importing MLflow's ~1,600 modules from two threads at once left
    ``mlflow`` half-initialised now and then (the sweep then failed at its end with "partially
    initialized module 'mlflow' has no attribute 'version'")."""
    if parent is None:
        return lambda: None
    import netrc  # noqa: F401  (requests imports it lazily on the first request)

    import mlflow.tracking.request_header.registry  # noqa: F401  (imported lazily by the first request)
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(parent.tracking_uri), parent.parent_run_id
    return lambda: client.update_run(run_id, status="RUNNING")


GROUPED_METRICS = ("avg_acc", "forgetting", "gen_acc", "inter_modal_forgetting")


def _stage_curves(
    records: list[dict[str, Any]], rows: list[dict[str, Any]], results: dict[str, dict], path: Path
) -> bool:
    """``groups_stages.png``: per group, the average accuracy over the tasks learned so far and the
    generation accuracy after each stage, mean with its 95 % t band over the group's runs (from
    each finished trial's ``results.json``). False when no trial has one."""
    import matplotlib.pyplot as plt
    import numpy as np

    from orchestrator.aggregate import group_key, t_interval

    keys = [k for k in records[0] if k.startswith("config.")]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for record in records:
        mine = [r for r in rows if group_key(r, keys) == group_key(record, keys)]
        members = [results[r["trial_id"]] for r in mine if r.get("trial_id") in results]
        if not members:
            continue
        label = " ".join(str(record[k]) for k in keys) or "all"
        stages = max(len(m["acc_matrix"]) for m in members)
        for axis, value in (
            (left, lambda m, k: float(np.mean(m["acc_matrix"][k][:k])) if 1 <= k < len(m["acc_matrix"]) else None),
            (right, lambda m, k: m["gen_acc"][k] if k < len(m["gen_acc"]) else None),
        ):
            first = 1 if axis is left else 0
            intervals = [t_interval(value(m, k) for m in members) for k in range(first, stages)]
            x = list(range(first, stages))
            mean = np.array([i.mean for i in intervals])
            half = np.nan_to_num(np.array([i.half for i in intervals]))
            line = axis.plot(x, mean, marker="o", label=label)[0]
            low, high = np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1)  # accuracies: the band within [0, 1]
            axis.fill_between(x, low, high, alpha=0.2, color=line.get_color())
            axis.set_ylim(-0.02, 1.02)
            axis.set_xticks(x)
        drawn = True
    if drawn:
        left.set(xlabel="tasks learned", ylabel="avg accuracy over learned tasks", title="understanding")
        right.set(xlabel="tasks learned", ylabel="generation accuracy", title="generation")
        left.legend(fontsize=7)
        figure.suptitle("mean ± 95 % t band over each group's runs", fontsize=9)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    plt.close(figure)
    return drawn


def log_grouped(
    parent: ParentRun, rows: list[dict[str, Any]], final: bool, results: dict[str, dict] | None = None
) -> None:
    """The sweep's grouped table (``mode-cl report --group-by``'s default grouping: every swept key
    but the seed) as ``groups/groups.md`` and ``groups/groups.parquet``, and ``groups/groups.png``
    (each metric per group, mean with its 95 % t interval as error bar), on the parent run; a
    refresh as trials finish replaces the previous one, and ``final`` marks the last."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    from orchestrator.report import render_grouped

    done = [r for r in rows if r.get("status") == "TERMINATED" and r.get("avg_acc") is not None]
    if not done:
        return
    client = MlflowClient(parent.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        out = Path(tmp)
        render_grouped(done, [], None, None, "markdown", str(out / "groups.md"), out)
        render_grouped(done, [], None, None, "parquet", str(out / "groups.parquet"), out)
        render_grouped(done, [], None, None, "json", str(out / "groups.json"), out)
        records = [r for r in json.loads((out / "groups.json").read_text()) if r["kind"] == "group"]
        (out / "groups.json").unlink()
        keys = [k for k in records[0] if k.startswith("config.")]
        labels = [" ".join(str(r[k]) for k in keys) or "all" for r in records]
        figure, axes = plt.subplots(
            1, len(GROUPED_METRICS), figsize=(3.2 * len(GROUPED_METRICS), 0.3 * len(records) + 2)
        )
        for axis, metric in zip(axes, GROUPED_METRICS, strict=True):
            means = [r.get(metric) for r in records]
            halves = [r.get(f"{metric}_ci") for r in records]
            halves = [h if h is not None and h == h else 0.0 for h in halves]  # NaN: one run, no interval
            axis.barh(range(len(records)), [m if m is not None else 0.0 for m in means], xerr=halves, capsize=3)
            axis.set_yticks(range(len(records)), labels if axis is axes[0] else [""] * len(records), fontsize=7)
            axis.set_title(metric, fontsize=9)
        status = "final" if final else f"{len(done)} trials so far"
        figure.suptitle(f"mean ± 95 % t interval per group ({status})", fontsize=9)
        figure.tight_layout()
        figure.savefig(out / "groups.png", dpi=100)
        plt.close(figure)
        if results:
            _stage_curves(records, done, results, out / "groups_stages.png")
        client.log_artifacts(parent.parent_run_id, tmp, "groups")


def finish_parent_run(
    parent: ParentRun, rows: list[dict[str, Any]], sweep: str, log: Log, train_dir: Path | None = None
) -> None:
    """The summary artifacts, the best trial's registered adapter, and status FINISHED.
    ``train_dir``: where the trials' Train runs keep their ``results.json`` (per-stage curves)."""
    from orchestrator.sweep_store import train_run_name

    results = {}
    for row in rows if train_dir is not None else []:
        file = Path(train_dir) / train_run_name(row["trial_id"]) / "results.json"
        if file.is_file():
            results[row["trial_id"]] = json.loads(file.read_text())
    log_grouped(parent, rows, final=True, results=results)
    _log_summary(parent, rows)
    registered = _register_best(parent, rows, sweep)
    if registered:
        log(f"best trial's adapter registered in MLflow as {registered}")


def _log_summary(parent: ParentRun, rows: list[dict[str, Any]]) -> None:
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, Path(tmp) / "trials.parquet")
        pacsv.write_csv(table, Path(tmp) / "trials.csv")
        done = [r for r in rows if r["avg_acc"] is not None and r["gen_acc"] is not None]
        figure, axis = plt.subplots(figsize=(6, 4.5))
        for row in done:
            axis.scatter(row["avg_acc"], row["gen_acc"])
            label = row.get("config.method.name", "") or ""
            axis.annotate(f"{label} {row['trial_id'][-5:]}", (row["avg_acc"], row["gen_acc"]), fontsize=7)
        front = pareto_front([(r["avg_acc"], r["gen_acc"]) for r in done])
        if front:
            axis.plot(*zip(*front, strict=True), linestyle="--", color="grey", label="Pareto front")
            axis.legend(fontsize=8)
        axis.set_xlabel("final understanding accuracy (avg over tasks)")
        axis.set_ylabel("final generation accuracy")
        axis.set_title("understanding vs generation across trials")
        figure.tight_layout()
        figure.savefig(Path(tmp) / "pareto.png", dpi=100)
        plt.close(figure)
        client.log_artifacts(parent.parent_run_id, tmp)
    client.set_terminated(parent.parent_run_id, "FINISHED")


def _register_best(parent: ParentRun, rows: list[dict[str, Any]], sweep: str) -> str | None:
    """Register the best finished trial's final adapter (its logged task checkpoint) in the MLflow
    model registry as ``<sweep>-best``; None when no trial finished or checkpoints were not logged."""
    from mlflow.tracking import MlflowClient

    best = next((r for r in rows if r["status"] == "TERMINATED" and r.get("tasks_done")), None)
    if best is None:
        return None
    client = MlflowClient(parent.tracking_uri)
    runs = client.search_runs([parent.experiment_id], filter_string=f"tags.trial_id = '{best['trial_id']}'")
    if not runs:
        return None
    run_id, artifact = runs[0].info.run_id, f"checkpoints/task_{best['tasks_done']:02d}"
    if not client.list_artifacts(run_id, artifact):
        return None
    name = f"{sweep}-best"
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="final adapter of the best trial of a mode-cl sweep")
    # Not waiting for READY: only the version's name is reported, and the wait logs to the terminal.
    version = client.create_model_version(name, f"runs:/{run_id}/{artifact}", run_id=run_id, await_creation_for=0)
    client.set_tag(parent.parent_run_id, "best_trial_id", best["trial_id"])
    return f"{name} v{version.version}"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in both coordinates (higher is better), sorted by the first."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))
