"""Security defaults: loopback binds, MLflow host allow-list, Ray auth left on, secrets redacted from
MLflow params, and checkpoints that never unpickle arbitrary objects."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from orchestrator.mlflow_server import server_command
from trainables.checkpoint import latest_good, list_checkpoints
from trainables.tracking import REDACTED, TrialTracker, redact

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_mlflow_binds_loopback_with_a_host_allow_list(tmp_path):
    command = server_command(tmp_path, 5123)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    assert "127.0.0.1:5123" in allowed and all(h.split(":")[0] in ("127.0.0.1", "localhost") for h in allowed)


def test_local_ray_dashboard_binds_loopback_and_auth_is_never_disabled(monkeypatch):
    import ray

    from orchestrator import ray_runtime

    captured = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: captured.update(kwargs))
    ray_runtime.init_ray(None)
    assert captured["dashboard_host"] == "127.0.0.1" and captured["include_dashboard"] is True
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True).stdout.split()
    for name in tracked:  # code and configs (the docs mention the setting to say it is never used)
        path = ROOT / name
        if path.suffix in {".py", ".yaml", ".yml", ".sh", ".toml"} and path.name != "test_security.py":
            assert "RAY_AUTH_MODE=disabled" not in path.read_text(errors="ignore"), name


def test_secrets_from_the_environment_never_reach_mlflow_params(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    secret = "hf_abcdefghijklmnop"
    monkeypatch.setenv("HF_TOKEN", secret)
    assert redact(f"https://user:{secret}@host/model") == f"https://user:{REDACTED}@host/model"
    assert redact("short", {"API_KEY": "short"}) == "short"  # < 8 characters: too common to redact
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = MlflowClient(uri).create_experiment("security")
    config = {"tasks": ["parity"], "method": {"name": "mode"}, "coin": {"model": f"/models/{secret}/anole"}}
    tracker = TrialTracker(uri, experiment, None, "t", "t", config)
    params = MlflowClient(uri).get_run(tracker.run_id).data.params
    assert params["coin.model"] == f"/models/{REDACTED}/anole"
    assert secret not in json.dumps(params)


def test_redact_survives_a_variable_removed_while_it_reads_the_environment():
    """Another thread (MLflow's telemetry) may remove a variable between listing the names and
    reading one: redact skips it instead of raising KeyError."""

    from collections.abc import Mapping

    class Vanishing(Mapping):  # like os.environ: items() lists names, then reads each value
        def __init__(self, data):
            self.data = data

        def __iter__(self):  # list the names, then lose one, as a concurrent os.environ.pop would
            names = list(self.data)
            self.data.pop("_MLFLOW_TELEMETRY_SESSION_ID")
            return iter(names)

        def __getitem__(self, name):
            return self.data[name]

        def __len__(self):
            return len(self.data)

    environ = Vanishing({"_MLFLOW_TELEMETRY_SESSION_ID": "x" * 16, "API_TOKEN": "s3cr3t-value"})
    assert redact("token s3cr3t-value", environ) == f"token {REDACTED}"


def test_the_environment_is_read_safely_while_another_thread_changes_it(monkeypatch):
    """MLflow's telemetry sets and removes variables from its own threads while a Train worker
    redacts (measured: KeyError and RuntimeError there). One thread sets and deletes variables in a
    loop, with threads switching every microsecond, while redact and the other readers of the whole
    environment run many times: none raises. (Written as ``os.environ.items()`` or
    ``{**os.environ}``, each fails here within a few hundred calls.)"""
    import os
    import sys
    import threading

    from orchestrator.mlflow_server import server_env
    from trainables.environment import snapshot

    monkeypatch.setenv("API_TOKEN", "s3cr3t-value")
    names = [f"_MODE_CL_CHURN_{i}" for i in range(64)]
    done, churned = threading.Event(), [0]

    def churn() -> None:
        while not done.is_set():
            for name in names:
                os.environ[name] = "x" * 16
            for name in names:
                del os.environ[name]
            churned[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            assert redact("token s3cr3t-value") == f"token {REDACTED}"
            assert server_env()["API_TOKEN"] == snapshot()["API_TOKEN"] == "s3cr3t-value"
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(interval)
        for name in names:
            os.environ.pop(name, None)
    assert churned[0] > 10, churned  # the environment did change meanwhile


def test_a_checkpoint_carrying_a_pickled_object_is_refused_not_executed(tmp_path):
    from tests.conftest import MICRO_RUN
    from trainables.config import load_run_config
    from trainables.engine import run_sequence

    config = load_run_config(None, MICRO_RUN)
    run_sequence(config, tmp_path / "work", tmp_path / "run", log=lambda _: None)
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    marker = tmp_path / "executed"
    torch.save({"payload": _Payload(str(marker))}, newest / "optimizer.pt")
    manifest = json.loads((newest / "manifest.json").read_text())  # a forged but consistent manifest
    import hashlib

    manifest["optimizer.pt"] = hashlib.sha256((newest / "optimizer.pt").read_bytes()).hexdigest()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    warnings: list[str] = []
    loaded = latest_good(list_checkpoints(tmp_path / "run" / "checkpoints"), warn=warnings.append)
    assert not marker.exists()  # nothing was unpickled and run
    assert loaded is not None and loaded.directory != newest and warnings and newest.name in warnings[0]


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))
