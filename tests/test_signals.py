"""Every command that starts a server or Ray stops what it started when SIGTERM, SIGINT or SIGHUP is
sent to its own process only (as a supervisor, `timeout` or a closed terminal does), exits with
128 + the signal and says so in one line: no MLflow server left on its port, no Ray process left of
its session. While they run, every socket their process tree listens on is a loopback one (the
documented set in RELIABILITY.md: all of them), so any new wide listener fails here."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.faults._helpers import MODE_CL, RAY, free_port, ray_processes, ray_temp_dir, wait_until
from tests.faults.test_sweep_faults import MICRO_RUN

SIGNALS = pytest.mark.parametrize("stopping", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_on(port: int) -> list[str]:
    """Command lines naming ``--port PORT`` (the mlflow CLI and its uvicorn child both do)."""
    found = subprocess.run(["pgrep", "-af", "--", f"--port {port}( |$)"], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def _from_a_terminal(ignore_sigint: bool = False):
    """preexec_fn: the child starts as from an interactive shell, SIGHUP at its default even when
    the test run itself was started under nohup (a command keeps an inherited ignored SIGHUP
    ignored, on purpose); with ``ignore_sigint``, SIGINT ignored as in a shell's background job."""

    def reset() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    return reset


def _stop(process: subprocess.Popen, stopping: signal.Signals, log: Path) -> None:
    process.send_signal(stopping)  # to this process alone, not its group
    try:
        code = process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"still running 180 s after {stopping.name}: {log.read_text()[-3000:]}") from None
    assert code == 128 + stopping, log.read_text()[-3000:]
    assert f"mode-cl: stopped by {stopping.name}" in log.read_text()


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _wide_listeners(root_pid: int, temp_dir: Path) -> tuple[int, list[str]]:
    """(listening sockets seen, those not on loopback) of the process tree under ``root_pid`` and
    of every process of the Ray session under ``temp_dir``."""
    root = psutil.Process(root_pid)
    processes = {root, *root.children(recursive=True)}
    processes |= {psutil.Process(int(line.split()[0])) for line in ray_processes(temp_dir)}
    seen, wide = 0, []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            name = process.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                seen += 1
                if connection.laddr.ip not in LOOPBACK:
                    wide.append(f"{name} (pid {process.pid}) on {connection.laddr.ip}:{connection.laddr.port}")
    return seen, wide


def _server_port(log: Path) -> int | None:
    found = re.search(r"MLflow tracking server: http://127\.0\.0\.1:(\d+)", log.read_text())
    return int(found.group(1)) if found else None


@SIGNALS
def test_ui_stops_its_mlflow_server(stopping, tmp_path):
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        # Started as a shell starts a background command: SIGINT ignored (inherited), which Python
        # then leaves ignored; `kill -INT` must still stop it.
        ui = subprocess.Popen(
            [MODE_CL, "ui", "--work-dir", str(tmp_path / "work"), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_from_a_terminal(ignore_sigint=True),
        )  # fmt: skip
    try:
        assert wait_until(lambda: _answers(port) or ui.poll() is not None, 120), log.read_text()
        assert _answers(port), log.read_text()
        _stop(ui, stopping, log)
        assert wait_until(lambda: not _answers(port) and not _processes_on(port), 30), _processes_on(port)
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)


