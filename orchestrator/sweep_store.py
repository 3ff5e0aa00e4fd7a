"""A sweep's directory and its record, ``<storage>/<name>/sweep.json``.

The record keeps what ``resume``, ``report`` and ``gc`` need: the space file, work dir and storage,
the MLflow parent run, and the space's settings when it started. :func:`open_for_resume` is the one
resume-compatibility check: the sweep exists, Tune can restore it, and its space is unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.space import SweepSpace, load_space
from trainables.config import config_diff
from trainables.errors import UserError

SWEEP_FILE = "sweep.json"


class SweepError(UserError):
    """A sweep that cannot be started, resumed or found as asked."""


def sweep_dir(name_or_path: str, storage: str) -> Path:
    candidate = Path(name_or_path)
    if (candidate / SWEEP_FILE).is_file():
        return candidate
    return Path(storage) / name_or_path


def train_run_name(trial_id: str) -> str:
    """The Ray Train run (and its folder under the sweep's ``train/``) that runs a trial's sequence."""
    return f"train-{trial_id}"


def find_sweep(name_or_path: str, storage: str) -> Path:
    """The directory of an existing sweep (by name under ``storage``, or its path)."""
    directory = sweep_dir(name_or_path, storage)
    if not (directory / SWEEP_FILE).is_file():
        raise SweepError(f"no sweep at {directory}: check the name, or pass --storage where it was run")
    return directory


def read_record(directory: Path) -> dict[str, Any]:
    return json.loads((directory / SWEEP_FILE).read_text())


def write_record(directory: Path, record: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SWEEP_FILE).write_text(json.dumps(record, indent=2))


def _local_storage(storage: str) -> None:
    if "://" in storage:
        raise SweepError(
            f"--storage {storage}: sweeps need a filesystem path (a shared filesystem on multi-node clusters); "
            "object stores are supported by `mode-cl run` only"
        )


def check_new_sweep(name: str, storage: str) -> Path:
    """The new sweep's directory; refuses a name that already has a sweep."""
    _local_storage(storage)
    directory = Path(storage) / name
    if (directory / SWEEP_FILE).is_file():
        raise SweepError(f"sweep {name!r} already exists in {directory}; `mode-cl resume {name}` continues it")
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


@dataclass(frozen=True)
class ResumableSweep:
    """A sweep that :func:`open_for_resume` found restorable, with its (unchanged) space."""

    directory: Path
    record: dict[str, Any]
    space: SweepSpace


def open_for_resume(name_or_path: str, storage: str) -> ResumableSweep:
    """The sweep to resume, checked once before anything starts; :class:`SweepError` otherwise."""
    from ray import tune

    _local_storage(storage)
    directory = find_sweep(name_or_path, storage)
    if not tune.Tuner.can_restore(str(directory)):
        raise SweepError(f"{directory} has no Tune state to restore (the sweep never started its trials)")
    record = read_record(directory)
    try:
        space = load_space(record["space"])
    except (OSError, UserError) as error:
        raise SweepError(f"{record['space']}: the sweep's space file cannot be read ({error})") from None
    # The sweep's name is its directory's, which `mode-cl sweep --name` may have set instead of the
    # file's `name:`; the trials' Train runs live under it, so the file's name would restart them.
    space.name = directory.resolve().name  # resolved: `mode-cl resume .` inside the sweep's folder
    if "space_settings" in record and space_settings(space) != record["space_settings"]:
        raise SweepError(
            f"{record['space']} changed since sweep {directory.name!r} started "
            f"({config_diff(record['space_settings'], space_settings(space))}); "
            "restore it to resume, or start a new sweep"
        )
    return ResumableSweep(directory, record, space)
