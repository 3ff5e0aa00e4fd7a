"""Loopback only by default: a micro `mode-cl sweep` on a local Ray, started with mode-cl's own
settings only (the tests' RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER from conftest is taken out of its
environment), is watched while it runs; every socket its process tree and its Ray session listen on
is a loopback one, except the processes ``orchestrator.ray_runtime.WIDE_LISTENERS`` allows for its
worker count, and that allow-list is the one RELIABILITY.md documents. A new wide listener of any
other process fails here."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.ray_runtime import LOOPBACK_ONLY_ENV, WIDE_LISTENERS
from tests.faults._helpers import MODE_CL, ray_processes, ray_temp_dir, wait_until
from tests.faults.test_sweep_faults import MICRO_RUN

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
RELIABILITY = Path(__file__).resolve().parents[1] / "RELIABILITY.md"


def _kind(process, root_pid: int) -> str:
    """A process's kind: ``mode-cl`` (the driver), ``mlflow`` (its server and workers), Ray's own
    names (``gcs_server``, ``raylet``, ``ray::ClassName`` for workers) or the script a Python runs."""
    if process.pid == root_pid:
        return "mode-cl"
    command = " ".join(process.cmdline())
    if "mlflow" in command:
        return "mlflow"
    name = process.name()
    if name.startswith("ray::"):  # a worker names the method it runs: ray::RayTrainWorker.run_train_fn
        return name.split(".", 1)[0]
    if name.startswith("python"):
        script = next((Path(arg).name for arg in process.cmdline()[1:] if arg.endswith(".py")), "")
        return f"python {script}".strip()
    return name


def listeners(root_pid: int, temp_dir: Path | None) -> set[tuple[str, str, int]]:
    """(kind, address, port) of every listening socket of the process tree under ``root_pid`` and
    of every process of the Ray session under ``temp_dir``."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        processes = {root, *root.children(recursive=True)}
    except psutil.NoSuchProcess:
        processes = set()
    if temp_dir is not None:
        for line in ray_processes(temp_dir):
            with contextlib.suppress(psutil.NoSuchProcess):
                processes.add(psutil.Process(int(line.split()[0])))
    found = set()
    for process in processes:
        try:
            kind = _kind(process, root_pid)
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.add((kind, connection.laddr.ip, connection.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def not_allowed(found: set[tuple[str, str, int]], num_workers: int) -> list[str]:
    """The listeners beyond loopback that WIDE_LISTENERS does not allow at ``num_workers``."""
    allowed = {kind for kind, from_workers in WIDE_LISTENERS.items() if num_workers >= from_workers}
    return sorted(f"{k} on {ip}:{port}" for k, ip, port in found if ip not in LOOPBACK and k not in allowed)


def documented_wide_listeners() -> set[str]:
    """The process kinds RELIABILITY.md's "Network exposure of a local run" lists as listening
    beyond loopback (its "Not on loopback" item)."""
    section = RELIABILITY.read_text().split("## Network exposure of a local run", 1)[1].split("\n## ", 1)[0]
    item = re.search(r"^- \*\*Not on loopback[^\n]*(?:\n  [^\n]*)*", section, re.MULTILINE)
    assert item, "RELIABILITY.md: no '- **Not on loopback' item under 'Network exposure of a local run'"
    return set(re.findall(r"`(ray::\w+|[a-z_]+)` process", item.group(0)))


def test_the_allow_list_is_the_documented_one():
    assert documented_wide_listeners() == set(WIDE_LISTENERS)


def test_a_new_wide_listener_is_caught():
    """The check itself: a process listening on every interface is reported, one on loopback not."""
    code = (
        "import socket, time\n"
        "wide, local = socket.socket(), socket.socket()\n"
        "wide.bind(('0.0.0.0', 0)); wide.listen(); local.bind(('127.0.0.1', 0)); local.listen()\n"
        "print('up', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "up"
        found = listeners(process.pid, None)
        assert len(found) == 2, found
        wide = not_allowed(found, num_workers=8)
        assert len(wide) == 1 and wide[0].startswith("mode-cl on 0.0.0.0:"), wide
    finally:
        process.kill()
        process.wait()


def test_a_local_sweep_listens_on_loopback_only(tmp_path):
    (tmp_path / "micro.yaml").write_text(MICRO_RUN)
    space = tmp_path / "loopback.yaml"
    space.write_text("name: loopback\nrun_config: micro.yaml\ngrid:\n  method.kd_weight: [0.0]\n")
    temp_dir = ray_temp_dir()
    env = {**os.environ, "RAY_TMPDIR": str(temp_dir)}
    for name in (LOOPBACK_ONLY_ENV[0], "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)  # mode-cl's own defaults, not the test session's
    command = [MODE_CL, "sweep", str(space), "--work-dir", str(tmp_path / "work")]
    command += ["--storage", str(tmp_path / "sweeps")]
    log = tmp_path / "sweep.log"
    found: set[tuple[str, str, int]] = set()
    started = time.monotonic()
    with log.open("w") as out:
        sweep = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while sweep.poll() is None and time.monotonic() - started < 280:
            found |= listeners(sweep.pid, temp_dir)  # Train workers come and go: sample all along
            time.sleep(1)
        assert sweep.poll() == 0, log.read_text()[-3000:]
        kinds = {kind for kind, _, _ in found}
        # Sampling saw the whole run: the driver, Ray's core, a Train worker and the MLflow server.
        assert {"mode-cl", "gcs_server", "raylet", "ray::RayTrainWorker", "mlflow"} <= kinds, sorted(found)
        assert not not_allowed(found, num_workers=1), not_allowed(found, num_workers=1)
        assert wait_until(lambda: not ray_processes(temp_dir), 60), ray_processes(temp_dir)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        for line in ray_processes(temp_dir):  # only this test's Ray session
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
