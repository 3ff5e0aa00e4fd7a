"""Sweeps: a Ray Tune function trainable per trial, each launching a Ray Train trainer.

Roles (Ray Train V2 rejects ``Tuner(TorchTrainer)``):
    ``train_driver_fn``  — one Tune trial: builds the trial's RunConfig and runs the
                           Ray Train trainer named ``train-<trial id>`` (never the clock: resume
                           depends on the name)
    ``run_sweep``        — builds the ``Tuner`` from a :class:`SweepSpace`, with the MLflow parent
                           run (:mod:`orchestrator.sweep_tracking`) and the sweep's record
                           (:mod:`orchestrator.sweep_store`)
    ``restore_sweep``    — ``Tuner.restore(..., resume_errored=True)`` (while MLflow boots)
    ``resume_sweep``     — ``fit`` of the restored tuner; trials continue from their task
                           checkpoints and reopen their MLflow child runs
``start_sweep`` and ``resume`` are ``mode-cl sweep`` / ``mode-cl resume``: checks first, then Ray
and the tracking server side by side.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.space import SweepSpace
from orchestrator.sweep_store import (
    ResumableSweep,
    SweepError,
    check_new_sweep,
    open_for_resume,
    read_record,
    space_settings,
    train_run_name,
    write_record,
)
from orchestrator.sweep_tracking import (
    ParentRun,
    TrackingChoice,
    create_parent_run,
    finish_parent_run,
    parent_run_reopener,
    parent_status_on_failure,
    tracking_and_ray,
)
from orchestrator.trial_names import TrialNamer

# Light imports only: Tune's trial processes import this module (torch/transformers load in workers).
Log = Callable[[str], None]
Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class DriverContext:
    """What every trial driver of a sweep shares: how to build its config, where it runs and logs."""

    base: dict[str, Any]  # the run config data the trials start from
    fixed: dict[str, Any]  # overrides of every trial
    work_dir: str
    train_storage: str  # where the trials' Train runs live
    checkpoints_to_mlflow: str
    parent: ParentRun | None


def _tune_domain(kind: str, args: list):
    from ray import tune

    return {
        "choice": lambda: tune.choice(args),
        "loguniform": lambda: tune.loguniform(*args),
        "uniform": lambda: tune.uniform(*args),
        "randint": lambda: tune.randint(*args),
    }[kind]()


def train_driver_fn(trial: dict[str, Any], context: DriverContext) -> None:
    """One Tune trial = one Ray Train run of one task sequence."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.train import ray_trainer
    from trainables.config import load_run_config_dict
    from trainables.worker import LoopConfig, TrialTracking

    config = load_run_config_dict(context.base, {**context.fixed, **trial["trial"], **trial.get("sampled", {})})
    trial_id = tune.get_context().get_trial_id()
    name = train_run_name(trial_id)
    tracking = None
    if context.parent is not None:
        parent = context.parent
        tracking = TrialTracking(
            parent.tracking_uri,
            parent.experiment_id,
            parent.parent_run_id,
            trial_id,
            tune.get_context().get_trial_name(),
            context.checkpoints_to_mlflow,
        )
    storage = context.train_storage
    loop = LoopConfig(
        config.to_dict(),
        context.work_dir,
        run_dir=str(Path(storage) / name) if "://" not in storage else None,
        tracking=tracking,
        submitted_at=time.time(),  # for the overhead breakdown: until the engine starts
    )
    ray_trainer(config, loop, name, storage, callbacks=[TuneReportCallback()]).fit()


def _scheduler(space: SweepSpace):
    if space.scheduler.get("type") != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="tasks_done",
        max_t=max(len(config.tasks) for config in space.configs),
        grace_period=space.scheduler.get("grace_period", 1),
        reduction_factor=space.scheduler.get("reduction_factor", 2),
    )


