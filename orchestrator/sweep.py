"""Sweeps: a Ray Tune function trainable per trial, each launching a Ray Train ``TorchTrainer``.

Roles (Ray Train V2 rejects ``Tuner(TorchTrainer)``):
    ``train_driver_fn``  — one Tune trial: builds the trial's RunConfig and runs ``TorchTrainer``
                           named ``train-<trial id>`` (never the clock: resume depends on the name)
    ``run_sweep``        — builds the ``Tuner`` from a :class:`SweepSpace`, the MLflow parent run,
                           and the parent's summary artifacts at the end
    ``restore_sweep``    — ``Tuner.restore(..., resume_errored=True)`` (while MLflow boots)
    ``resume_sweep``     — ``fit`` of the restored tuner; trials continue from their task
                           checkpoints and reopen their MLflow child runs
``sweep.json`` in the sweep directory keeps what resume and report need (space path, parent run).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.space import SweepSpace, load_space

# Light imports only: Tune's trial processes import this module (torch/transformers load in workers).
Log = Callable[[str], None]

SWEEP_FILE = "sweep.json"


def _tune_domain(kind: str, args: list):
    from ray import tune

    return {
        "choice": lambda: tune.choice(args),
        "loguniform": lambda: tune.loguniform(*args),
        "uniform": lambda: tune.uniform(*args),
        "randint": lambda: tune.randint(*args),
    }[kind]()


def train_driver_fn(trial: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial = one Ray Train run of one task sequence."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.space import load_run_config_dict_from
    from trainables.worker import train_fn_per_worker

    overrides = {**trial["trial"], **trial.get("sampled", {})}
    config = load_run_config_dict_from(context["base"], {**context["fixed"], **overrides})
    trial_id = tune.get_context().get_trial_id()
    name = f"train-{trial_id}"
    storage = context["train_storage"]
    resources = config.resources
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    tracking = None
    if context.get("tracking_uri"):
        tracking = {
            "uri": context["tracking_uri"],
            "experiment_id": context["experiment_id"],
            "parent_run_id": context["parent_run_id"],
            "trial_id": trial_id,
            "trial_name": tune.get_context().get_trial_name(),
            "checkpoints": context["checkpoints_to_mlflow"],
        }
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "work_dir": context["work_dir"],
            "run_dir": str(Path(storage) / name) if "://" not in storage else None,
            "tracking": tracking,
            "submitted_at": time.time(),  # for the overhead breakdown: until the engine starts
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep or None),
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures),
            worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("MODE_CL_")}},
        ),
    )
    trainer.fit()


def _scheduler(space: SweepSpace):
    if space.scheduler.get("type") != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_tasks = max(len(space.trial_config(t).tasks) for t in space.trials)
    return ASHAScheduler(
        time_attr="tasks_done",
        max_t=max_tasks,
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


def progress_callback(total: int, metric: str, mode: str):
    """Live progress: trials done / running and the best objective so far, one line per event.
    (Tune pickles its callbacks with the experiment state, so this holds no console object.)"""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.best: tuple[float, str] | None = None
            self.ended: set[str] = set()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("step", 0) == 0 and result.get("tasks_done", 0) > 0:  # a task just ended
                self._print(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            # Only finished trials compete: an early stage's average over fewer tasks is not comparable.
            value = (trial.last_result or {}).get(metric)
            if value is not None and (
                self.best is None or (value > self.best[0] if mode == "max" else value < self.best[0])
            ):
                self.best = (value, trial.trial_id)
            self.ended.add(trial.trial_id)
            self._print(trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended.add(trial.trial_id)
            self._print(trials)

        def _print(self, trials) -> None:
            from rich.console import Console

            running = sum(t.status == "RUNNING" and t.trial_id not in self.ended for t in trials)
            best = f"{metric} {self.best[0]:.3f} (trial {self.best[1]})" if self.best else "— (no trial finished yet)"
            Console(soft_wrap=True).print(
                f"[bold]\\[sweep][/] trials done {len(self.ended)}/{total}, running {running}, best so far: {best}"
            )

    return Progress()


def _context(space: SweepSpace, work_dir: Path, storage: str, tracking: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "base": space.base,
        "fixed": space.fixed,
        "work_dir": str(work_dir),
        "train_storage": str(Path(storage) / space.name / "train") if "://" not in storage else f"{storage}/train",
        "checkpoints_to_mlflow": space.checkpoints_to_mlflow,
        **(tracking or {}),
    }


def _tuner(space: SweepSpace, context: dict[str, Any], storage: str, log: Log, restore_path: str | None = None):
    import ray
    from ray import tune

    from orchestrator.train import DRIVER_RESOURCE

    if not ray.cluster_resources().get(DRIVER_RESOURCE):
        raise ValueError(
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
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=space.objective_metric,
            mode=space.objective_mode,
            scheduler=_scheduler(space),
            search_alg=_search(space),
            num_samples=space.num_samples,
            max_concurrent_trials=space.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=space.name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=1),
            callbacks=[progress_callback(space.size, space.objective_metric, space.objective_mode)],
        ),
    )


def _prepare(space: SweepSpace, work_dir: Path) -> None:
    """Build the digits data and tiny base model once, before trials start (CoIN configs bring
    their own imported data and checkpoint: nothing to prepare)."""
    config = space.trial_config(space.trials[0])
    if config.coin is not None:
        return
    from trainables.base_model import pretrain_base
    from trainables.engine import prepare_data

    pretrain_base(config.base, config.data, prepare_data(config, work_dir), work_dir)


def _parent_run(tracking_uri: str, space: SweepSpace, sweep_name: str) -> dict[str, str]:
    import ray
    import torch
    from mlflow.tracking import MlflowClient

    from trainables import __version__

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(sweep_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(sweep_name)
    tags = {"sweep": sweep_name, "mode_cl_version": __version__, "ray": ray.__version__, "torch": torch.__version__}
    tags["git_commit"] = _git_commit()
    parent = client.create_run(experiment_id, run_name=f"{sweep_name} (sweep)", tags=tags)
    client.log_artifact(parent.info.run_id, str(space.path))
    return {"tracking_uri": tracking_uri, "experiment_id": experiment_id, "parent_run_id": parent.info.run_id}


def _git_commit() -> str:
    import subprocess

    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def sweep_dir(name_or_path: str, storage: str) -> Path:
    candidate = Path(name_or_path)
    if (candidate / SWEEP_FILE).is_file():
        return candidate
    return Path(storage) / name_or_path


def _local_storage(storage: str) -> None:
    if "://" in storage:
        raise ValueError(
            f"--storage {storage}: sweeps need a filesystem path (a shared filesystem on multi-node clusters); "
            "object stores are supported by `mode-cl run` only"
        )


def check_new_sweep(name: str, storage: str) -> Path:
    """The new sweep's directory; refuses a name that already has a sweep."""
    _local_storage(storage)
    directory = Path(storage) / name
    if (directory / SWEEP_FILE).is_file():
        raise ValueError(f"sweep {name!r} already exists in {directory}; `mode-cl resume {name}` continues it")
    return directory


