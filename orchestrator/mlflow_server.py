"""The embedded MLflow tracking server: SQLite backend and artifact store inside the work dir,
bound to 127.0.0.1, reached over HTTP by every process (so SQLite has exactly one writer)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from orchestrator.stopping import held
from trainables.environment import snapshot


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux) that makes the child receive SIGTERM when the process that started
    it dies, however it dies: a driver SIGKILLed, or ended by a crashing Ray core worker, leaves no
    server behind (``mlflow server`` passes SIGTERM on to its uvicorn child). Everything it calls is
    resolved here, before the fork."""
    prctl = _libc_prctl()
    if prctl is None:
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


def stop_server(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """Stop a server we started in its own session: SIGTERM (``mlflow server`` forwards it to its
    uvicorn child and waits for it), then SIGKILL for whatever of its process group is left."""
    try:
        if process.poll() is None:
            process.terminate()
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout_s)
    finally:  # also when a second Ctrl-C interrupts the wait: the server is in its own session
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # a child that outlived its parent
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float, store: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the MLflow server did not start on {url}; see {store / 'server.log'}")
        time.sleep(0.3)


# MLflow 3's server also starts a job runner and two huey consumers (for GenAI jobs we never
# submit): three more processes importing mlflow, which on a 2-core machine slowed the server's
# start from 4.0 s to 5.5 s and competed with Ray for the CPU. A user's own setting wins.
SERVER_ENV_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_env() -> dict[str, str]:
    """The environment every ``mlflow server`` we start runs with (read atomically: a sweep starts
    its server while other threads of the driver live)."""
    return {**SERVER_ENV_DEFAULTS, **snapshot()}


def server_command(
    store: Path,
    port: int,
    host: str = "127.0.0.1",
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
) -> list[str]:
    """``mlflow server`` with our defaults: SQLite + artifacts under ``store`` (artifacts proxied
    through the server, so trial workers on other nodes need no storage credentials), one worker
    (one SQLite writer), and the host allow-list set to the addresses it is reached by."""
    store = store.resolve()
    # Loopback on any port: the UI is reached through SSH forwards and relays on other ports.
    allowed = [f"{host}:{port}", "127.0.0.1:*", "localhost:*"]
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination or str(store / "artifacts"),
        "--host", host, "--port", str(port),
        "--allowed-hosts", ",".join(dict.fromkeys(allowed)),
        "--workers", "1",
    ]  # fmt: skip