def test_ui_killed_outright_leaves_no_mlflow_server(tmp_path):
    """SIGKILL runs no cleanup at all: the server still goes, because it is started to receive
    SIGTERM when its parent dies (PR_SET_PDEATHSIG)."""
    port = free_port()
    ui = subprocess.Popen(
        [MODE_CL, "ui", "--work-dir", str(tmp_path / "work"), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        assert wait_until(lambda: _answers(port) or ui.poll() is not None, 120)
        assert _answers(port)
        ui.kill()
        assert ui.wait(timeout=30) == -signal.SIGKILL
        assert wait_until(lambda: not _answers(port) and not _processes_on(port), 30), _processes_on(port)
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)


def _mlflow_servers_on(port: int) -> list[str]:
    """The ``mlflow server`` process (and its uvicorn child) of ``port``, not the mode-cl command."""
    return [line for line in _processes_on(port) if "mlflow" in line and "mode-cl" not in line]


@SIGNALS
@pytest.mark.parametrize("command", ["ui", "tracking-server start"])
def test_stopped_while_its_mlflow_server_starts(command, stopping, tmp_path):
    """The signal comes while the server it started is still booting (not answering yet): the
    command stops it, and `tracking-server start` records no server (no pid or URI file)."""
    port = free_port()
    log, store = tmp_path / "command.log", tmp_path / "store"
    where = ["--work-dir", str(tmp_path / "work")] if command == "ui" else ["--store", str(store)]
    argv = [MODE_CL, *command.split(), *where, "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_from_a_terminal()
        )
    try:
        assert wait_until(lambda: _mlflow_servers_on(port) or process.poll() is not None, 60, 0.05), log.read_text()
        assert not _answers(port), "the server answered already: this test stops it earlier"
        _stop(process, stopping, log)
        assert wait_until(lambda: not _answers(port) and not _mlflow_servers_on(port), 30), _processes_on(port)
        assert not (store / "server.pid").exists() and not (store / "tracking_uri").exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for line in _mlflow_servers_on(port):
            os.kill(int(line.split()[0]), signal.SIGKILL)


@SIGNALS
def test_tracking_server_relay_stops_listening(stopping, tmp_path):
    """`tracking-server relay` (what `ui --cluster` tunnels to) stops on each signal: exit 128 +
    signal, one line, its port closed. SIGINT used to be swallowed by asyncio (exit 0, no line)."""
    store, port, log = tmp_path / "store", free_port(), tmp_path / "relay.log"
    store.mkdir()
    (store / "tracking_uri").write_text(f"http://127.0.0.1:{free_port()}")  # nothing needs to listen there
    with log.open("w") as out:
        relay = subprocess.Popen(
            [MODE_CL, "tracking-server", "relay", "--store", str(store), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_from_a_terminal(ignore_sigint=True),
        )  # fmt: skip
    try:
        assert wait_until(lambda: _answers(port) or relay.poll() is not None, 60, 0.1), log.read_text()
        assert _answers(port), log.read_text()
        _stop(relay, stopping, log)
        assert not _answers(port)
    finally:
        if relay.poll() is None:
            os.killpg(relay.pid, signal.SIGKILL)


@pytest.mark.parametrize("start", ["start_server", "serve_forever", "start_detached", "tracking_server"])
def test_a_stop_during_popen_still_stops_the_server(start, tmp_path, monkeypatch):
    """A SIGTERM that arrives inside ``subprocess.Popen``, after the fork, is acted on once Popen
    has returned: the server is stopped. (Acted on at once, the KeyboardInterrupt would leave a
    child that no one holds.) In this process, with the CLI's handlers installed."""
    from orchestrator import mlflow_server, stopping

    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen_then_signal(command, **kwargs):  # a stand-in server; the signal lands before Popen returns
        if "mlflow" not in command:  # another Popen (ctypes.util.find_library runs one)
            return real_popen(command, **kwargs)
        started.append(real_popen(["sleep", "60"], start_new_session=True))
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecode boundaries: where Python runs a signal handler not held back
            pass
        return started[-1]

    monkeypatch.setattr(mlflow_server.subprocess, "Popen", popen_then_signal)
    store, port = tmp_path / "store", free_port()
    calls = {
        "start_server": lambda: mlflow_server.start_server(store),
        "serve_forever": lambda: mlflow_server.serve_forever(store, port),
        "start_detached": lambda: mlflow_server.start_detached(store, "127.0.0.1", port),
        "tracking_server": lambda: mlflow_server.tracking_server(store, log=lambda _: None).__enter__(),
    }
    previous = stopping.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            calls[start]()
        assert stopping.received() == signal.SIGTERM
    finally:
        stopping.restore(previous)
        leftover = [process for process in started if process.poll() is None]
        for process in leftover:
            process.kill()
            process.wait()
    assert len(started) == 1 and not leftover, "the server started during the signal was left running"


def _servers_of(store: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(store.resolve()) in " ".join(process.info["cmdline"] or []):
                found.append(process)
    return found


def test_a_server_booted_early_is_taken_over_or_stopped(tmp_path, monkeypatch):
    """``server_booting`` starts the server only on a store that exists; a ``tracking_server`` on
    that store inside the block takes it over (one server, its URI); one not taken over is stopped."""
    from orchestrator import mlflow_server

    started, stopped = [], []

    def fake_start(store):
        started.append(mlflow_server.ServerProcess(object(), f"http://127.0.0.1:{len(started) + 1}"))
        return started[-1]

    monkeypatch.setattr(mlflow_server, "start_server", fake_start)
    monkeypatch.setattr(mlflow_server, "stop_server", stopped.append)
    monkeypatch.setattr(mlflow_server, "_wait_healthy", lambda *args: None)
    store = tmp_path / "mlflow"
    with mlflow_server.server_booting(store):  # no store yet: nothing starts early, nothing is created
        assert not started and not store.exists()
    store.mkdir()
    (store / "mlflow.db").touch()
    with mlflow_server.server_booting(store):
        assert len(started) == 1
        with mlflow_server.tracking_server(store, log=lambda _: None) as uri:
            assert uri == started[0].url and len(started) == 1
        assert stopped == [started[0].process]
    assert stopped == [started[0].process]  # stopped once, by the block that ran it
    with pytest.raises(RuntimeError), mlflow_server.server_booting(store):
        raise RuntimeError("the input was refused")
    assert len(started) == 2 and stopped[-1] is started[1].process
    with mlflow_server.tracking_server(store, log=lambda _: None) as uri:  # outside any block: its own
        assert uri == started[2].url


@pytest.mark.parametrize(
    ("argv", "expected"), [(["resume", "never-ran"], "no sweep at"), (["sweep", "no-such-space.yaml"], "not found")]
)
def test_a_refused_sweep_command_leaves_no_server_running(argv, expected, tmp_path, capsys, monkeypatch):
    """`mode-cl resume` of a sweep that is not there, or `mode-cl sweep` of a missing space file,
    with a tracking store from earlier sweeps: the server booted while the input was checked is
    stopped, and the command fails with its one line, exit 2."""
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "work" / "mlflow"
    store.mkdir(parents=True)
    (store / "mlflow.db").touch()
    code = main([*argv, "--work-dir", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert wait_until(lambda: not _servers_of(store), 30), [p.info["cmdline"] for p in _servers_of(store)]
    assert (store / "server.log").exists(), "no server was started early: this test checks nothing"


def _start_train_and_stop(
    argv: list[str], stopping: signal.Signals, log: Path, env: dict, temp_dir: Path, expect_server: bool
) -> None:
    with log.open("w") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env, preexec_fn=_from_a_terminal()
        )
    try:
        # Stop it while it trains: Ray is up (and for sweeps, the MLflow server answers).
        training = lambda: "[mode-cl worker]" in log.read_text()  # noqa: E731
        assert wait_until(lambda: training() or process.poll() is not None, 400), log.read_text()[-3000:]
        assert training(), log.read_text()[-3000:]
        port = _server_port(log)
        assert (port is not None) == expect_server, log.read_text()[-3000:]
        assert ray_processes(temp_dir)
        seen, wide = _wide_listeners(process.pid, temp_dir)
        assert seen >= 3 and not wide, (seen, wide)  # at least GCS, raylet and a worker listen
        _stop(process, stopping, log)
        assert wait_until(lambda: not ray_processes(temp_dir), 60), ray_processes(temp_dir)
        if port is not None:
            assert wait_until(lambda: not _answers(port) and not _processes_on(port), 30), _processes_on(port)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_sweep_resume_and_run_stop_ray_and_mlflow(tmp_path):
    """SIGTERM to `mode-cl sweep` while its trials train, SIGINT to the `mode-cl resume` of that
    sweep, SIGHUP to a Ray Train `mode-cl run`: each stops its local Ray and its MLflow server."""
    # Ten times the micro sequence's steps: the commands are stopped long before it could end.
    (tmp_path / "micro.yaml").write_text(MICRO_RUN.replace("epochs: 1, batch_size", "epochs: 10, batch_size"))
    space = tmp_path / "stopped.yaml"
    space.write_text("name: stopped\nrun_config: micro.yaml\ngrid:\n  method.kd_weight: [0.0, 0.3]\n")
    temp_dir = ray_temp_dir()
    env = {**os.environ, "RAY_TMPDIR": str(temp_dir)}
    env.pop("RAY_ADDRESS", None)
    common = ["--work-dir", str(tmp_path / "work")]
    commands = {
        # --verbose: the workers' own lines, which tell the test that training started, reach the log.
        "sweep": (
            [MODE_CL, "sweep", str(space), *common, "--storage", str(tmp_path / "sweeps"), "--verbose"],
            signal.SIGTERM,
        ),
        "resume": (
            [MODE_CL, "resume", "stopped", *common, "--storage", str(tmp_path / "sweeps"), "--verbose"],
            signal.SIGINT,
        ),
        "run": ([MODE_CL, "run", str(tmp_path / "micro.yaml"), *common, "--name", "stopped-run"], signal.SIGHUP),
    }
    try:
        for name, (argv, stopping) in commands.items():
            _start_train_and_stop(argv, stopping, tmp_path / f"{name}.log", env, temp_dir, expect_server=name != "run")
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, check=False)