def space_settings(space: SweepSpace) -> dict[str, Any]:
    """Everything that decides a sweep's trials: base run config, fixed overrides, trial list,
    distributions, objective, scheduler, search, samples."""
    return json.loads(
        json.dumps(
            {
                "base": space.base,
                "fixed": space.fixed,
                "trials": space.trials,
                "distributions": space.distributions,
                "objective": [space.objective_metric, space.objective_mode],
                "scheduler": space.scheduler,
                "search": space.search,
                "num_samples": space.num_samples,
            }
        )
    )


def check_resumable(name_or_path: str, storage: str) -> Path:
    """The directory of a sweep that can be resumed; clear errors otherwise."""
    from ray import tune

    _local_storage(storage)
    directory = sweep_dir(name_or_path, storage)
    if not (directory / SWEEP_FILE).is_file():
        raise ValueError(f"no sweep at {directory}: check the name, or pass --storage where it was run")
    if not tune.Tuner.can_restore(str(directory)):
        raise ValueError(f"{directory} has no Tune state to restore (the sweep never started its trials)")
    record = json.loads((directory / SWEEP_FILE).read_text())
    if "space_settings" in record:
        from trainables.config import config_diff

        try:
            current = space_settings(load_space(record["space"]))
        except (OSError, ValueError) as error:
            raise ValueError(f"{record['space']}: the sweep's space file cannot be read ({error})") from None
        if current != record["space_settings"]:
            raise ValueError(
                f"{record['space']} changed since sweep {directory.name!r} started "
                f"({config_diff(record['space_settings'], current)}); restore it to resume, or start a new sweep"
            )
    return directory


