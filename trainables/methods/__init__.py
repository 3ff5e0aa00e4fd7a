"""Continual-learning methods, selectable by name."""

from __future__ import annotations

import difflib
from dataclasses import replace

from trainables.methods.base import Batch, Method, MethodConfig, StreamBatch
from trainables.methods.mode import MoDE, MoDENoKD
from trainables.methods.moelora import MoELoRA
from trainables.methods.seq_lora import SeqLoRA
from trainables.methods.tmoe_only import TMoEOnly
from trainables.vocab import TokenIds

METHODS: dict[str, type[Method]] = {cls.NAME: cls for cls in (SeqLoRA, MoELoRA, MoDE, MoDENoKD, TMoEOnly)}


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


__all__ = ["METHODS", "Batch", "Method", "MethodConfig", "StreamBatch", "build_method"]
