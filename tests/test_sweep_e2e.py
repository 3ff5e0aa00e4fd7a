"""End to end: a 2-trial, 2-task micro sweep → one MLflow parent, two children with every metric
per task, artifacts and loadable task checkpoints; `report --format json` agrees with MLflow.
(A sweep whose driver is killed: tests/faults/test_sweep_driver_killed.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.mlflow_server import tracking_server

MODE_CL = str(Path(sys.executable).with_name("mode-cl"))
RAY = str(Path(sys.executable).with_name("ray"))
MICRO_RUN = """
tasks: [parity, bigsmall]
base: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, epochs: 1}
data: {task_train: 48, task_test: 24}
train: {epochs: 1, batch_size: 16}
eval: {gen_samples_per_digit: 2}
method: {name: mode, r: 2, num_experts: 2}
resources: {cpus_per_worker: 1}
checkpoint: {every_steps: 1}
"""
METRICS = ("acc/parity", "acc/bigsmall", "avg_acc", "forgetting", "bwt", "gen/acc", "gen/fd", "inter_modal_forgetting")


def _space(directory: Path, name: str) -> Path:
    (directory / "micro.yaml").write_text(MICRO_RUN)
    space = directory / f"{name}.yaml"
    space.write_text(f"name: {name}\nrun_config: micro.yaml\ngrid:\n  method.kd_weight: [0.1, 0.3]\n")
    return space


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    with tracking_server(tmp_path_factory.mktemp("mlflow"), log=lambda _: None) as uri:
        yield uri


def _stop_ray() -> None:
    subprocess.run([RAY, "stop", "--force"], capture_output=True, check=False)


def _children(client, sweep_name):
    experiment = client.get_experiment_by_name(sweep_name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_micro_sweep_is_tracked_in_mlflow_and_report_agrees(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from trainables.mode import MoDEConfig, attach_mode, load_mode
    from trainables.tiny import TinyChameleonConfig, build_tiny_chameleon

    space = _space(tmp_path, "e2e")
    common = ["--work-dir", str(tmp_path / "work"), "--storage", str(tmp_path / "sweeps"), "--tracking-uri", mlflow_uri]
    result = subprocess.run([MODE_CL, "sweep", str(space), *common], capture_output=True, text=True, timeout=600)
    _stop_ray()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[sweep] trials done 2/2" in result.stdout + result.stderr

    client = MlflowClient(mlflow_uri)
    parents, children = _children(client, "e2e")
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert {c.data.params["method.kd_weight"] for c in children} == {"0.1", "0.3"}
    assert all(c.data.params["task_order"] == "parity > bigsmall" for c in children)
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in METRICS:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
            assert steps == [0, 1, 2], (metric, steps)
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 6
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"acc_matrix.csv", "acc_matrix.parquet", "acc_matrix.png", "forgetting_curves.png"} <= artifacts
        assert {"checkpoints/task_01", "checkpoints/task_02"} <= {
            a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")
        }
        assert child.data.tags["ray_checkpoint"].endswith("ckpt_t02_s000000")
    best = client.get_run(parents[0].info.run_id).data.tags["best_trial_id"]
    version = client.search_model_versions("name = 'e2e-best'")[0]
    assert version.run_id == next(c.info.run_id for c in children if c.data.tags["trial_id"] == best)
    assert version.source.endswith("checkpoints/task_02")
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"trials.parquet", "trials.csv", "pareto.png", "e2e.yaml"} <= parent_artifacts

    # a logged task checkpoint loads into a freshly attached model
    import mlflow

    local = mlflow.artifacts.download_artifacts(
        run_id=children[0].info.run_id, artifact_path="checkpoints/task_02", tracking_uri=mlflow_uri,
        dst_path=str(tmp_path / "download"),
    )  # fmt: skip
    base_dir = next((tmp_path / "work" / "base").iterdir())
    model = build_tiny_chameleon(json.loads((base_dir / "config.json").read_text())["vocabulary_map"],
                                 TinyChameleonConfig(32, 64, 1, 4))  # fmt: skip
    load_mode(attach_mode(model, MoDEConfig(r=2, num_experts=2)), Path(local) / "adapter")

    report = subprocess.run(
        [MODE_CL, "report", "e2e", "--format", "json", "--storage", str(tmp_path / "sweeps")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = json.loads(report.stdout)
    assert len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    for row in rows:
        child = by_trial[row["trial_id"]]
        assert row["avg_acc"] == pytest.approx(child.data.metrics["avg_acc"])
        assert row["gen_acc"] == pytest.approx(child.data.metrics["gen/acc"])