def _search(space: SweepSpace):
    if space.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=0), max_concurrent=space.max_concurrent_trials)
    from ray.tune.search import BasicVariantGenerator

    # An explicit generator ignores TuneConfig.max_concurrent_trials: give it the limit itself, or
    # every trial's Train controller waits for CPUs and times out starting its worker group.
    return BasicVariantGenerator(random_state=0, max_concurrent=space.max_concurrent_trials)


def progress_callback(
    total: int, metric: str, mode: str, parent: ParentRun | None = None, tasks_per_trial: int = 0, live: bool = False
):
    """The sweep's progress callback (:class:`orchestrator.sweep_progress.SweepProgress`)."""
    from orchestrator.sweep_progress import SweepProgress

    return SweepProgress(total, metric, mode, parent, tasks_per_trial, live)


def _live_table() -> bool:
    """Progress as one live table (a terminal, without ``--verbose``) rather than one line per event."""
    from orchestrator.ray_runtime import is_verbose

    return not is_verbose() and sys.stdout.isatty()


def _say_where_ray_logs(log: Log) -> None:
    from orchestrator.ray_runtime import is_verbose, logs_dir

    if not is_verbose() and logs_dir():
        log(f"Ray's and the workers' log lines: {logs_dir()} (--verbose prints them here)")


def live_table(trials: list[Any], tasks_per_trial: int, caption: str) -> Any:
    """The sweep's live table: one row per trial (name, status, tasks done / total, latest avg acc
    and gen acc, elapsed, and remaining time estimated from its seconds per task so far)."""
    from rich.table import Table

    table = Table(caption=caption, caption_justify="left")
    for header in ("trial", "status", "tasks", "avg acc", "gen acc", "elapsed", "remaining"):
        table.add_column(header, justify="left" if header in ("trial", "status") else "right")
    for trial in trials:
        result = trial.last_result or {}
        total = len(trial.config.get("trial", {}).get("tasks") or []) or tasks_per_trial
        done = result.get("tasks_done") or 0
        elapsed = result.get("time_total_s")
        remaining = "—"
        if trial.status == "RUNNING" and elapsed and done:
            remaining = _clock(elapsed / done * (total - done))
        elif trial.status == "TERMINATED":
            remaining = "0:00"
        cells = [str(trial), trial.status, f"{done}/{total}"]
        cells += [f"{result[k]:.3f}" if isinstance(result.get(k), float) else "—" for k in ("avg_acc", "gen_acc")]
        table.add_row(*cells, _clock(elapsed) if elapsed else "—", remaining)
    return table


def _clock(seconds: float) -> str:
    minutes, second = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{second:02d}" if minutes >= 60 else f"{minutes}:{second:02d}"


def _context(space: SweepSpace, work_dir: Path, storage: str, parent: ParentRun | None) -> DriverContext:
    train_storage = str(Path(storage) / space.name / "train") if "://" not in storage else f"{storage}/train"
    return DriverContext(space.base, space.fixed, str(work_dir), train_storage, space.checkpoints_to_mlflow, parent)


def _tuner(space: SweepSpace, context: DriverContext, storage: str, restore_path: str | None = None):
    import ray
    from ray import tune

    from orchestrator.ray_runtime import DRIVER_RESOURCE, is_verbose

    if not ray.cluster_resources().get(DRIVER_RESOURCE):
        raise SweepError(
            f"the Ray cluster has no {DRIVER_RESOURCE} resource for sweep drivers; start the head with "
            f"ray start --head --resources='{{\"{DRIVER_RESOURCE}\": 8}}' (cluster.yaml does)"
        )
    driver = tune.with_parameters(train_driver_fn, context=context)
    trainable = tune.with_resources(driver, {DRIVER_RESOURCE: 0.01})
    if restore_path is not None:
        return tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True)
    param_space: dict[str, Any] = {"trial": tune.grid_search(space.trials)}
    if space.distributions:
        param_space["sampled"] = {k: _tune_domain(kind, args) for k, (kind, args) in space.distributions.items()}
    namer = TrialNamer.for_trials(space.trials, space.num_samples, bool(space.distributions))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            trial_name_creator=namer,
            trial_dirname_creator=namer.dirname,
            metric=space.objective_metric,
            mode=space.objective_mode,
            scheduler=_scheduler(space),
            search_alg=_search(space),  # it holds the concurrency limit (max_concurrent_trials)
            num_samples=space.num_samples,
        ),
        run_config=tune.RunConfig(
            name=space.name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[
                progress_callback(
                    space.size,
                    space.objective_metric,
                    space.objective_mode,
                    context.parent,
                    len(space.configs[0].tasks),
                    live=_live_table(),
                )
            ],
            verbose=1 if is_verbose() else 0,
        ),
    )


