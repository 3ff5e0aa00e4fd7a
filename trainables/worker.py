"""The Ray Train worker: restore from the latest good checkpoint, run the engine, report per task.

``train_fn_per_worker`` runs on every worker of the run's Ray Train trainer. Rank 0 writes each checkpoint
(see :mod:`trainables.checkpoint`) and hands it to ``ray.train.report`` under a deterministic
directory name; every rank reports the same metrics. On a restart (worker failure, or the same
run name and storage launched again) ``ray.train.get_checkpoint()`` gives the newest reported
checkpoint; if it does not verify, the previous one beside it in storage is used.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray.train

from trainables.checkpoint import LoadedCheckpoint, Progress, latest_good, list_checkpoints, write_checkpoint
from trainables.config import load_run_config_dict
from trainables.tracking import TrialTracker

KILL_AT_ENV = "MODE_CL_FAULT_KILL_AT"  # "task:step:marker" — fault injection for the resume tests


@dataclass(frozen=True)
class TrialTracking:
    """Where rank 0 logs a sweep trial: its MLflow child run under the sweep's parent run."""

    uri: str
    experiment_id: str
    parent_run_id: str
    trial_id: str
    trial_name: str
    checkpoints: str  # all | final | none: task checkpoints logged as artifacts


@dataclass(frozen=True)
class LoopConfig:
    """What every Train worker of one run gets. It crosses into Ray as a plain dict
    (``train_loop_config`` is a dict in Ray's API): :meth:`to_dict` / :meth:`from_dict`.

    Args:
        config: ``RunConfig.to_dict()`` of the run.
        work_dir: the data / base model / teacher cache directory.
        run_dir: the run's storage directory on a filesystem (the restore source), else None.
        tracking: the sweep trial's MLflow target; None for ``mode-cl run`` and untracked sweeps.
        submitted_at: when the driver built the trainer (``time.time()``), for the worker-start time.
    """

    config: dict[str, Any]
    work_dir: str
    run_dir: str | None
    tracking: TrialTracking | None = None
    submitted_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopConfig:
        tracking = data.get("tracking")
        return cls(**{**data, "tracking": TrialTracking(**tracking) if tracking else None})


def flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalars only (None dropped), for Tune schedulers and loggers: per-task accuracy as ``acc/<task>``."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for task, value in zip(metrics.get("tasks", []), (metrics.get("acc_matrix") or [[]])[-1], strict=False):
        flat[f"acc/{task}"] = value
    for key in ("gen_acc", "gen_fd", "gen_nll"):
        if metrics.get(key):
            flat[key] = metrics[key][-1]
    return flat


class RayCheckpointer:
    """Checkpoints through ``ray.train.report``; restores with a fallback to earlier good ones."""

    def __init__(self, log, run_dir: str | None, tracker: TrialTracker | None = None, tasks=()) -> None:
        self.rank = ray.train.get_context().get_world_rank()
        self.log, self.tracker, self.tasks = log, tracker, list(tasks)
        self.run_dir = Path(run_dir) if run_dir else None
        self._download = None
        self.final_progress: Progress | None = None  # the last one saved

    def restore(self) -> LoadedCheckpoint | None:
        # On a filesystem, every complete checkpoint is in the run directory, verified by its
        # manifest. Ray may not have registered the newest one if the worker died right after
        # writing it, so the directory, not get_checkpoint(), decides.
        if self.run_dir is not None and list_checkpoints(self.run_dir):
            loaded = latest_good(list_checkpoints(self.run_dir), warn=lambda m: self.log(f"warning: {m}"))
            self.final_progress = loaded.progress if loaded is not None else None
            return loaded
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        path = Path(checkpoint.path)
        if path.is_dir():
            candidates = [p for p in list_checkpoints(path.parent) if p.name <= path.name]
        else:  # object storage: only the newest one is fetched
            self._download = tempfile.TemporaryDirectory()
            candidates = [Path(checkpoint.to_directory(os.path.join(self._download.name, path.name)))]
        return latest_good(candidates, warn=lambda m: self.log(f"warning: {m}"))

    def save(self, progress: Progress, save_adapter, optimizer_state, metrics: dict[str, Any]) -> None:
        self.final_progress = progress
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                if self.tracker is not None:
                    progress.run_id = self.tracker.run_id
                directory = write_checkpoint(Path(tmp) / progress.name, progress, save_adapter, optimizer_state)
                checkpoint = ray.train.Checkpoint.from_directory(str(directory))
                if self.tracker is not None:
                    self.tracker.log_progress(self.tasks, progress, metrics, directory)
            ray.train.report(
                {**flat_metrics(metrics), "step": progress.step},
                checkpoint=checkpoint,
                checkpoint_dir_name=progress.name,
            )


def _fault_hook():
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return None
    task, step, marker = spec.split(":", 2)

    def maybe_kill(task_index: int, step_done: int) -> None:
        if (task_index, step_done) == (int(task), int(step)) and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return maybe_kill


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    from trainables.engine import run_sequence  # here: the trial driver imports this module only to pass the function

    loop = LoopConfig.from_dict(loop_config)
    config = load_run_config_dict(loop.config)
    rank = ray.train.get_context().get_world_rank()

    def log(message: str) -> None:
        # Not print(): Ray Train V2 patches print to tee into its logger as well as the
        # (Ray-wrapped) stream, so every line reached the driver twice.
        if rank == 0:
            sys.stderr.write(f"[mode-cl worker] {message}\n")
            sys.stderr.flush()

    tracker = None
    if loop.tracking is not None and rank == 0:
        target = loop.tracking
        tracker = TrialTracker(
            target.uri,
            target.experiment_id,
            target.parent_run_id,
            target.trial_id,
            target.trial_name,
            config.to_dict(),
            target.checkpoints,
        )
    checkpointer = RayCheckpointer(log, loop.run_dir, tracker, config.tasks)
    results = run_sequence(
        config, Path(loop.work_dir), out_dir=None, log=log, checkpointer=checkpointer, on_step=_fault_hook()
    )
    profile = results["profile"]
    if loop.submitted_at is not None:
        # Ray Train worker-group start + imports, as seen from this attempt (restarts included).
        profile["seconds"]["worker_start"] = round(profile["started_at"] - loop.submitted_at, 3)
    if loop.run_dir is not None and rank == 0:  # beside the checkpoints: `mode-cl report --recompute` reads them
        from trainables.results import write_predictions, write_results

        write_results(results, Path(loop.run_dir))
        if checkpointer.final_progress is not None:
            write_predictions(checkpointer.final_progress, Path(loop.run_dir))
    if tracker is not None:
        final = Path(loop.run_dir) / f"ckpt_t{len(config.tasks):02d}_s000000" if loop.run_dir else None
        tracker.finish(results, str(final) if final else None)