def run_sweep(
    space: SweepSpace, work_dir: Path, storage: str, tracking_uri: str | None, address: str | None, log: Log
) -> list[dict[str, Any]]:
    from orchestrator.train import init_ray

    work_dir = Path(work_dir).resolve()
    directory = check_new_sweep(space.name, storage)
    _prepare(space, work_dir)
    tracking = _parent_run(tracking_uri, space, space.name) if tracking_uri else None
    directory.mkdir(parents=True, exist_ok=True)
    record = {"space": str(space.path.resolve()), "work_dir": str(work_dir), "storage": storage}
    record["space_settings"] = space_settings(space)  # what `resume` must find unchanged
    record["parent_run_id"] = tracking["parent_run_id"] if tracking else None
    record["experiment_id"] = tracking["experiment_id"] if tracking else None
    (directory / SWEEP_FILE).write_text(json.dumps(record, indent=2))
    log(f"sweep {space.name}: {space.size} trials, {space.max_concurrent_trials} at a time, storage {directory}")
    with _parent_status_on_failure(tracking):
        init_ray(address)
        _tuner(space, _context(space, work_dir, storage, tracking), storage, log).fit()
    return finish_sweep(directory, tracking_uri, log)


@contextmanager
def _parent_status_on_failure(tracking: dict[str, Any] | None) -> Iterator[None]:
    """A sweep that dies with an exception (or Ctrl-C) marks its parent run FAILED / KILLED
    instead of leaving it RUNNING; `mode-cl resume` sets it back to RUNNING."""
    try:
        yield
    except BaseException as error:
        if tracking:
            from mlflow.tracking import MlflowClient

            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            MlflowClient(tracking["tracking_uri"]).set_terminated(tracking["parent_run_id"], status)
        raise


@dataclass
class RestoredSweep:
    directory: Path
    tracking: dict[str, Any] | None
    tuner: Any  # ray.tune.Tuner restored from the sweep's experiment state


def restore_sweep(name_or_path: str, storage: str, tracking_uri: str | None, log: Log) -> RestoredSweep:
    """Tune's restore of an interrupted sweep (Ray must be up). Does not touch the tracking
    server, so it can run while the server starts."""
    directory = check_resumable(name_or_path, storage)
    record = json.loads((directory / SWEEP_FILE).read_text())
    space = load_space(record["space"])
    tracking = None
    if tracking_uri and record.get("parent_run_id"):
        tracking = {"tracking_uri": tracking_uri, "experiment_id": record["experiment_id"]}
        tracking["parent_run_id"] = record["parent_run_id"]
    log(f"resuming sweep {space.name} from {directory}")
    context = _context(space, Path(record["work_dir"]), record["storage"], tracking)
    tuner = _tuner(space, context, record["storage"], log, restore_path=str(directory))
    return RestoredSweep(directory, tracking, tuner)


def parent_run_reopener(sweep: RestoredSweep, tracking_uri: str | None) -> Callable[[], None]:
    """A call that sets the sweep's parent run (FAILED/KILLED when its driver died) RUNNING again.

    MLflow is imported and the client built here, on the caller's thread, so that the call itself
    imports nothing: ``mode-cl resume`` makes it from a watcher thread while ``Tuner.fit`` imports
    on the main thread, and importing MLflow's ~1,600 modules from two threads at once left
    ``mlflow`` half-initialised now and then (the sweep then failed at its end with "partially
    initialized module 'mlflow' has no attribute 'version'")."""
    if not (sweep.tracking and tracking_uri):
        return lambda: None
    import netrc  # noqa: F401  (requests imports it lazily on the first request)

    import mlflow.tracking.request_header.registry  # noqa: F401  (imported lazily by the first request)
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(tracking_uri), sweep.tracking["parent_run_id"]
    return lambda: client.update_run(run_id, status="RUNNING")


