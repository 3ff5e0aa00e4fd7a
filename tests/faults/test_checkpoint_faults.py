"""Checkpoint faults, in-process: a failed checkpoint write (disk full) stops the run loudly and a rerun
resumes from the newest complete checkpoint; a truncated or bit-flipped newest checkpoint is detected
and skipped. Either way the final results equal an uninterrupted run's."""

from __future__ import annotations

import errno
import shutil

import pytest

from tests.conftest import MICRO_RUN
from trainables import checkpoint as checkpoint_module
from trainables.checkpoint import CheckpointWriteError, list_checkpoints
from trainables.config import load_run_config
from trainables.engine import run_sequence


def _comparable(results):
    return {k: v for k, v in results.items() if k not in ("task_log", "profile")}


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def uninterrupted(work_dir, tmp_path_factory):
    config = load_run_config(None, [*MICRO_RUN, "checkpoint.every_steps=1", "checkpoint.num_to_keep=0"])
    return config, run_sequence(config, work_dir, tmp_path_factory.mktemp("full"), log=lambda _: None)


def test_disk_full_during_a_checkpoint_stops_loudly_and_the_rerun_resumes_exactly(
    work_dir, tmp_path, uninterrupted, monkeypatch
):
    config, full = uninterrupted
    real_save = checkpoint_module.torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # a checkpoint in the middle of task 2 (two torch.save calls per checkpoint)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device.*rerun the same command"):
        run_sequence(config, work_dir, tmp_path / "run", log=lambda _: None)
    root = tmp_path / "run" / "checkpoints"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no partial checkpoint left
    written = [p.name for p in list_checkpoints(root)]
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    messages: list[str] = []
    resumed = run_sequence(config, work_dir, tmp_path / "run", log=messages.append)
    assert any(f"resuming from checkpoint {written[-1]}" in m for m in messages)
    assert _comparable(resumed) == _comparable(full)


def test_bit_flipped_newest_checkpoint_is_detected_skipped_and_the_run_matches(work_dir, tmp_path, uninterrupted):
    config, full = uninterrupted
    run = tmp_path / "run"
    first = run_sequence(config, work_dir, run, log=lambda _: None)
    assert _comparable(first) == _comparable(full)
    checkpoints = list_checkpoints(run / "checkpoints")
    # Pretend the run died right after writing its 3rd-to-last checkpoint, whose adapter then rotted.
    for later in checkpoints[-2:]:
        shutil.rmtree(later)
    newest = checkpoints[-3]
    adapter = newest / "adapter" / "adapter.safetensors"
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    adapter.write_bytes(bytes(data))
    (run / "results.json").unlink()
    messages: list[str] = []
    again = run_sequence(config, work_dir, run, log=messages.append)
    assert any(f"{newest.name} is unusable" in m and "does not match its hash" in m for m in messages)
    assert any(f"resuming from checkpoint {checkpoints[-4].name}" in m for m in messages)
    assert _comparable(again) == _comparable(full)


def test_truncated_newest_checkpoint_is_detected_skipped_and_the_run_matches(work_dir, tmp_path, uninterrupted):
    config, full = uninterrupted
    run = tmp_path / "run"
    run_sequence(config, work_dir, run, log=lambda _: None)
    latest = run / "checkpoints" / "ckpt_t02_s000000" / "adapter" / "adapter.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # the write was cut short
    (run / "results.json").unlink()
    messages: list[str] = []
    again = run_sequence(config, work_dir, run, log=messages.append)
    assert any("ckpt_t02_s000000 is unusable" in m and "does not match its hash" in m for m in messages)
    assert any("resuming from checkpoint ckpt_t01_s000002" in m for m in messages)  # the newest good one
    assert _comparable(again) == _comparable(full)
