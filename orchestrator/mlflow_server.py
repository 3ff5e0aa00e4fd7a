"""The embedded MLflow tracking server: SQLite backend and artifact store inside the work dir,
bound to 127.0.0.1, reached over HTTP by every process (so SQLite has exactly one writer)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


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


def server_command(store: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    store = store.resolve()
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(store / "artifacts"),
        "--host", host, "--port", str(port),
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
        "--workers", "1",
    ]  # fmt: skip


@contextmanager
def tracking_server(
    store: Path, log=print, timeout_s: float = 120.0, while_starting: Callable[[], None] | None = None
) -> Iterator[str]:
    """Start the embedded server for the duration of the block; yields its URI.

    ``while_starting`` runs while the server boots (e.g. starting Ray: both take seconds, and
    doing them side by side is most of what makes ``mode-cl resume`` reach training quickly)."""
    store.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with (store / "server.log").open("ab") as server_log:
        process = subprocess.Popen(server_command(store, port), stdout=server_log, stderr=subprocess.STDOUT)
    try:
        if while_starting is not None:
            while_starting()
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the MLflow server did not start; see {store / 'server.log'}")
            time.sleep(0.3)
        log(f"MLflow tracking server: {url} (store {store})")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def resolve_tracking_uri(explicit: str | None) -> str | None:
    """An explicitly configured tracking server (flag or MLFLOW_TRACKING_URI), else None."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or None


def serve_forever(store: Path, port: int) -> int:
    """``mode-cl ui``: run the server in the foreground until interrupted."""
    store.mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI: http://127.0.0.1:{port}  (store {store.resolve()}; Ctrl-C to stop)", flush=True)
    return subprocess.call(server_command(store, port))
