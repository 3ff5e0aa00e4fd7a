"""Faults inside a running sweep, on a long-lived Ray cluster (as on a real cluster, where leaks
would accumulate): one trial's Train worker is SIGKILLed in the middle of task 2, and the MLflow
server goes away for a while after the first task checkpoint, then comes back on the same port.

The sweep must finish by itself; each trial's results (as logged to MLflow) equal an uninterrupted
in-process run with the same seeds; one MLflow child run per trial with every metric at every stage
exactly once; everything a clean sweep records (artifacts, logged checkpoints that load, the best
trial's registered model, the parent's summary, `report --format json` agreeing with MLflow); and
afterwards no placement group, actor or CPU is held, and `ray stop` leaves no Ray process behind.
(This is also the suite's end-to-end sweep test: the faults change nothing a user can see.)"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.ray_runtime import init_ray
from tests.faults._helpers import (
    MODE_CL,
    RAY,
    MlflowServer,
    check_trials_against_uninterrupted,
    child_runs,
    free_port,
    ray_processes,
    ray_temp_dir,
    wait_until,
)
from trainables.benchmarks.digits.tiny import ChameleonShape, build_tiny_chameleon
from trainables.mode import MoDEConfig, attach_mode, load_mode

MICRO_RUN = """
tasks: [parity, bigsmall]
base: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, epochs: 1}
data: {task_train: 48, task_test: 24}
train: {epochs: 1, batch_size: 16}
eval: {gen_samples_per_digit: 2}
method: {name: mode, r: 2, num_experts: 2}
resources: {cpus_per_worker: 1}
checkpoint: {every_steps: 1, num_to_keep: 0}
"""
KD_WEIGHTS = ("0.1", "0.3")
OUTAGE_SECONDS = 12
RAY_SINGLETONS = {"_AutoscalingCoordinatorActor"}


@pytest.fixture
def ray_cluster(tmp_path):
    """`ray start --head` with the dashboard (it frees stopped trials' placement groups), a private
    temp dir, and MODE_CL_FAULT_KILL_AT in its environment so that Train workers inherit it."""
    temp_dir, port, marker = ray_temp_dir(), free_port(), tmp_path / "worker-killed"
    env = {**os.environ, "RAY_TMPDIR": str(temp_dir), "MODE_CL_FAULT_KILL_AT": f"1:1:{marker}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "stop", "--force"], capture_output=True, check=False)
    started = subprocess.run(
        [RAY, "start", "--head", "--port", str(port),
         "--num-cpus", "2", "--resources", '{"TRAIN_DRIVER": 8}',
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}", temp_dir, marker
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, check=False)


def test_sweep_survives_a_killed_worker_and_an_mlflow_outage_with_nothing_lost(tmp_path, ray_cluster):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    address, temp_dir, marker = ray_cluster
    (tmp_path / "micro.yaml").write_text(MICRO_RUN)
    space = tmp_path / "faults.yaml"
    space.write_text(f"name: faults\nrun_config: micro.yaml\ngrid:\n  method.kd_weight: [{', '.join(KD_WEIGHTS)}]\n")
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    work_dir, storage = tmp_path / "work", tmp_path / "sweeps"
    command = [MODE_CL, "sweep", str(space), "--work-dir", str(work_dir), "--storage", str(storage)]
    command += ["--tracking-uri", server.uri, "--address", address, "--verbose"]  # workers' lines too
    log_path, sweep = tmp_path / "sweep.log", None
    try:
        with log_path.open("w") as log:
            sweep = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            train_dir = storage / "faults" / "train"
            first_task = lambda: list(train_dir.glob("train-*/ckpt_t01_s000000/manifest.json"))  # noqa: E731
            assert wait_until(lambda: first_task() or sweep.poll() is not None, 400), log_path.read_text()[-3000:]
            assert sweep.poll() is None, log_path.read_text()[-3000:]
            server.stop()  # the outage: trials go on training and keep trying to log
            time.sleep(OUTAGE_SECONDS)
            assert sweep.poll() is None  # nobody gave up during the outage
            server.start()
            assert sweep.wait(timeout=900) == 0, log_path.read_text()[-4000:]
        output = log_path.read_text()
        assert marker.is_file(), "the worker fault was never injected"
        assert "resuming from checkpoint" in output  # the killed worker's trial restarted from its checkpoint
        assert "trials done 2/2" in output

        client = MlflowClient(server.uri)
        parents, children = child_runs(client, "faults")
        assert len(parents) == 1 and len(children) == 2  # one child per trial despite the restart
        logged = check_trials_against_uninterrupted(client, children, tmp_path / "micro.yaml", tmp_path)
        assert sorted(logged) == list(KD_WEIGHTS)

        # Everything a clean sweep records is there too.
        assert all(c.data.params["task_order"] == "parity > bigsmall" for c in children)
        assert sorted(c.info.run_name for c in children) == [f"λ{w} s0" for w in KD_WEIGHTS]  # readable names
        for child in children:  # every stage's per-sample predictions
            logged_predictions = {a.path for a in client.list_artifacts(child.info.run_id, "predictions")}
            assert logged_predictions == {f"predictions/stage_{k:02d}.parquet" for k in range(3)}
        for child in children:
            artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
            assert {"acc_matrix.csv", "acc_matrix.parquet", "acc_matrix.png", "forgetting_curves.png"} <= artifacts
            logged_checkpoints = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")}
            assert {"checkpoints/task_01", "checkpoints/task_02"} <= logged_checkpoints
            assert child.data.tags["ray_checkpoint"].endswith("ckpt_t02_s000000")
        best = client.get_run(parents[0].info.run_id).data.tags["best_trial_id"]
        version = client.search_model_versions("name = 'faults-best'")[0]
        assert version.run_id == next(c.info.run_id for c in children if c.data.tags["trial_id"] == best)
        assert version.source.endswith("checkpoints/task_02")
        parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
        assert {"trials.parquet", "trials.csv", "pareto.png", "faults.yaml", "groups"} <= parent_artifacts
        # a logged task checkpoint loads into a freshly attached model
        local = client.download_artifacts(children[0].info.run_id, "checkpoints/task_02", str(tmp_path / "download"))
        base_dir = next((work_dir / "base").iterdir())
        vocabulary = json.loads((base_dir / "config.json").read_text())["vocabulary_map"]
        model = build_tiny_chameleon(vocabulary, ChameleonShape(32, 64, 1, 4, max_position_embeddings=256))
        load_mode(attach_mode(model, MoDEConfig(r=2, num_experts=2)), Path(local) / "adapter")
        report = subprocess.run(
            [MODE_CL, "report", "faults", "--format", "json", "--storage", str(storage)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows = json.loads(report.stdout)
        assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
        by_trial = {c.data.tags["trial_id"]: c for c in children}
        for row in rows:
            child = client.get_run(by_trial[row["trial_id"]].info.run_id)
            assert row["avg_acc"] == pytest.approx(child.data.metrics["avg_acc"])
            assert row["gen_acc"] == pytest.approx(child.data.metrics["gen/acc"])

        init_ray(address)  # with the cluster's auth token, as `mode-cl sweep --address` does
        try:
            from ray.util import placement_group_table

            def released() -> bool:
                live_groups = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
                # Ray's cluster-wide autoscaling coordinator (one per cluster, not per trial) stays.
                alive = [
                    a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name not in RAY_SINGLETONS
                ]
                free = ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
                return not live_groups and not alive and free

            groups = lambda: [(g["name"], g["state"]) for g in placement_group_table().values()]  # noqa: E731
            actors = lambda: [(a.class_name, a.state) for a in list_actors() if a.state != "DEAD"]  # noqa: E731
            assert wait_until(released, 60), (
                groups(),
                actors(),
                ray.available_resources().get("CPU"),
                ray.cluster_resources().get("CPU"),
            )
        finally:
            ray.shutdown()
    finally:
        if sweep is not None and sweep.poll() is None:
            sweep.kill()
        server.stop()
    subprocess.run([RAY, "stop", "--force"], capture_output=True, check=False)
    assert wait_until(lambda: not ray_processes(temp_dir), 30), ray_processes(temp_dir)
