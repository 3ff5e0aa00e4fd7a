"""Resumable checkpoints of a task sequence: written atomically, verified by a manifest of hashes.

A checkpoint directory holds
    adapter/          the method's adapter (safetensors + JSON, see ``Method.save``)
    optimizer.pt      optimizer and LR-schedule state (tensors and numbers only; loaded with weights_only)
    rng.pt            torch's CPU (and CUDA) RNG state
    state.json        progress: next task, step inside it, accuracy matrix and generation scores so far,
                      per-task event log, loss curve, resolved config and its hash, tracking run id
    manifest.json     sha256 of every other file — written last

It is assembled under a temporary name and renamed into place, so a crash leaves either the
previous checkpoint or the new one. :func:`latest_good` walks checkpoints newest first and skips
(with a warning) any whose manifest is missing or whose files do not match it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch

MANIFEST = "manifest.json"
PREFIX = "ckpt_"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files are missing or do not match its manifest."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (nothing partial is left as a checkpoint)."""


@dataclass
class Progress:
    """Where a task sequence stands; everything JSON-serialisable."""

    next_task: int = 0  # 0-based index of the task being trained (== number of tasks finished)
    step: int = 0  # optimizer steps already done inside ``next_task``
    acc_matrix: list[list[float]] = field(default_factory=list)  # rows: base, after task 1, ...
    generation: list[dict[str, float]] = field(default_factory=list)
    task_log: list[dict[str, Any]] = field(default_factory=list)  # {"task", "event": start|resume|end, "step"}
    losses: list[list[float]] = field(default_factory=list)  # per task: training loss per step
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None  # tracking run id, once tracking exists

    @property
    def name(self) -> str:
        """Deterministic directory name; sorts chronologically."""
        return f"{PREFIX}t{self.next_task:02d}_s{self.step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint(
    directory: Path,
    progress: Progress,
    save_adapter: Callable[[Path], Any],
    optimizer_state: dict[str, Any] | None,
) -> Path:
    """Write a complete checkpoint at ``directory`` (replacing nothing until it is complete)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_adapter(tmp / "adapter")
        torch.save(optimizer_state or {}, tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(progress), indent=1))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    except OSError as error:  # disk full, quota, permissions: stop loudly, keep the previous checkpoints
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"writing checkpoint {directory} failed ({error.strerror or error}); free space (e.g. `mode-cl gc`) "
            "and rerun the same command: it resumes from the newest complete checkpoint"
        ) from error
    # Same name only when a resumed run rewrites a position it had reached: move the old one aside
    # first, so at every instant one complete checkpoint of that name exists or is recoverable.
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def verify(directory: Path) -> None:
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"{directory}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CorruptCheckpointError(f"{directory}: unreadable manifest ({error})") from None
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{directory}: {name} is missing")
        if _sha256(path) != expected:
            raise CorruptCheckpointError(f"{directory}: {name} does not match its hash (truncated or modified)")


@dataclass
class LoadedCheckpoint:
    directory: Path
    progress: Progress
    optimizer_state: dict[str, Any]
    rng: dict[str, Any]

    def restore_rng(self) -> None:
        torch.set_rng_state(self.rng["cpu"])
        if "cuda" in self.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.rng["cuda"])


def read_checkpoint(directory: Path) -> LoadedCheckpoint:
    """Verify and read a checkpoint. Never unpickles arbitrary objects (``weights_only=True``)."""
    directory = Path(directory)
    verify(directory)
    progress = Progress(**json.loads((directory / "state.json").read_text()))
    optimizer_state = torch.load(directory / "optimizer.pt", weights_only=True)
    rng = torch.load(directory / "rng.pt", weights_only=True)
    return LoadedCheckpoint(directory, progress, optimizer_state, rng)


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


# weights_only loading refuses pickled objects with UnpicklingError: such a checkpoint is unusable, not run.
UNUSABLE = (CorruptCheckpointError, OSError, ValueError, RuntimeError, TypeError, KeyError, UnpicklingError)


def latest_good(candidates: list[Path], warn: Callable[[str], None] | None = None) -> LoadedCheckpoint | None:
    """The newest checkpoint among ``candidates`` that verifies; each skipped one is reported."""
    for directory in sorted(candidates, key=lambda p: p.name, reverse=True):
        try:
            return read_checkpoint(directory)
        except UNUSABLE as error:
            message = f"checkpoint {directory.name} is unusable ({error}); falling back to the previous one"
            (warn or (lambda m: warnings.warn(m, stacklevel=2)))(message)
    return None


def prune(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints under ``root`` (keep ≤ 0 keeps all)."""
    if keep <= 0:
        return
    for directory in list_checkpoints(root)[:-keep]:
        shutil.rmtree(directory, ignore_errors=True)


class LocalCheckpointer:
    """Checkpoints in a local (or shared) directory; used by ``--no-ray`` and the tests."""

    def __init__(self, root: Path, num_to_keep: int = 2, log: Callable[[str], None] = print) -> None:
        self.root, self.num_to_keep, self.log = Path(root), num_to_keep, log

    def restore(self) -> LoadedCheckpoint | None:
        return latest_good(list_checkpoints(self.root), warn=lambda m: self.log(f"[yellow]warning:[/] {m}"))

    def save(
        self,
        progress: Progress,
        save_adapter: Callable[[Path], Any],
        optimizer_state: dict[str, Any] | None,
        metrics: dict[str, Any],
    ) -> None:
        write_checkpoint(self.root / progress.name, progress, save_adapter, optimizer_state)
        prune(self.root, self.num_to_keep)