def fit_or_interrupt(tuner: Any) -> None:
    """``tuner.fit()``; if a SIGINT (or a SIGTERM/SIGHUP the CLI passes on as one) ended it, raise
    KeyboardInterrupt afterwards. Tune's own handler stops the trials and saves the sweep, then
    ``fit`` returns as if the sweep were done: the command must stop instead, and say so.

    Tune's handler puts back the handler it replaced when it fires, and stays installed when it
    does not; so "the handler after fit is the one from before" means it fired. Either way the
    handler from before is put back."""
    if threading.current_thread() is not threading.main_thread():
        tuner.fit()
        return
    before = signal.getsignal(signal.SIGINT)
    try:
        tuner.fit()
        fired = signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before if before is not None else signal.SIG_DFL)
    if fired and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0":
        raise KeyboardInterrupt


def start_sweep(
    space: SweepSpace, work_dir: Path, storage: str, tracking: TrackingChoice, address: str | None, log: Log
) -> Rows:
    """``mode-cl sweep``: refuse an existing sweep before anything starts, then run it with Ray
    and the tracking server."""
    directory = check_new_sweep(space.name, storage)
    return tracking_and_ray(
        tracking, address, log, lambda uri: _run_new_sweep(space, directory, work_dir, storage, uri, address, log)
    )


def run_sweep(
    space: SweepSpace, work_dir: Path, storage: str, tracking_uri: str | None, address: str | None, log: Log
) -> Rows:
    """Run a new sweep to its end (Ray joined or started here); its trial table, best first."""
    return _run_new_sweep(space, check_new_sweep(space.name, storage), work_dir, storage, tracking_uri, address, log)


def _run_new_sweep(
    space: SweepSpace,
    directory: Path,
    work_dir: Path,
    storage: str,
    tracking_uri: str | None,
    address: str | None,
    log: Log,
) -> Rows:
    from orchestrator.ray_runtime import init_ray
    from trainables.benchmarks import prepare_all

    work_dir = Path(work_dir).resolve()
    prepare_all(space.configs, work_dir)  # data and base models built once, before trials start
    parent = create_parent_run(tracking_uri, space.path, space.name) if tracking_uri else None
    record = {"space": str(space.path.resolve()), "work_dir": str(work_dir), "storage": storage}
    record["space_settings"] = space_settings(space)  # what `resume` must find unchanged
    record["parent_run_id"] = parent.parent_run_id if parent else None
    record["experiment_id"] = parent.experiment_id if parent else None
    write_record(directory, record)
    log(f"sweep {space.name}: {space.size} trials, {space.max_concurrent_trials} at a time, storage {directory}")
    with parent_status_on_failure(parent):
        init_ray(address)
        _say_where_ray_logs(log)
        fit_or_interrupt(_tuner(space, _context(space, work_dir, storage, parent), storage))
    return finish_sweep(directory, tracking_uri, log)


def resume(name_or_path: str, storage: str, tracking: TrackingChoice, address: str | None, log: Log) -> Rows:
    """``mode-cl resume``: check the sweep once, then restore Tune's state while the tracking
    server boots, and finish the sweep; the parent run goes back to RUNNING once the server answers."""
    resumable = open_for_resume(name_or_path, storage)
    restored: dict[str, Any] = {}

    def prepare(uri: str | None) -> None:  # Tune's restore of the experiment state, while MLflow boots
        restored["sweep"] = restore_sweep(resumable, uri, log)
        restored["reopen_parent"] = parent_run_reopener(restored["sweep"].parent)  # imports MLflow here

    def on_ready(uri: str) -> None:
        restored["reopen_parent"]()

    def body(uri: str | None) -> Rows:
        return resume_sweep(restored["sweep"], uri, log)

    return tracking_and_ray(tracking, address, log, body, prepare, on_ready)


