"""``ray up cluster.local.yaml`` for real on this machine: sshd on a loopback port with a throwaway
key → ``ray up`` → a 2-trial sweep submitted with ``mode-cl sweep --cluster`` → the head's MLflow
server holds one parent and two children with metrics → ``mode-cl cluster-down`` → nothing left.

Needs sshd, ssh-keygen and rsync (``.ci/run`` installs them and sets MODE_CL_REQUIRE_CLUSTER_TEST=1,
which turns a missing prerequisite into a failure instead of a skip).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.faults.test_sweep_faults import MICRO_RUN

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODE_CL, RAY = str(BIN / "mode-cl"), str(BIN / "ray")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
METRICS = ("acc/parity", "acc/bigsmall", "avg_acc", "forgetting", "gen/acc", "inter_modal_forgetting")

missing = [tool for tool in (SSHD, "ssh-keygen", "rsync", "ssh") if not shutil.which(tool) and not Path(tool).exists()]
if missing and os.environ.get("MODE_CL_REQUIRE_CLUSTER_TEST") != "1":
    pytest.skip(f"needs {', '.join(missing)} (apt-get install openssh-server rsync)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout_s: float = 10) -> str:
    """GET ``url``, retrying while the tunnel comes up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _ray_processes() -> list[str]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in listing if any(k in line for k in ("raylet", "gcs_server", "ray::", "dashboard.py"))]


def _head_autoscaler() -> str:
    """Which monitor.py the head's current Ray session runs (the head is this machine, default temp dir)."""
    log = Path("/tmp/ray/session_latest/logs/monitor.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines() if log.is_file() else []:
            if "started with command: [" in line:
                return line.split("started with command: [", 1)[1].split(",", 1)[0].strip("'")
        time.sleep(0.5)
    raise AssertionError(f"no monitor start line in {log}")


@pytest.fixture
def sshd(tmp_path):
    """An sshd on 127.0.0.1:<free port> that accepts only a throwaway key for the current user."""
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "client_key.pub").read_text())
    port = _free_port()
    config = keys / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host_key'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile {keys / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nPrintMotd no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=(tmp_path / "sshd.log").open("w"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"sshd did not start: {(tmp_path / 'sshd.log').read_text()}")
    yield {"port": port, "key": keys / "client_key", "process": process}
    process.terminate()
    process.wait(timeout=10)


PROXY = """
import selectors, socket, sys
connection = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
selector = selectors.DefaultSelector()
selector.register(sys.stdin.buffer, selectors.EVENT_READ, connection.sendall)
selector.register(connection, selectors.EVENT_READ, sys.stdout.buffer.write)
while True:  # relay until either side closes, then exit (no process keeps the session open)
    for key, _ in selector.select():
        data = key.fileobj.read1(65536) if key.fileobj is sys.stdin.buffer else key.fileobj.recv(65536)
        if not data:
            sys.exit(0)
        key.data(data)
        sys.stdout.buffer.flush()
"""


def _proxy_script(tmp_path: Path) -> Path:
    """ssh ProxyCommand to the loopback port: Ray's local provider has no ssh port setting."""
    path = tmp_path / "ssh" / "proxy.py"
    path.write_text(PROXY)
    return path


def _sshd_sessions() -> set[int]:
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return {int(line.split()[0]) for line in listing if "sshd:" in line}


def _cluster_file(tmp_path: Path, sshd: dict) -> tuple[Path, Path]:
    """cluster.local.yaml with only what this machine needs changed: the head's paths under a
    temporary home (not the real ~), the throwaway key and the loopback port (ssh_proxy_command:
    Ray's local provider has no ssh port setting), and the project's virtualenv linked instead of
    installed again (scripts/install.sh is what .ci/run itself runs in a fresh clone)."""
    home = tmp_path / "home"
    home.mkdir()
    text = (ROOT / "cluster.local.yaml").read_text().replace("~/mode-cl", f"{home}/mode-cl")
    data = yaml.safe_load(text)
    data["cluster_name"] = f"mode-cl-test-{os.getpid()}"
    data["auth"] = {
        "ssh_user": getpass.getuser(),
        "ssh_private_key": str(sshd["key"]),
        "ssh_proxy_command": f"{sys.executable} {_proxy_script(tmp_path)} {sshd['port']}",
    }
    data["setup_commands"] = [f"ln -sfn {sys.prefix} {home}/mode-cl/.venv"]
    path = tmp_path / "cluster.test.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, home


