"""The whole `mode-cl run` process group SIGKILLed after its first task checkpoint, then the same
command again: it resumes (no task trained twice) and writes the uninterrupted run's results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.test_ray_train import MICRO, comparable
from trainables.config import load_run_config
from trainables.engine import run_sequence

MODE_CL = str(Path(sys.executable).with_name("mode-cl"))


def _stop_ray() -> None:
    # Ray's daemons run in sessions of their own, so killing the CLI's group can leave them behind.
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, check=False)


def test_relaunch_after_sigkill_of_the_process_group_resumes(tmp_path):
    work_dir, storage, out = tmp_path / "work", tmp_path / "storage", tmp_path / "out"
    expected = run_sequence(load_run_config(None, MICRO), work_dir, None, log=lambda _: None)
    command = [MODE_CL, "run", "--work-dir", str(work_dir), "--name", "relaunch", "--storage", str(storage)]
    command += ["--out", str(out), *(arg for item in MICRO for arg in ("--set", item))]
    env = {**os.environ, "RAY_ADDRESS": ""}
    first_log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(command, stdout=first_log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    first_task = storage / "relaunch" / "ckpt_t01_s000000" / "manifest.json"
    deadline = time.monotonic() + 300
    while not first_task.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first_task.exists(), (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _stop_ray()
    assert not (out / "results.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    _stop_ray()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming it instead of starting over" in second.stdout
    results = json.loads((out / "results.json").read_text())
    assert comparable(results) == comparable(expected)
    starts = [e["task"] for e in results["task_log"] if e["event"] == "start"]
    ends = [e["task"] for e in results["task_log"] if e["event"] == "end"]
    assert starts == ends == [0, 1, 2]  # no task trained (started or finished) twice
