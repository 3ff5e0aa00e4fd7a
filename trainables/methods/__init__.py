"""Continual-learning methods, selectable by name.

Every module in this package is imported here, so a method is one file: a :class:`Method`
subclass decorated with :func:`register_method`. See docs/ADDING_A_METHOD.md.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import replace

from trainables.batching import Batch, StreamBatch
from trainables.methods.base import Method, MethodConfig
from trainables.methods.registry import METHODS, register_method
from trainables.vocab import TokenIds

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_method(config: MethodConfig | str, token_ids: TokenIds, **overrides) -> Method:
    """The method named by ``config.name`` (or by ``config`` itself when it is a string)."""
    config = MethodConfig(name=config) if isinstance(config, str) else config
    if overrides:
        config = replace(config, **overrides)
    if config.name not in METHODS:
        close = difflib.get_close_matches(config.name, list(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {config.name!r}{hint} (known: {', '.join(METHODS)})")
    return METHODS[config.name](config, token_ids)


__all__ = ["METHODS", "Batch", "Method", "MethodConfig", "StreamBatch", "build_method", "register_method"]