def private_ip() -> str:
    """This node's address on its private network (the interface the default route uses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))  # UDP: no packet is sent
            return sock.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def start_detached(
    store: Path,
    host: str,
    port: int,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    timeout_s: float = 120.0,
) -> str:
    """Start a server that outlives this process (the cluster head's tracking server).

    Writes ``server.pid`` and ``tracking_uri`` into ``store``; a server already running from the
    same store is reused. Returns the tracking URI."""
    store = Path(store).expanduser()
    store.mkdir(parents=True, exist_ok=True)
    host = private_ip() if host == "auto" else host
    url = f"http://{host}:{port}"
    pid_file, uri_file = store / "server.pid", store / "tracking_uri"
    if pid_file.is_file() and uri_file.is_file() and _healthy(uri_file.read_text().strip()):
        return uri_file.read_text().strip()
    command = server_command(store, port, host, backend_store_uri, artifacts_destination)
    process = None
    try:
        with (store / "server.log").open("ab") as server_log, held():  # a stop: after Popen returns
            process = subprocess.Popen(
                command,
                stdout=server_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=server_env(),
            )
        _wait_healthy(url, process, timeout_s, store)
    except BaseException:  # it never answered, or this command was stopped while it started
        if process is not None:
            stop_server(process)
        raise
    pid_file.write_text(str(process.pid))
    uri_file.write_text(url)
    return url


def stop_detached(store: Path, timeout_s: float = 20.0) -> bool:
    """Stop the server started by :func:`start_detached` from ``store``; False if none was running."""
    store = Path(store).expanduser()
    pid_file = store / "server.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)  # the server's gunicorn/uvicorn workers are in its session
    except ProcessLookupError:
        pid_file.unlink()
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(pid, signal.SIGKILL)
    pid_file.unlink()
    (store / "tracking_uri").unlink(missing_ok=True)
    return True


@dataclass
class ServerProcess:
    """An embedded server we started: its process (in a session of its own) and its URI."""

    process: subprocess.Popen
    url: str


def start_server(store: Path) -> ServerProcess:
    """Start the embedded server on ``store`` (created if missing) and return without waiting for
    it. The caller stops it with :func:`stop_server`, also when this call is interrupted: a stop
    that arrives while the child is being started stops it again before this call raises."""
    store.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    process = None
    try:
        with (store / "server.log").open("ab") as server_log, held():
            # Its own session: a terminal's Ctrl-C reaches only us, and we stop it (with its children).
            process = subprocess.Popen(
                server_command(store, port),
                stdout=server_log,
                stderr=subprocess.STDOUT,
                env=server_env(),
                start_new_session=True,
                preexec_fn=_dies_with_parent(),
            )
    except BaseException:  # a stop held during Popen: the child started, and goes again
        if process is not None:
            stop_server(process)
        raise
    return ServerProcess(process, f"http://127.0.0.1:{port}")


# Servers started by :func:`server_booting` and not yet taken over by :func:`tracking_server`.
_BOOTING: dict[Path, ServerProcess] = {}


@contextmanager
def server_booting(store: Path) -> Iterator[None]:
    """Start the embedded server on ``store`` now, if ``store`` already holds a tracking database,
    so that it boots while the command imports and checks its input (``mode-cl resume`` and
    ``sweep``): a :func:`tracking_server` on the same store inside the block takes it over. One not
    taken over by the end of the block (the input was refused) is stopped. The server's boot is
    about 7 s of CPU on this project's 2-core machine, which otherwise competes with Ray's start.
    A store that does not exist yet is not created: refused input adds at most the server's own
    log lines to an existing store."""
    key = store.resolve()
    if key in _BOOTING or not (store / "mlflow.db").is_file():
        yield
        return
    server = None
    try:
        server = _BOOTING[key] = start_server(store)
        yield
    finally:
        if server is not None and _BOOTING.pop(key, None) is server:
            stop_server(server.process)


@contextmanager
def tracking_server(
    store: Path,
    log=print,
    timeout_s: float = 120.0,
    while_starting: Callable[[str], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> Iterator[str]:
    """Start the embedded server for the duration of the block (or take over the one
    :func:`server_booting` started on ``store``); yields its URI.

    ``while_starting(uri)`` runs while the server boots (e.g. starting Ray and restoring Tune's
    experiment state); it must not call the server. With ``on_ready``, the block does not wait for
    the server either: a watcher thread calls ``on_ready(uri)`` once it answers, or, if it never
    does, logs why and interrupts this process (SIGINT: a sweep stops as after Ctrl-C, resumable).
    ``on_ready`` must not import anything (do the imports before): the main thread is importing
    at the same time, and concurrent imports of large packages can leave them half-initialised.
    ``mode-cl resume`` uses this to let Tune start its trials during the server's last seconds of
    booting — a trial's first call to the server comes ~10 s later, and the MLflow client retries."""
    server = None
    try:
        server = _BOOTING.pop(store.resolve(), None) or start_server(store)
        process, url = server.process, server.url
        if while_starting is not None:
            while_starting(url)
        if on_ready is None:
            _wait_healthy(url, process, timeout_s, store)
            log(f"MLflow tracking server: {url} (store {store})")
        else:

            def watch() -> None:
                try:
                    _wait_healthy(url, process, timeout_s, store)
                except RuntimeError as error:  # reported, then the main thread is stopped
                    log(f"[red]{error}; stopping")
                    os.kill(os.getpid(), signal.SIGINT)
                    return
                log(f"MLflow tracking server: {url} (store {store})")
                on_ready(url)

            threading.Thread(target=watch, name="mlflow-ready", daemon=True).start()
        yield url
    finally:
        if server is not None:
            stop_server(server.process)


def resolve_tracking_uri(explicit: str | None) -> str | None:
    """An explicitly configured tracking server (flag or MLFLOW_TRACKING_URI), else None."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or None


def serve_forever(store: Path, port: int) -> int:
    """``mode-cl ui``: run the server in the foreground until interrupted."""
    store.mkdir(parents=True, exist_ok=True)
    # workflowType: MLflow 3.x opens in its GenAI view unless the link asks for the model-training one
    url = f"http://127.0.0.1:{port}/#/?workflowType=machine_learning"
    print(f"MLflow UI: {url}  (store {store.resolve()}; Ctrl-C to stop)", flush=True)
    process = None
    try:
        with held():  # a stop that comes while the server is being started: acted on after Popen returns
            process = subprocess.Popen(
                server_command(store, port), env=server_env(), start_new_session=True, preexec_fn=_dies_with_parent()
            )
        return process.wait()
    finally:  # SIGTERM, SIGINT or SIGHUP (a KeyboardInterrupt: orchestrator/stopping.py): the server goes too
        if process is not None:
            stop_server(process)


def relay(store: Path, port: int) -> int:
    """Serve ``127.0.0.1:port`` as a TCP relay to the tracking server started from ``store``
    (``mode-cl ui --cluster`` tunnels to this over SSH). Runs until SIGTERM, SIGINT or SIGHUP
    (orchestrator/stopping.py raises KeyboardInterrupt in the event loop; the listener closes)."""
    import asyncio
    from urllib.parse import urlparse

    uri_file = Path(store).expanduser() / "tracking_uri"
    if not uri_file.is_file():
        print(f"no tracking server was started from {uri_file.parent} on this node", file=sys.stderr)
        return 2
    target = urlparse(uri_file.read_text().strip())
    if target.hostname in ("127.0.0.1", "localhost") and target.port == port:
        print(f"the tracking server itself listens on 127.0.0.1:{port}; pick another --port", file=sys.stderr)
        return 2

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        print(f"relaying 127.0.0.1:{port} → {target.hostname}:{target.port}", flush=True)
        async with server:
            await server.serve_forever()

    with suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0
