"""How a ``mode-cl`` command stops on SIGTERM, SIGINT and SIGHUP: the one place their handlers are
installed (by ``orchestrator.cli.main``, once per command, main thread only).

Each of the three signals, sent to the command's process alone (a supervisor, ``timeout``, a
closed terminal, ``kill``), takes Ctrl-C's path: the handler records it and raises
KeyboardInterrupt (or, while Ray Tune or Ray Train has its own SIGINT handler installed, calls that
handler, which stops the trials and ends ``fit``). Every ``finally`` then runs, which stops what
the command started — its MLflow server (:mod:`orchestrator.mlflow_server`) and its local Ray
(``ray.shutdown`` at exit) — and the CLI exits with 128 + the signal number.

Starting a server is the one step a stop must not interrupt: a KeyboardInterrupt raised inside
``subprocess.Popen``, after the fork, would leave a server whose ``Popen`` nobody holds and so
nobody stops. :func:`held` defers a stop that arrives meanwhile to the end of the block.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

stopped_by: list[int] = []  # the stopping signals received during this command, in order
_held = 0  # depth of :func:`held` blocks in the main thread
_deferred: list[int] = []  # stops received inside a held block, acted on when it ends


def _interrupt(frame: FrameType | None) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler not in (signal.default_int_handler, _stop):
        handler(signal.SIGINT, frame)  # Tune's or Train's: it stops the trials, then ``fit`` ends
        return
    raise KeyboardInterrupt


def _stop(signum: int, frame: FrameType | None) -> None:
    """The handler of all three signals: record which one, then take Ctrl-C's path (later, if a
    server is being started)."""
    stopped_by.append(signum)
    if _held:
        _deferred.append(signum)
        return
    _interrupt(frame)


def install() -> dict[int, Any]:
    """Install the handler for SIGTERM, SIGINT and SIGHUP, and forget earlier stops; main thread
    only (elsewhere it does nothing). A SIGHUP ignored on purpose (``nohup``) stays ignored:
    closing the terminal must not stop the command. A SIGINT ignored because a shell started the
    command in the background is handled all the same: ``kill -INT`` stops it. Returns the
    handlers it replaced, for :func:`restore`."""
    stopped_by.clear()
    _deferred.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    numbers = [n for n in STOPPING if not (n == signal.SIGHUP and signal.getsignal(n) == signal.SIG_IGN)]
    return {number: signal.signal(number, _stop) for number in numbers}


def restore(replaced: dict[int, Any]) -> None:
    for number, handler in replaced.items():
        signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def received() -> int | None:
    """The last stopping signal this command received, if any."""
    return stopped_by[-1] if stopped_by else None


@contextmanager
def held() -> Iterator[None]:
    """Within the block a stopping signal is recorded but acted on only when the block ends, so
    that ``process = subprocess.Popen(...)`` inside it either does not start the child or returns
    its ``Popen`` for the caller's ``finally`` to stop. Use it inside that ``try``. Off the main
    thread (where no handler runs) it holds nothing."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _deferred:
            _deferred.clear()
            _interrupt(None)
