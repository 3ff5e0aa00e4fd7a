"""Disk hygiene: ``mode-cl gc`` removes the checkpoints of finished trials, keeping each one's final.

A trial is finished when its Train run directory holds a verified final checkpoint (all tasks done,
``ckpt_t<N>_s000000`` with N = number of tasks). Its earlier checkpoints are only needed to resume an
unfinished run, so they go; the final one (adapter + accuracy matrix + results) stays, and so does
every checkpoint of an unfinished trial. MLflow's copies follow ``tracking.checkpoints`` in the space
(``final`` logs only the final adapter).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trainables.checkpoint import CorruptCheckpointError, list_checkpoints, verify


def tree_size(path: Path) -> int:
    """Bytes under ``path`` (0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


@dataclass
class Collection:
    finished: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    freed_bytes: int = 0


def _final_checkpoint(run_dir: Path) -> Path | None:
    for candidate in reversed(list_checkpoints(run_dir)):  # newest first
        try:
            verify(candidate)
            progress = json.loads((candidate / "state.json").read_text())
        except (CorruptCheckpointError, OSError, ValueError):
            continue
        tasks = progress.get("config", {}).get("tasks", [])
        if progress.get("next_task") == len(tasks) and progress.get("step") == 0:
            return candidate
        return None  # the newest good checkpoint is not final: the trial is not finished
    return None


def collect(sweep_directory: Path, dry_run: bool = False) -> Collection:
    """Remove non-final checkpoints of finished trials under ``<sweep>/train/``."""
    result = Collection()
    for run_dir in sorted((Path(sweep_directory) / "train").glob("train-*")):
        final = _final_checkpoint(run_dir)
        if final is None:
            result.unfinished.append(run_dir.name)
            continue
        result.finished.append(run_dir.name)
        for checkpoint in list_checkpoints(run_dir):
            if checkpoint != final:
                result.freed_bytes += tree_size(checkpoint)
                result.removed.append(checkpoint)
                if not dry_run:
                    shutil.rmtree(checkpoint)
    return result
