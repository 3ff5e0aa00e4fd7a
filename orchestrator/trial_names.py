"""Readable trial names: the swept values, e.g. ``mode r8 λ0.3 order-B s1``.

Tune names trials after the trainable (``train_driver_fn_f10d4_00003``), which says nothing in the
terminal, in the trial table or in MLflow, where the trial's run takes the same name. A name is
built from the trial's overrides (and sampled values) in the order the space lists them, with
short forms for the keys people sweep most; task orders are lettered in the order the space lists
them. Names are unique within a sweep: when the swept values alone could repeat (samples of a
distribution, ``num_samples`` > 1), the trial's index follows (``#3``). Directory names are the
ASCII form of the same name plus the trial id.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

SHORT = {"method.r": "r", "method.kd_weight": "λ", "method.num_experts": "E", "train.lr": "lr", "seed": "s"}
ASCII = {"λ": "kd"}


def _value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class TrialNamer:
    """``trial_name_creator`` and ``trial_dirname_creator`` for one sweep (plain data, so that
    Tune can pickle it with the sweep's state and a resumed sweep names trials the same way)."""

    orders: tuple[tuple[str, ...], ...]  # the task orders the space lists, lettered A, B, …
    with_index: bool  # swept values alone may repeat: add the trial's index

    @classmethod
    def for_trials(cls, trials: list[dict[str, Any]], num_samples: int, sampled: bool) -> TrialNamer:
        orders = tuple(dict.fromkeys(tuple(t["tasks"]) for t in trials if "tasks" in t))
        namer = cls(orders, with_index=True)
        labels = [namer.label(t, {}) for t in trials]
        return cls(orders, with_index=sampled or num_samples > 1 or len(set(labels)) < len(labels))

    def label(self, overrides: dict[str, Any], sampled: dict[str, Any]) -> str:
        parts = []
        for key, value in {**overrides, **sampled}.items():
            if key == "method.name":
                parts.append(str(value))
            elif key == "tasks":
                position = self.orders.index(tuple(value)) if tuple(value) in self.orders else None
                letter = string.ascii_uppercase[position] if position is not None and position < 26 else None
                parts.append(f"order-{letter}" if letter else f"from-{value[0]}")
            elif key in SHORT:
                parts.append(f"{SHORT[key]}{_value(value)}")
            else:
                parts.append(f"{key.rsplit('.', 1)[-1]}={_value(value)}")
        return " ".join(parts) or "base"

    def __call__(self, trial: Any) -> str:
        """The trial's name (Tune's ``trial_name_creator``)."""
        name = self.label(trial.config.get("trial", {}), trial.config.get("sampled", {}))
        return f"{name} #{int(trial.trial_id.rsplit('_', 1)[-1])}" if self.with_index else name

    def dirname(self, trial: Any) -> str:
        """The trial's directory name (Tune's ``trial_dirname_creator``): ASCII, with the trial id."""
        name = self.label(trial.config.get("trial", {}), trial.config.get("sampled", {}))
        for symbol, word in ASCII.items():
            name = name.replace(symbol, word)
        return f"{re.sub(r'[^A-Za-z0-9.=-]+', '_', name)[:80]}_{trial.trial_id}"
