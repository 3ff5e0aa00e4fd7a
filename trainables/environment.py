"""The process environment, read safely while other threads may change it.

``os.environ`` is process state shared by every thread, and some of them change it while we
work: MLflow's telemetry sets and removes variables from its own threads in a Ray Train worker.
Iterating ``os.environ`` — ``items()``, ``copy()``, ``dict(os.environ)``, ``{**os.environ}``,
``for name in os.environ: os.environ[name]`` — lists its names and then reads each value in Python
code, so a variable removed in between raises KeyError. Code that may run while other threads
live reads the environment through :func:`snapshot` (single look-ups such as
``os.environ.get(NAME)`` are atomic and need nothing).
"""

from __future__ import annotations

import os


def snapshot() -> dict[str, str]:
    """A copy of ``os.environ`` taken in one step.

    ``dict.copy`` of the mapping under ``os.environ`` is one C call that runs no Python code (its
    keys and values are bytes or str), so under the GIL — or the dict's own lock on a free-threaded
    build — no other thread can change it midway. Names and values are decoded afterwards, from
    the copy."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if isinstance(data, dict):
        copied = data.copy()
        return {environ.decodekey(name): environ.decodevalue(value) for name, value in copied.items()}
    # Not CPython's os._Environ: list the names, skip any that is gone by the time it is read.
    values = {name: environ.get(name) for name in list(environ)}
    return {name: value for name, value in values.items() if value is not None}
