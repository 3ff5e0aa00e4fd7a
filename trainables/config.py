"""Run configuration: one YAML file plus dotted-path overrides → nested dataclasses, built once.

:func:`load_run_config_dict` is the one way a :class:`RunConfig` is made, for ``mode-cl run --set``
(through :func:`load_run_config`), sweep trials and Ray workers alike: the overrides are applied to
the data, then :func:`trainables.config_rules.build` parses and checks every field by the rule
declared next to it. Errors name the YAML path of the bad field (``train.lr``) and the fix, with a
did-you-mean for unknown keys.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from trainables.adapter_budget import ModelShape, TrainingShape, check_adapter_fits
from trainables.benchmarks.coin.config import T2I_FIELDS, CoinConfig
from trainables.benchmarks.digits.config import (
    IMAGE_SPAN_TOKENS,
    MAX_SEQUENCE_TOKENS,
    BaseModelConfig,
    DigitsConfig,
)
from trainables.benchmarks.digits.data import continual_tasks, vocabulary
from trainables.config_rules import (
    RULE,
    ConfigError,
    Rule,
    build,
    check_fields,
    did_you_mean,
    field_type,
    setting,
)
from trainables.methods import MethodConfig


@dataclass(frozen=True)
class TrainConfig:
    """Per-task training budget. A fresh AdamW and warmup-cosine schedule per task (as the paper)."""

    epochs: int = setting(6, gt=0)
    batch_size: int = setting(16, gt=0)
    lr: float = setting(3e-3, gt=0)
    warmup_ratio: float = 0.1  # in [0, 1): checked by RunConfig
    # 1.0 as search_spaces/digits.yaml: at lr 3e-3 a clip of 10 let single-LoRA methods collapse to
    # constant answers after their first task (benchmarks/RESULTS.md, 2026-12-04); CoIN sets the paper's 10
    grad_clip: float = setting(1.0, gt=0)
    weight_decay: float = setting(0.0, ge=0)

    def __post_init__(self) -> None:
        check_fields(self)


# Settings of the replay, lwf, olora and cl_moe baselines: left out of a config's dict (and hash)
# while at their defaults, so runs and sweeps configured without them resume across versions.
BASELINE_FIELDS = tuple(
    f.name for f in fields(MethodConfig) if f.name.startswith(("replay_", "lwf_", "olora_", "clmoe_"))
)
EVAL_TASKS = ("all", "learned_and_next")
EVAL_GENERATION = ("every_stage", "base_and_final")


@dataclass(frozen=True)
class EvalConfig:
    """What is evaluated after each task.

    Args:
        gen_samples_per_digit / gen_temperature: the digits benchmark's image-generation samples.
        tasks: ``all`` evaluates every task at every stage (the full accuracy matrix);
            ``learned_and_next`` evaluates, after task i, only tasks 1..i+1 (the base stage still
            evaluates all). Average accuracy, forgetting, BWT and FWT need no other cell, so they
            are unchanged; the skipped cells are NaN. Saves about half the answer evaluation on
            long sequences.
        generation: ``every_stage`` scores image generation after every task; ``base_and_final``
            only at the base and final stages (inter-modal forgetting compares exactly these two;
            intermediate scores are NaN). The big saving at real scale, where one stage samples
            101 × 1,024 image tokens.
    """

    gen_samples_per_digit: int = setting(10, gt=0)
    gen_temperature: float = setting(0.7, ge=0)
    tasks: str = setting("all", choices=EVAL_TASKS)
    generation: str = setting("every_stage", choices=EVAL_GENERATION)

    def __post_init__(self) -> None:
        check_fields(self)

    def stage_plan(self, stage: int, num_tasks: int) -> tuple[list[int], bool]:
        """(indices of the tasks to evaluate, whether to score generation) at ``stage`` (0 = base)."""
        tasks = list(range(num_tasks)) if stage == 0 or self.tasks == "all" else list(range(min(stage + 1, num_tasks)))
        generation = self.generation == "every_stage" or stage in (0, num_tasks)
        return tasks, generation


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-trial compute. ``cpus_per_worker`` is also torch's thread count on CPU (results on CPU
    depend on it at the last bit, so both run paths use it)."""

    num_workers: int = setting(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = setting(2, gt=0)
    gpus_per_worker: float = setting(1.0, gt=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker < 1:
            # Ray would pack the workers onto one GPU and NCCL fails with "Duplicate GPU detected".
            raise ValueError("fractional gpus_per_worker is only safe with num_workers 1; use 1 GPU per worker")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = setting(0, ge=0)  # also checkpoint every N optimizer steps inside a task (0 = at task ends only)
    num_to_keep: int = setting(2, ge=0)  # 0 keeps all; keep ≥ 2 so a corrupt newest checkpoint can fall back
    max_failures: int = setting(3, ge=0)  # Ray Train restarts of a failed worker group, each from the latest checkpoint

    def __post_init__(self) -> None:
        check_fields(self)


def _tasks(value: Any, path: str, data: Mapping[str, Any]) -> tuple[str, ...]:
    coin = data.get("coin") is not None
    known = continual_tasks()
    if not isinstance(value, list) or not value:
        raise ConfigError(
            path, f"expected a non-empty list of task names from {'the imported CoIN tasks' if coin else known}"
        )
    for index, task in enumerate(value):
        if coin:  # CoIN task names are checked against the imported data when the run starts
            if not isinstance(task, str) or not task:
                raise ConfigError(f"{path}[{index}]", f"expected a task name string, got {task!r}")
            continue
        if task not in known:
            hint = did_you_mean(str(task), known)
            raise ConfigError(f"{path}[{index}]", f"unknown task {task!r}{hint} (known: {', '.join(known)})")
    duplicates = sorted({t for t in value if value.count(t) > 1})
    if duplicates:
        raise ConfigError(path, f"task(s) {duplicates} appear more than once; each task is learned once")
    return tuple(value)


@dataclass(frozen=True)
class RunConfig:
    tasks: tuple[str, ...] = setting(("parity", "prime", "bigsmall", "square", "fibonacci"), parse=_tasks)
    seed: int = setting(0, ge=0)
    # `method: seq_lora` is short for `method: {name: seq_lora}`
    method: MethodConfig = field(default_factory=MethodConfig, metadata={RULE: Rule(shorthand="name")})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DigitsConfig = field(default_factory=DigitsConfig)
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    coin: CoinConfig | None = None  # set: the CoIN benchmark on a Chameleon checkpoint (see CoinConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        # The digits data and base model follow the run's seed unless their own is set.
        if self.data.seed is None:
            object.__setattr__(self, "data", replace(self.data, seed=self.seed))
        if self.base.seed is None:
            object.__setattr__(self, "base", replace(self.base, seed=self.seed))
        if self.base.hidden_size % self.base.num_attention_heads:
            raise ValueError("base.hidden_size must be a multiple of base.num_attention_heads")
        if not 0.0 <= self.train.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.train.warmup_ratio}")
        if not 0 < self.data.test_images < 1797 - 100:
            raise ValueError("data.test_images must leave at least 100 of the 1,797 digits for training")
        if self.coin is None:  # the tiny model's shape is in this config; CoIN's is checked when it opens
            check_adapter_fits(self.method, self._digits_training_shape())

    def _digits_training_shape(self) -> TrainingShape:
        """The digits model's shape for the memory estimate (fp32, one worker's share of the batch)."""
        vocab_size = max(vocabulary(self.data).values()) + 1
        return TrainingShape(
            model=ModelShape(
                self.base.hidden_size,
                self.base.intermediate_size,
                self.base.num_hidden_layers,
                vocab_size,
                image_vocab=self.data.levels + 2,  # codebook + begin/end-image
            ),
            dtype_bytes=4,
            micro_batch=-(-self.train.batch_size // self.resources.num_workers),
            seq_len=MAX_SEQUENCE_TOKENS,
            stream_len=IMAGE_SPAN_TOKENS,
            use_gpu=self.resources.use_gpu,
        )

    def to_dict(self) -> dict[str, Any]:
        data = json.loads(json.dumps(asdict(self)))
        if data["coin"] is None:  # digits runs keep the dict (and hash) they had before CoIN existed
            del data["coin"]
        for name, default in (("tasks", "all"), ("generation", "every_stage")):
            if data["eval"][name] == default:  # runs on the default schedule keep their earlier hash
                del data["eval"][name]
        defaults = MethodConfig()
        for name in BASELINE_FIELDS:  # runs that leave these baselines' settings alone keep their earlier hash
            if data["method"][name] == getattr(defaults, name):
                del data["method"][name]
        if "coin" not in data:
            return data
        if data["coin"]["vqgan"] is None:  # CoIN runs without T2I scoring keep their earlier dict (and hash)
            for name in T2I_FIELDS:
                del data["coin"][name]
        return data

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _plain(data: Any, where: str) -> Any:
    """A deep copy of YAML data; refuses values a config cannot hold (e.g. a YAML date)."""
    try:
        return json.loads(json.dumps(data))
    except TypeError as error:
        raise ConfigError(where, f"unsupported value type ({error}); use numbers, strings and lists") from None


def with_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of config ``data`` with each dotted path of ``overrides`` (``method.r``) set, in order."""
    if not isinstance(data, Mapping):
        raise ConfigError("config", f"expected a mapping of settings, got {type(data).__name__}")
    result = _plain(data, "config")
    for key, value in overrides.items():
        node, cls = result, RunConfig
        parts = key.strip().split(".")
        for part in parts[:-1]:
            current = node.get(part)
            rule = _field_rule(cls, part)
            if isinstance(current, str) and rule is not None and rule.shorthand:
                current = {rule.shorthand: current}
            node[part] = current if isinstance(current, dict) else {}
            node, cls = node[part], field_type(cls, part)
        node[parts[-1]] = copy.deepcopy(value)
    return result


def _field_rule(cls: Any, name: str) -> Rule | None:
    fields = getattr(cls, "__dataclass_fields__", {})
    return fields[name].metadata.get(RULE) if name in fields else None


def parse_set_options(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``--set key.sub=value`` options (values parsed as YAML) → dotted-path overrides, in order."""
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}", "expected KEY=VALUE, e.g. --set method=seq_lora")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}", "the value is not valid YAML") from None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # YAML 1.1 reads "3e-3" as a string
                value = float(value)
        overrides.pop(key, None)  # a repeated key applies where it was last given
        overrides[key] = value
    return overrides


