"""MLflow server unreachable for a while: a trial's metrics are delivered once it is back (the client
retries with back-off), never silently dropped; when it stays away past the retries, the call fails
loudly (the Ray Train worker then fails and restarts from its checkpoint)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from orchestrator.mlflow_server import server_command
from trainables.tracking import TrialTracker

CONFIG = {"tasks": ["parity", "bigsmall"], "method": {"name": "mode", "r": 2}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(store, port) -> subprocess.Popen:
    process = subprocess.Popen(server_command(store, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("mlflow server did not start")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


def test_metrics_logged_during_an_outage_arrive_after_it_without_duplicates(tmp_path):
    from mlflow.tracking import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start(tmp_path / "mlflow", port)
    try:
        experiment = MlflowClient(uri).create_experiment("outage")
        tracker = TrialTracker(uri, experiment, None, "trial-1", "trial-1", CONFIG)
        tracker.log_metrics({"avg_acc": 0.5}, step=0)
        _stop(server)
        errors: list[BaseException] = []

        def log_during_outage() -> None:
            try:
                tracker.log_metrics({"avg_acc": 0.6}, step=1)
                tracker.log_metrics({"avg_acc": 0.6}, step=1)  # a repeat (e.g. after a restart) is not re-sent
            except BaseException as error:
                errors.append(error)

        writer = threading.Thread(target=log_during_outage)
        writer.start()
        time.sleep(8)  # the server is down for this long while the trial keeps logging
        assert writer.is_alive()  # still retrying, not dropped
        server = _start(tmp_path / "mlflow", port)
        writer.join(timeout=180)
        assert not writer.is_alive() and errors == []
        history = MlflowClient(uri).get_metric_history(tracker.run_id, "avg_acc")
        assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.6)]
    finally:
        _stop(server)


def test_an_outage_longer_than_the_retries_fails_loudly(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start(tmp_path / "mlflow", port)
    experiment = MlflowClient(uri).create_experiment("outage")
    tracker = TrialTracker(uri, experiment, None, "trial-1", "trial-1", CONFIG)
    _stop(server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with pytest.raises(MlflowException):
        tracker.log_metrics({"avg_acc": 0.7}, step=2)
