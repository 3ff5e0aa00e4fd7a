"""ASHA with tasks learned as its time attribute: bad trials stop after a task, their Train
placement groups are freed (the dashboard process cleans them up), and the sweep still finishes."""

from __future__ import annotations

import time

import pytest

from orchestrator.space import load_space
from orchestrator.sweep import run_sweep

MICRO_RUN = """
tasks: [parity, bigsmall, next]
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
  method.kd_weight: [0.0, 0.3, 1.0, 3.0]
objective: {metric: gen_fd, mode: min}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
max_concurrent_trials: 2
"""


@pytest.fixture
def ray_cleanup():
    yield
    import ray

    ray.shutdown()


def test_asha_stops_trials_after_a_task_and_frees_their_resources(tmp_path, ray_cleanup):
    import ray

    (tmp_path / "micro.yaml").write_text(MICRO_RUN)
    (tmp_path / "asha.yaml").write_text(SPACE)
    space = load_space(tmp_path / "asha.yaml", cpus_available=2)
    rows = run_sweep(space, tmp_path / "work", str(tmp_path / "sweeps"), None, None, log=lambda _: None)
    assert len(rows) == 4 and all(r["status"] == "TERMINATED" for r in rows)
    tasks_done = sorted(r["tasks_done"] for r in rows)
    assert tasks_done[-1] == 3  # the best trial runs the whole sequence
    assert tasks_done[0] < 3, tasks_done  # ASHA cut at least one after fewer tasks
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]  # nothing leaked