def load_run_config_dict(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The RunConfig of config ``data`` (parsed YAML, or ``RunConfig.to_dict()`` output) with the
    dotted-path ``overrides`` applied first."""
    return build(RunConfig, with_overrides(data, overrides or {}), "")


MAX_CONFIG_BYTES = 1 << 20  # a run config or space file is a few KiB; a larger one is refused unread
MAX_CONFIG_VALUES = 100_000  # values a file may expand to (YAML aliases can multiply a small file)


def _expanded_size(data: Any, seen: dict[int, int], limit: int) -> int:
    """How many values ``data`` holds once its YAML aliases are expanded (what ``json.dumps`` would
    write), counted with each shared list/mapping once; stops counting above ``limit``."""
    if not isinstance(data, list | dict):
        return 1
    if id(data) in seen:
        return seen[id(data)]
    total = 1
    for item in data.values() if isinstance(data, dict) else data:
        total += _expanded_size(item, seen, limit)
        if total > limit:
            break
    seen[id(data)] = total
    return total


def _parse_yaml(text: str, where: str) -> Any:
    """YAML ``text`` parsed, refused in one line if it is not YAML or expands (through aliases) to
    more than ``MAX_CONFIG_VALUES`` values."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(None, f"{where}:{line} is not valid YAML ({getattr(error, 'problem', error)})") from None
    except RecursionError:
        raise ConfigError(where, "nested too deeply to be a config") from None
    try:
        size = _expanded_size(data, {}, MAX_CONFIG_VALUES)
    except RecursionError:  # an alias inside itself, or absurd nesting
        raise ConfigError(where, "nested too deeply to be a config") from None
    if size > MAX_CONFIG_VALUES:
        raise ConfigError(
            where, f"expands to more than {MAX_CONFIG_VALUES:,} values (through YAML aliases?); a config holds hundreds"
        )
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A run config or space YAML file's data (not yet checked). Refused in one line before it is
    parsed: a missing, unreadable or non-regular file (a FIFO or device would block or never end),
    one over ``MAX_CONFIG_BYTES``, or one that is not UTF-8 text."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except OSError as error:
        raise ConfigError(str(path), f"cannot be read ({error.strerror or error}); pass a readable YAML file") from None
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ConfigError(str(path), "cannot be read (not a regular file); pass a YAML file")
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:  # a directory, no permission
        raise ConfigError(str(path), f"cannot be read ({error.strerror or error}); pass a readable YAML file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            str(path), f"larger than {MAX_CONFIG_BYTES >> 20} MiB; a run config or space file is a few KiB of YAML"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            str(path), f"not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); pass a YAML file"
        ) from None
    return _parse_yaml(text, str(path)) or {}


def load_run_config(path: str | Path | None, set_options: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """``mode-cl run CONFIG --set ...``: the file's config (defaults without one) with the options applied."""
    data = read_config_file(path) if path is not None else {}
    return load_run_config_dict(data, parse_set_options(set_options))


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 5) -> str:
    """``path: old → new`` for every differing leaf of two config dicts (the first ``limit``), one line."""

    def flat(data: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(data, dict):
            items: dict[str, Any] = {}
            for key, value in data.items():
                items |= flat(value, f"{prefix}.{key}" if prefix else str(key))
            return items
        if isinstance(data, list) and data:
            items = {}
            for index, value in enumerate(data):
                items |= flat(value, f"{prefix}[{index}]")
            return items
        return {prefix: data}

    before, after = flat(old), flat(new)
    changes = [
        f"{key}: {before.get(key, '(unset)')!r} → {after.get(key, '(unset)')!r}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key, "(unset)") != after.get(key, "(unset)")
    ]
    more = f" (+{len(changes) - limit} more)" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more
