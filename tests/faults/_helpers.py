"""Shared by the fault tests: an MLflow server that can be stopped and started again on the same
port and store, a private Ray temp dir (to find leftover Ray processes), and results comparison."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from orchestrator.mlflow_server import server_command

MODE_CL = str(Path(sys.executable).with_name("mode-cl"))
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a fixed port and store, stoppable and restartable (an outage)."""

    def __init__(self, store: Path) -> None:
        self.store, self.port = store, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            server_command(self.store, self.port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None


def ray_temp_dir() -> Path:
    """A short private directory for Ray's session files (its socket paths must stay < 108
    characters): every Ray process started under it names it on its command line."""
    return Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))


def ray_processes(temp_dir: Path) -> list[str]:
    """Command lines of live processes that belong to the Ray session under ``temp_dir``."""
    found = subprocess.run(["pgrep", "-af", str(temp_dir)], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def wait_until(predicate, seconds: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def comparable(results: dict[str, Any]) -> dict[str, Any]:
    """Results without what legitimately differs between an interrupted and a clean run."""
    return {k: v for k, v in results.items() if k not in ("task_log", "profile")}  # profile: timings


def child_runs(client, experiment_name: str) -> tuple[list, list]:
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


STAGE_METRICS = ("acc/parity", "acc/bigsmall", "avg_acc", "forgetting", "bwt", "gen/acc", "gen/fd")


def check_trials_against_uninterrupted(client, children, run_config: Path, out: Path) -> dict[str, dict]:
    """Each finished child run of a 2-task micro sweep has every stage metric at steps 0, 1, 2 and
    6 loss steps (none lost, none duplicated), and its logged results equal an uninterrupted
    in-process run of the same trial config (method.kd_weight is the swept value). Returns the
    logged results by kd_weight."""
    import json

    from trainables.config import load_run_config
    from trainables.engine import run_sequence

    logged_by_weight = {}
    for child in children:
        assert child.info.status == "FINISHED"
        for metric in STAGE_METRICS:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
            assert sorted(steps) == [0, 1, 2], (metric, steps)
        losses = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert sorted(losses) == list(range(6)), losses
        weight = child.data.params["method.kd_weight"]
        local = client.download_artifacts(child.info.run_id, "results.json", str(out / weight))
        logged = json.loads(Path(local).read_text())
        expected = run_sequence(
            load_run_config(run_config, [f"method.kd_weight={weight}"]),
            out / "reference-work",
            None,
            log=lambda _: None,
        )
        assert comparable(logged) == comparable(expected), weight
        logged_by_weight[weight] = logged
    return logged_by_weight