def resume_sweep(sweep: RestoredSweep, tracking_uri: str | None, log: Log) -> list[dict[str, Any]]:
    """Finish a sweep that :func:`restore_sweep` restored: trials that were done stay done, the
    others go on from their newest checkpoint, logging into their existing MLflow child runs (the
    caller reopens the parent run with :func:`parent_run_reopener` once the server answers)."""
    with _parent_status_on_failure(sweep.tracking):
        sweep.tuner.fit()
    return finish_sweep(sweep.directory, tracking_uri, log)


def trial_table(directory: Path) -> list[dict[str, Any]]:
    """Every trial: id, status, its overrides and its last reported metrics (from Tune's files)."""
    from ray.tune import ExperimentAnalysis

    record = json.loads((directory / SWEEP_FILE).read_text())
    space = load_space(record["space"])
    analysis = ExperimentAnalysis(str(directory))
    rows = []
    for trial in analysis.trials:
        metrics = trial.last_result or {}
        overrides = {**trial.config.get("trial", {}), **trial.config.get("sampled", {})}
        row = {"trial_id": trial.trial_id, "status": trial.status}
        row |= {f"config.{k}": (",".join(v) if isinstance(v, list) else v) for k, v in overrides.items()}
        for key in ("tasks_done", "avg_acc", "forgetting", "bwt", "gen_acc", "gen_fd", "inter_modal_forgetting"):
            row[key] = metrics.get(key)
        rows.append(row)
    reverse = space.objective_mode == "max"
    missing = float("-inf") if reverse else float("inf")
    rows.sort(
        key=lambda r: r[space.objective_metric] if r[space.objective_metric] is not None else missing, reverse=reverse
    )
    return rows


def finish_sweep(directory: Path, tracking_uri: str | None, log: Log) -> list[dict[str, Any]]:
    rows = trial_table(directory)
    record = json.loads((directory / SWEEP_FILE).read_text())
    if tracking_uri and record.get("parent_run_id"):
        _log_parent_summary(tracking_uri, record["parent_run_id"], rows)
        registered = _register_best(tracking_uri, record, rows, directory.name)
        if registered:
            log(f"best trial's adapter registered in MLflow as {registered}")
    log(f"sweep finished: {sum(r['status'] == 'TERMINATED' for r in rows)}/{len(rows)} trials completed")
    return rows


def _log_parent_summary(tracking_uri: str, parent_run_id: str, rows: list[dict[str, Any]]) -> None:
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
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
        front = _pareto([(r["avg_acc"], r["gen_acc"]) for r in done])
        if front:
            axis.plot(*zip(*front, strict=True), linestyle="--", color="grey", label="Pareto front")
            axis.legend(fontsize=8)
        axis.set_xlabel("final understanding accuracy (avg over tasks)")
        axis.set_ylabel("final generation accuracy")
        axis.set_title("understanding vs generation across trials")
        figure.tight_layout()
        figure.savefig(Path(tmp) / "pareto.png", dpi=100)
        plt.close(figure)
        client.log_artifacts(parent_run_id, tmp)
    client.set_terminated(parent_run_id, "FINISHED")


def _register_best(tracking_uri: str, record: dict[str, Any], rows: list[dict[str, Any]], sweep: str) -> str | None:
    """Register the best finished trial's final adapter (its logged task checkpoint) in the MLflow
    model registry as ``<sweep>-best``; None when no trial finished or checkpoints were not logged."""
    from mlflow.tracking import MlflowClient

    best = next((r for r in rows if r["status"] == "TERMINATED" and r.get("tasks_done")), None)
    if best is None:
        return None
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([record["experiment_id"]], filter_string=f"tags.trial_id = '{best['trial_id']}'")
    if not runs:
        return None
    run_id, artifact = runs[0].info.run_id, f"checkpoints/task_{best['tasks_done']:02d}"
    if not client.list_artifacts(run_id, artifact):
        return None
    name = f"{sweep}-best"
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="final adapter of the best trial of a mode-cl sweep")
    version = client.create_model_version(name, f"runs:/{run_id}/{artifact}", run_id=run_id)
    client.set_tag(record["parent_run_id"], "best_trial_id", best["trial_id"])
    return f"{name} v{version.version}"


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in both coordinates (higher is better), sorted by the first."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))
