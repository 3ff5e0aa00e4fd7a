"""Ray start-up for the drivers: join a cluster or start a local Ray, and the driver resource.

``mode-cl run`` and ``mode-cl sweep``/``resume`` call :func:`init_ray` once, before their first
Ray call; on a ``ray up`` cluster the driver runs on the head and joins with ``--address auto``.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Sweep trial drivers reserve a sliver of this custom resource instead of CPU: a fractional CPU per
# driver leaves e.g. 0.98 of the second core free, so a second 1-CPU Train worker never fits.
# cluster.yaml gives the head node TRAIN_DRIVER, which also keeps drivers off preemptible workers.
DRIVER_RESOURCE = "TRAIN_DRIVER"

# Ray's switch for "this machine may join a multi-node cluster". Off, a local Ray takes loopback as
# its node address and binds every server to it: GCS, raylet, object manager, workers, dashboard
# and runtime-env agents (checked with Ray 2.60 and `ss -ltnp`; with it on, they listen on `*`).
# Ray reads it when it is imported, so it is set before that; a cluster join leaves it alone.
LOOPBACK_ONLY_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# What a local run still listens on beyond loopback: process kind (its name as `ps` shows it) → the
# `resources.num_workers` from which it does. Only torch.distributed's c10d TCPStore on the rank-0
# Train worker is left: torch 2.13 binds it to `::` whatever host it is given, and one-worker runs
# (every default) start no process group. RELIABILITY.md ("Network exposure of a local run") names
# exactly these kinds; tests/test_loopback.py fails on a wide listener of any other process.
WIDE_LISTENERS: dict[str, int] = {"ray::RayTrainWorker": 2}


def prefer_loopback() -> None:
    """Make a local Ray started by this process listen on loopback only. Call it before Ray is
    imported, and only when no cluster address is given (a driver joining a cluster must announce
    its real address; RAY_ADDRESS in the environment names one too). A value the user set wins."""
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(*LOOPBACK_ONLY_ENV)


_OUTPUT = {"verbose": True}  # `mode-cl sweep` and `resume` set it from --verbose before Ray starts


def set_verbose(verbose: bool) -> None:
    """``--verbose``: Ray's, Tune's and the workers' own log lines on this terminal. Otherwise they
    stay in Ray's log files (the session's ``logs`` folder) and a sweep shows its own table."""
    _OUTPUT["verbose"] = verbose
    if not verbose:
        import logging

        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new engine prints its frames even when silent
        logging.getLogger("ray").setLevel(logging.ERROR)  # Ray's and Tune's notices stay in Ray's log files
        # MLflow's own lines ("View run … at", "Waiting up to 300 seconds …"): the sweep prints
        # where to browse its runs (`mode-cl ui`) once, at the end.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def is_verbose() -> bool:
    return _OUTPUT["verbose"]


def logs_dir() -> str | None:
    """Where this process's Ray session writes its log files (None before Ray starts)."""
    try:
        from ray._private import worker

        return worker._global_node.get_logs_dir_path() if worker._global_node is not None else None
    except (ImportError, AttributeError):
        return None


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` or start a local Ray with the dashboard bound to 127.0.0.1 (the dashboard
    process is what frees the placement groups of stopped trials)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        _token_auth_for_explicit_address(address)
        with _sigterm_handler_kept(), _ray_notices_off_the_terminal():
            ray.init(address=address, log_to_driver=is_verbose(), logging_level=_logging_level())
        return
    from ray._private import ray_constants

    # Loopback as the node address, where prefer_loopback() took effect before Ray was imported.
    loopback = {} if ray_constants.ENABLE_RAY_CLUSTER else {"_node_ip_address": "127.0.0.1"}
    with _sigterm_handler_kept(), _ray_notices_off_the_terminal():
        ray.init(
            num_cpus=num_cpus,
            resources={DRIVER_RESOURCE: 1.0},
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=is_verbose(),
            logging_level=_logging_level(),
            **loopback,
        )


DRIVER_LOG = "mode-cl-driver.log"  # in the Ray session's logs folder: Ray's notices to this driver


@contextmanager
def _ray_notices_off_the_terminal() -> Iterator[None]:
    """Around ``ray.init`` without ``--verbose``: what Ray tells this driver goes to ``DRIVER_LOG``
    in the session's logs folder, not to the terminal; errors still reach the terminal.

    Two channels: the ``ray`` logger (Ray's, Tune's and Train's driver-side notices, e.g. the
    token-auth notice printed during ``ray.init``), whose terminal handlers are raised to ERROR and
    whose records are buffered until the logs folder exists; and the messages the raylet pushes to
    drivers (e.g. "8 PYTHON worker processes have been started"), which Ray's listener thread prints
    whatever ``log_to_driver`` says, through ``ray._private.worker.print_to_stdstream`` (looked up on
    each message, checked with Ray 2.60)."""
    if is_verbose():
        yield
        return
    import logging
    import logging.handlers

    ray_logger = logging.getLogger("ray")
    for handler in list(ray_logger.handlers):
        if getattr(handler, "mode_cl_driver_log", False):  # an earlier Ray session's file
            ray_logger.removeHandler(handler)
            handler.close()
    for handler in ray_logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.ERROR))
    buffered = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    ray_logger.addHandler(buffered)
    try:
        yield
    finally:
        ray_logger.removeHandler(buffered)
        folder = logs_dir()
        if folder:
            to_file = logging.FileHandler(Path(folder) / DRIVER_LOG)
            to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            to_file.mode_cl_driver_log = True
            buffered.setTarget(to_file)
            buffered.flush()
            ray_logger.addHandler(to_file)
            _pushed_messages_to(Path(folder) / DRIVER_LOG)
        buffered.close()


def _pushed_messages_to(path: Path) -> None:
    """Send what the raylet pushes to this driver to ``path`` instead of stdout/stderr."""
    try:
        from ray._private import worker
    except ImportError:
        return
    if not hasattr(worker, "print_to_stdstream"):
        return

    def append(data: dict, ignore_prefix: bool = False) -> None:
        with path.open("a") as log:
            for line in data.get("lines", []):
                log.write(f"({data.get('pid', 'ray')}) {line}\n")

    worker.print_to_stdstream = append


def _logging_level() -> int:
    import logging

    return logging.INFO if is_verbose() else logging.WARNING


@contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """``ray.init`` replaces this process's SIGTERM handler twice: in Python (``sys.exit(15)``) and
    in its core worker (a fatal-signal handler that prints a stack trace and aborts, skipping every
    ``finally``). Put back the handler from before (the CLI's: see
    ``orchestrator.stopping``), so SIGTERM stops the command cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def _token_auth_for_explicit_address(address: str) -> None:
    """Ray sends its auth token only when it finds the cluster itself (``auto``); given an explicit
    ``HOST:PORT`` it connects without one unless RAY_AUTH_MODE=token, and a token-protected cluster
    (Ray's default) then answers "Authentication token is missing" for 20 s. With a token available
    (``~/.ray/auth_token``, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) we present it, as ``auto`` would."""
    if address == "auto" or "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray caches its config at import: refresh it, as Ray's own `auto` path does
            from ray._private.authentication.authentication_token_setup import _enable_token_auth
        except ImportError:
            return
        _enable_token_auth()
