"""Config dataclasses whose fields declare their own rules, and the one builder from YAML data.

A field's rule sits next to the field; ``__post_init__`` applies them (and keeps cross-field checks)::

    @dataclass(frozen=True)
    class TrainConfig:
        epochs: int = setting(5, gt=0)
        lr: float = setting(3e-3, gt=0)
        schedule: str = setting("cosine", choices=("cosine", "constant"))

        def __post_init__(self) -> None:
            check_fields(self)

:func:`build` turns a parsed-YAML mapping into such a dataclass: unknown keys get a did-you-mean,
each value is parsed by its annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``, a nested
config dataclass) or by the field's own ``parse``, and every error names the value's dotted path
(``train.lr: must be > 0, got 0``). Float fields must be finite. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from trainables.errors import UserError

T = TypeVar("T")
RULE = "mode_cl.rule"  # the key of a field's Rule in its dataclass metadata

# (value, its dotted path, the mapping it came from) → the parsed value; raises ConfigError.
Parser = Callable[[Any, str, Mapping[str, Any]], Any]


class ConfigError(UserError, ValueError):
    """A bad config value. ``path`` says where it is (a dotted YAML path such as ``train.lr``, a
    file, an option), or is None when no one place is at fault; ``reason`` is the rest of the line."""

    def __init__(self, path: str | None, reason: str) -> None:
        super().__init__(path, reason)  # both in args, so that the error pickles across Ray processes
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known word, else ``""``."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field's value must satisfy beyond its type.

    Args:
        gt / ge: the value must be > ``gt`` / ≥ ``ge``.
        choices: the allowed values, or a callable giving them (for a registry filled after the
            class is defined).
        noun: names the value in the unknown-choice message (``unknown method 'x'``).
        parse: replaces the annotation's parser, for values that no plain type describes.
        shorthand: for a nested config: the field that a plain string sets (``method: seq_lora``).
    """

    gt: float | None = None
    ge: float | None = None
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    noun: str | None = None
    parse: Parser | None = None
    shorthand: str | None = None

    def check(self, path: str, value: Any) -> None:
        if self.gt is not None and value <= self.gt:
            raise ConfigError(path, f"must be > {self.gt}, got {value!r}")
        if self.ge is not None and value < self.ge:
            raise ConfigError(path, f"must be ≥ {self.ge}, got {value!r}")
        if self.choices is not None:
            known = list(self.choices() if callable(self.choices) else self.choices)
            if value not in known:
                hint = did_you_mean(str(value), known)
                if self.noun:
                    raise ConfigError(path, f"unknown {self.noun} {value!r}{hint} (known: {', '.join(known)})")
                raise ConfigError(path, f"must be one of {', '.join(known)}, got {value!r}{hint}")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | Any = dataclasses.MISSING,
    gt: float | None = None,
    ge: float | None = None,
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None,
    noun: str | None = None,
    parse: Parser | None = None,
    shorthand: str | None = None,
) -> Any:
    """A dataclass field with its :class:`Rule` (``factory`` is the field's ``default_factory``)."""
    rule = Rule(gt=gt, ge=ge, choices=choices, noun=noun, parse=parse, shorthand=shorthand)
    return dataclasses.field(default=default, default_factory=factory, metadata={RULE: rule})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without ``| None``, whether None is allowed)."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def field_type(cls: type, dotted: str) -> Any:
    """The annotation (without ``| None``) of a dotted field path of a config class; None if unknown."""
    annotation: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(annotation):
            return None
        hints = _hints(annotation)
        if part not in hints:
            return None
        annotation, _ = _unwrap_optional(hints[part])
    return annotation


def check_fields(config: Any) -> None:
    """Apply each field's rule, and finiteness of float fields, to a constructed config."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if _unwrap_optional(hints[f.name])[0] is float and not math.isfinite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value!r}")
        rule = f.metadata.get(RULE)
        if rule is not None:
            rule.check(f.name, value)


def parse_value(path: str, value: Any, expected: Any) -> Any:
    """``value`` as a plain ``expected`` type (int, float, bool, str); floats may come as strings."""
    if expected is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(path, f"expected an integer, got {value!r}")
    elif expected is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {value!r}")
        value = float(value)
    elif expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
    elif expected is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
    else:
        raise TypeError(f"{path}: no parser for {expected!r}; declare one with setting(parse=...)")
    return value


def _parse_field(cls: type, field: dataclasses.Field, value: Any, path: str, data: Mapping[str, Any]) -> Any:
    rule: Rule | None = field.metadata.get(RULE)
    if rule is not None and rule.parse is not None:
        return rule.parse(value, path, data)
    if rule is not None and rule.noun is not None:  # a registry name: any other value is an unknown name
        rule.check(path, value)
        return value
    expected, optional = _unwrap_optional(_hints(cls)[field.name])
    if value is None and optional:
        return None
    if dataclasses.is_dataclass(expected):
        if rule is not None and rule.shorthand is not None and isinstance(value, str):
            value = {rule.shorthand: value}
        return build(expected, value, path)
    return parse_value(path, value, expected)


def build(cls: type[T], data: Any, prefix: str = "") -> T:
    """``cls`` from a parsed-YAML mapping; raises :class:`ConfigError` naming the bad value's path."""
    where = prefix or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = did_you_mean(str(key), fields) or f" (known: {', '.join(fields)})"
            raise ConfigError(path, f"unknown key{hint}")
        kwargs[key] = _parse_field(cls, fields[key], value, path, data)
    try:
        return cls(**kwargs)
    except ConfigError as error:  # a field rule: name the field by its full path
        if error.path is None:
            raise ConfigError(where, error.reason) from None
        raise ConfigError(f"{prefix}.{error.path}" if prefix else error.path, error.reason) from None
    except ValueError as error:  # a cross-field check of __post_init__
        raise ConfigError(where, str(error)) from None