def test_ray_up_sweep_on_the_cluster_mlflow_on_the_head_and_full_teardown(tmp_path, sshd):
    from mlflow.tracking import MlflowClient

    subprocess.run([RAY, "stop", "--force"], capture_output=True, check=False)
    sessions_before = _sshd_sessions()
    cluster, home = _cluster_file(tmp_path, sshd)
    (tmp_path / "micro.yaml").write_text(MICRO_RUN)
    space = tmp_path / "onhead.yaml"
    space.write_text("name: onhead\nrun_config: micro.yaml\ngrid:\n  method.kd_weight: [0.1, 0.3]\n")
    try:
        up = subprocess.run(
            [RAY, "up", "-y", "--no-config-cache", str(cluster)], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        uri = (home / "mode-cl-work" / "mlflow" / "tracking_uri").read_text().strip()
        assert uri.startswith("http://127.0.0.1:")

        sweep = subprocess.run(
            [MODE_CL, "sweep", str(space), "--cluster", str(cluster)], capture_output=True, text=True, timeout=900
        )
        assert sweep.returncode == 0, sweep.stdout[-4000:] + sweep.stderr[-4000:]
        assert (home / "mode-cl" / "mode-cl-spaces" / "onhead" / "onhead.yaml").is_file()  # uploaded
        assert (home / "mode-cl-work" / "sweeps" / "onhead" / "sweep.json").is_file()  # ran on the head's paths

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("onhead")
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and len(children) == 2
        assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
        for child in children:
            assert child.info.status == "FINISHED"
            for metric in METRICS:
                assert [m.step for m in client.get_metric_history(child.info.run_id, metric)] == [0, 1, 2], metric

        # `mode-cl ui --cluster`: the MLflow UI and API through the SSH tunnel and the head's relay
        ui_port = _free_port()
        ui_log = (tmp_path / "ui.log").open("w")
        ui = subprocess.Popen(
            [MODE_CL, "ui", "--cluster", str(cluster), "--port", str(ui_port)],
            stdout=ui_log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            page = _get(f"http://127.0.0.1:{ui_port}/", timeout_s=120)
            assert "<title>MLflow</title>" in page or "mlflow" in page.lower(), page[:300]
            found = json.loads(
                _get(f"http://127.0.0.1:{ui_port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=onhead")
            )
            assert found["experiment"]["experiment_id"] == experiment.experiment_id
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=30)
        assert f"http://127.0.0.1:{ui_port}" in (tmp_path / "ui.log").read_text()

        report = subprocess.run(
            [MODE_CL, "report", "onhead", "--format", "json", "--cluster", str(cluster)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert report.returncode == 0, report.stderr[-3000:]
        rows = json.loads(report.stdout)  # only the head's output: pipeable
        assert sorted(r["status"] for r in rows) == ["TERMINATED", "TERMINATED"]

        # The driver dies and the head's Ray restarts mid-sweep; `mode-cl resume --cluster` finishes it.
        killed = tmp_path / "killed.yaml"
        killed.write_text(space.read_text().replace("name: onhead", "name: killed"))
        log = (tmp_path / "killed.log").open("w")
        driver = subprocess.Popen(
            [MODE_CL, "sweep", str(killed), "--cluster", str(cluster)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        train_dir = home / "mode-cl-work" / "sweeps" / "killed" / "train"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and driver.poll() is None:
            if list(train_dir.glob("train-*/ckpt_t01_s000000/manifest.json")):
                break
            time.sleep(0.2)
        assert list(train_dir.glob("train-*/ckpt_t01_s000000/manifest.json")), (tmp_path / "killed.log").read_text()
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        subprocess.run(["pkill", "-9", "-f", f"{home}/mode-cl/.venv/bin/mode-cl sweep"], check=False)
        restart = subprocess.run(
            [RAY, "up", "-y", "--restart-only", "--no-config-cache", str(cluster)],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert restart.returncode == 0, restart.stdout[-3000:] + restart.stderr[-3000:]
        # v1 autoscaler: v2 can terminate its own head in the restart's `ray stop` ("Head node … not found!")
        assert _head_autoscaler().endswith("autoscaler/_private/monitor.py")
        resume = subprocess.run(
            [MODE_CL, "resume", "killed", "--cluster", str(cluster)], capture_output=True, text=True, timeout=900
        )
        assert resume.returncode == 0, resume.stdout[-4000:] + resume.stderr[-4000:]
        runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(runs) == 3 and len(children) == 2  # one child per trial, reopened on resume
        for child in children:
            for metric in (*METRICS, "train/loss"):
                steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
                assert steps and len(steps) == len(set(steps)), (metric, steps)
        for run_dir in train_dir.glob("train-*"):
            state = json.loads((run_dir / "ckpt_t02_s000000" / "state.json").read_text())
            assert [e["task"] for e in state["task_log"] if e["event"] == "start"] == [0, 1]  # none trained twice
    finally:
        down = subprocess.run([MODE_CL, "cluster-down", str(cluster)], capture_output=True, text=True, timeout=300)
        time.sleep(2)
        ray_left = _ray_processes()
        if ray_left:  # the head is this machine: a Ray left running would break every later Ray test
            subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert ray_left == []
    assert not (home / "mode-cl-work" / "mlflow" / "server.pid").exists()
    server_left = subprocess.run(["pgrep", "-f", f"mlflow server.*{home}"], capture_output=True, text=True).stdout
    assert server_left == ""
    relay_left = subprocess.run(["pgrep", "-f", f"tracking-server relay --store {home}"], capture_output=True).stdout
    assert relay_left == b""
    sshd["process"].send_signal(signal.SIGTERM)
    sshd["process"].wait(timeout=10)

    def leftovers() -> tuple[set[int], bytes]:  # ssh sessions, and processes using the throwaway key/proxy
        ours = subprocess.run(["pgrep", "-f", str(tmp_path / "ssh")], capture_output=True).stdout
        return _sshd_sessions() - sessions_before, ours

    deadline = time.monotonic() + 40  # Ray's ssh ControlMaster connections persist 10 s after last use
    while leftovers() != (set(), b"") and time.monotonic() < deadline:
        time.sleep(1)
    assert leftovers() == (set(), b"")  # no sshd, ssh session or proxy left behind
