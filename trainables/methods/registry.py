"""The table of continual-learning methods by name, filled by :func:`register_method`."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from trainables.methods.base import Method

METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound="type[Method]")


def register_method(cls: M) -> M:
    """Class decorator: make ``cls`` selectable as ``method: <cls.NAME>`` in configs, sweeps and
    ``mode-cl methods``. A method defined outside ``trainables/methods/`` (a test, a plug-in) is
    registered by importing its module before the config is built."""
    existing = METHODS.get(cls.NAME)
    if existing is not None and existing is not cls:
        raise ValueError(f"method name {cls.NAME!r} is taken by {existing.__module__}.{existing.__qualname__}")
    METHODS[cls.NAME] = cls
    return cls
