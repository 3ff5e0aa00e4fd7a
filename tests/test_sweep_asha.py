"""ASHA with tasks learned as its time attribute: bad trials stop after a task, their Train
placement groups are freed (the dashboard process cleans them up), and the sweep still finishes.

The outcome is decided by construction, not by timing: trials run one at a time in grid order, and
the first (lr 1e-3) keeps generation near the base (gen FD ~16 after one task on this micro
config) while the others (lr >= 0.1) wreck it (FD ~74 and above), so the second trial is below
the first rung's cutoff whatever the machine's load."""

from __future__ import annotations

import time

import pytest

from orchestrator.space import load_space
from orchestrator.sweep import run_sweep

MICRO_RUN = """
tasks: [parity, bigsmall, prime]
base: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, epochs: 1}
data: {task_train: 48, task_test: 24}
train: {epochs: 1, batch_size: 16}
eval: {gen_samples_per_digit: 4}
method: {name: mode, r: 2, num_experts: 2}
resources: {cpus_per_worker: 1}
"""
SPACE = """
name: asha
run_config: micro.yaml
grid:
  train.lr: [0.001, 0.1, 0.2, 0.4]
objective: {metric: gen_fd, mode: min}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
max_concurrent_trials: 1
"""


@pytest.fixture
def ray_cleanup():
    yield
    import ray

    ray.shutdown()


def test_asha_stops_trials_after_a_task_and_frees_their_resources(tmp_path, ray_cleanup, capsys):
    import ray

    (tmp_path / "micro.yaml").write_text(MICRO_RUN)
    (tmp_path / "asha.yaml").write_text(SPACE)
    space = load_space(tmp_path / "asha.yaml", cpus_available=2)
    rows = run_sweep(space, tmp_path / "work", str(tmp_path / "sweeps"), None, None, log=lambda _: None)
    assert len(rows) == 4 and all(r["status"] == "TERMINATED" for r in rows)
    by_lr = {r["config.train.lr"]: r["tasks_done"] for r in rows}
    assert by_lr[0.001] == 3, by_lr  # the good trial runs the whole sequence
    assert by_lr[0.1] == 1, by_lr  # ASHA cut the first bad one at the first rung
    # the trials that finished kept their predictions, and every logged metric recomputes from them
    from orchestrator.report import recompute_report

    assert recompute_report(tmp_path / "sweeps" / "asha") == 0
    assert "0.001" in next((tmp_path / "sweeps" / "asha").glob("lr0.001_*")).name  # readable trial directories
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]  # nothing leaked
