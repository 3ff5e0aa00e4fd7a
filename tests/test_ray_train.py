"""Ray Train path: same science as in-process, exact resume after a killed worker, DDP on gloo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MICRO_RUN
from trainables.config import load_run_config
from trainables.engine import run_sequence

MICRO = [
    *MICRO_RUN,
    "tasks=[parity, bigsmall, prime]",
    "resources.cpus_per_worker=1",
    "checkpoint.every_steps=1",
    "checkpoint.num_to_keep=0",
]
ADAPTER = Path("adapter") / "adapter.safetensors"


def comparable(results):
    return {k: v for k, v in results.items() if k not in ("task_log", "profile")}  # profile: timings


@pytest.fixture(scope="module")
def ray_session():
    import ray

    from orchestrator.ray_runtime import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def reference(work_dir, tmp_path_factory):
    """The uninterrupted in-process (--no-ray) run every Ray variant must reproduce: (results, out dir)."""
    out = tmp_path_factory.mktemp("reference")
    return run_sequence(load_run_config(None, MICRO), work_dir, out, log=lambda _: None), out


def test_ray_train_equals_in_process_and_resumes_exactly_after_a_killed_worker(
    ray_session, work_dir, reference, tmp_path, monkeypatch
):
    from orchestrator.train import run_with_ray

    expected, reference_out = reference
    marker = tmp_path / "killed"
    monkeypatch.setenv("MODE_CL_FAULT_KILL_AT", f"1:2:{marker}")  # SIGKILL itself in task 2 after step 2
    storage = tmp_path / "storage"
    results = run_with_ray(
        load_run_config(None, MICRO), work_dir, tmp_path / "out", "killed-worker", str(storage), log=lambda _: None
    )
    assert marker.is_file(), "the fault was never injected"
    assert comparable(results) == comparable(expected)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    events = [(e["task"], e["event"], e["step"]) for e in results["task_log"]]
    assert (1, "resume", 1) in events  # killed after step 2, before its checkpoint: resumes at step 1
    assert [e for e in events if e[1] in ("start", "end")] == [
        (0, "start", 0), (0, "end", 3), (1, "start", 0), (1, "end", 3), (2, "start", 0), (2, "end", 3)
    ]  # fmt: skip
    final = storage / "killed-worker" / "ckpt_t03_s000000" / ADAPTER
    assert final.read_bytes() == (reference_out / "checkpoints" / "ckpt_t03_s000000" / ADAPTER).read_bytes()


# One method per code path that ranks could get wrong: MoDE's distillation stream (and with it the
# MoDE family: mode_no_kd, tmoe_only, moelora), the peft LoRA with a replay batch and a buffer
# (and with it seq_lora), lwf's snapshot, olora's per-task adapters, cl_moe's counts summed over
# ranks. Each case starts a Ray Train worker group (~40 s here), so the others are not repeated.
DDP_METHODS = ["mode", "replay", "lwf", "olora", "cl_moe"]


@pytest.mark.parametrize("method", DDP_METHODS)
def test_two_ddp_workers_on_gloo_follow_the_single_worker_loss_curve(ray_session, work_dir, tmp_path, method):
    """A method under Ray Train with 2 workers: same global batches (each rank its share, the
    method's extra batches too), gradients averaged, method state kept equal across ranks."""
    from orchestrator.train import run_with_ray

    # Dropout off: with it, each rank draws its own masks and the curves differ by design.
    common = [*MICRO, "method.dropout=0.0", f"method.name={method}"]
    single = load_run_config(None, common)
    double = load_run_config(None, [*common, "resources.num_workers=2"])
    one = run_sequence(single, work_dir, None, log=lambda _: None)
    two = run_with_ray(double, work_dir, tmp_path / "out", "ddp", str(tmp_path / "storage"), log=lambda _: None)
    curve_one, curve_two = np.concatenate(one["losses"]), np.concatenate(two["losses"])
    assert curve_one.shape == curve_two.shape == (9,)
    # Same global batches, gradients averaged over ranks: equal up to float summation order.
    np.testing.assert_allclose(curve_two, curve_one, rtol=1e-3)
