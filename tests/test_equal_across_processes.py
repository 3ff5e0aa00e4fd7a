"""Equal results across processes (RELIABILITY.md): the same micro config gives bit-identical
results in fresh processes that differ in everything ambient a sweep trial and its in-process
reference differ in: who built the base model and the teacher cache (a sweep driver with its own
threads, or the run itself), whether the teacher cache was computed or read back, OMP_NUM_THREADS
(Ray sets 1 in workers), torch's thread count before the engine sets its own, Python's hash seed,
and running in a non-main thread (Ray Train's training thread)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MICRO_RUN

CHILD = """
import json, sys, threading
from pathlib import Path
import torch
from trainables.benchmarks import prepare_all
from trainables.config import load_run_config
from trainables.engine import run_sequence

work, out, overrides, mode = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
config = load_run_config(None, overrides)
torch.set_num_threads(2)
torch.randn(256, 256).matmul(torch.randn(256, 256)).sum()  # the thread pool exists before the engine runs
if mode == "driver-prepared":
    prepare_all([config], work, show_progress=False)  # as `mode-cl sweep`'s driver does, with 2 threads
holder = {}
def run():
    holder["results"] = run_sequence(config, work, None, log=lambda _: None)
if mode == "driver-prepared":  # trained in a non-main thread, as in a Ray Train worker
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
else:
    run()
results = {k: v for k, v in holder["results"].items() if k not in ("task_log", "profile")}
out.write_text(json.dumps(results, sort_keys=True))
"""

MICRO = [*MICRO_RUN, "resources.cpus_per_worker=1", "method.kd_weight=0.3"]


def _run(tmp_path: Path, work: Path, name: str, mode: str, env: dict[str, str]) -> str:
    out = tmp_path / f"{name}.json"
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONHASHSEED")}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(work), str(out), json.dumps(MICRO), mode],
        capture_output=True, text=True, env=environment, cwd=Path(__file__).resolve().parents[1], timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out.read_text()


@pytest.mark.slow
def test_results_are_bit_identical_across_processes_and_ambient_settings(tmp_path):
    driver = _run(
        tmp_path, tmp_path / "work-a", "driver", "driver-prepared", {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "1"}
    )
    computed = _run(tmp_path, tmp_path / "work-b", "computed", "plain", {"PYTHONHASHSEED": "2"})
    read_back = _run(tmp_path, tmp_path / "work-b", "read", "plain", {"PYTHONHASHSEED": "3"})
    assert driver == computed == read_back
    assert json.loads(computed)["losses"][0]  # the comparison covered training, not an empty run