@dataclass
class RestoredSweep:
    directory: Path
    parent: ParentRun | None
    tuner: Any  # ray.tune.Tuner restored from the sweep's experiment state


def restore_sweep(resumable: ResumableSweep, tracking_uri: str | None, log: Log) -> RestoredSweep:
    """Tune's restore of an interrupted sweep (Ray must be up). Does not touch the tracking
    server, so it can run while the server starts."""
    record, space = resumable.record, resumable.space
    parent = None
    if tracking_uri and record.get("parent_run_id"):
        parent = ParentRun(tracking_uri, record["experiment_id"], record["parent_run_id"])
    log(f"resuming sweep {space.name} from {resumable.directory}")
    context = _context(space, Path(record["work_dir"]), record["storage"], parent)
    from orchestrator.sweep_progress import restoring_as

    with restoring_as(parent, _live_table()):  # Tune unpickles the progress callback in here
        tuner = _tuner(space, context, record["storage"], restore_path=str(resumable.directory))
    return RestoredSweep(resumable.directory, parent, tuner)


def resume_sweep(sweep: RestoredSweep, tracking_uri: str | None, log: Log) -> Rows:
    """Finish a sweep that :func:`restore_sweep` restored: trials that were done stay done, the
    others go on from their newest checkpoint, logging into their existing MLflow child runs."""
    with parent_status_on_failure(sweep.parent):
        _say_where_ray_logs(log)
        fit_or_interrupt(sweep.tuner)
    return finish_sweep(sweep.directory, tracking_uri, log)


# What a sweep's trial table shows of each trial's latest metrics.
TRIAL_METRICS = (
    "tasks_done",
    "avg_acc",
    "forgetting",
    "retention",
    "bwt",
    "open_avg_acc",
    "gen_acc",
    "gen_fd",
    "inter_modal_forgetting",
)


def trial_row(trial: Any) -> dict[str, Any]:
    """One Tune trial as a row: id, status, its overrides as ``config.<key>``, its last metrics."""
    metrics = trial.last_result or {}
    overrides = {**trial.config.get("trial", {}), **trial.config.get("sampled", {})}
    row = {"trial_id": trial.trial_id, "trial_name": str(trial), "status": trial.status}  # str: the readable name
    row |= {f"config.{k}": (",".join(v) if isinstance(v, list) else v) for k, v in overrides.items()}
    return row | {key: metrics.get(key) for key in TRIAL_METRICS}


def trial_table(directory: Path) -> Rows:
    """Every trial: id, status, its overrides and its last reported metrics (from Tune's files)."""
    from ray.tune import ExperimentAnalysis

    record = read_record(directory)
    if "space_settings" in record:
        metric, mode = record["space_settings"]["objective"]
    else:  # a record written before the settings were kept in it
        from orchestrator.space import load_space

        space = load_space(record["space"])
        metric, mode = space.objective_metric, space.objective_mode
    rows = [trial_row(trial) for trial in ExperimentAnalysis(str(directory)).trials]
    missing = float("-inf") if mode == "max" else float("inf")
    rows.sort(key=lambda r: r[metric] if r[metric] is not None else missing, reverse=mode == "max")
    return rows


def finish_sweep(directory: Path, tracking_uri: str | None, log: Log) -> Rows:
    rows = trial_table(directory)
    record = read_record(directory)
    if tracking_uri and record.get("parent_run_id"):
        parent = ParentRun(tracking_uri, record["experiment_id"], record["parent_run_id"])
        finish_parent_run(parent, rows, directory.name, log, directory / "train")
    log(f"sweep finished: {sum(r['status'] == 'TERMINATED' for r in rows)}/{len(rows)} trials completed")
    return rows
