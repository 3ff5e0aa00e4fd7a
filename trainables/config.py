"""Run configuration: one YAML file → nested dataclasses, validated before anything runs.

Errors name the YAML path of the bad field (``train.lr``) and the fix, with a did-you-mean for
unknown keys. ``--set key=value`` overrides use the same paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainables.data.digits import DigitsConfig, continual_tasks
from trainables.methods import METHODS, MethodConfig


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one line naming the field and the fix."""


@dataclass(frozen=True)
class BaseModelConfig:
    """The tiny Chameleon pretrained on the base capabilities (captioning + text-to-image)."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    epochs: int = 6
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Per-task training budget. A fresh AdamW and warmup-cosine schedule per task (as the paper)."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-3
    warmup_ratio: float = 0.1
    grad_clip: float = 10.0
    weight_decay: float = 0.0


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

    gen_samples_per_digit: int = 10
    gen_temperature: float = 0.7
    tasks: str = "all"
    generation: str = "every_stage"

    def __post_init__(self) -> None:
        if self.tasks not in EVAL_TASKS:
            raise ValueError(f"tasks must be one of {', '.join(EVAL_TASKS)}, got {self.tasks!r}")
        if self.generation not in EVAL_GENERATION:
            raise ValueError(f"generation must be one of {', '.join(EVAL_GENERATION)}, got {self.generation!r}")

    def stage_plan(self, stage: int, num_tasks: int) -> tuple[list[int], bool]:
        """(indices of the tasks to evaluate, whether to score generation) at ``stage`` (0 = base)."""
        tasks = list(range(num_tasks)) if stage == 0 or self.tasks == "all" else list(range(min(stage + 1, num_tasks)))
        generation = self.generation == "every_stage" or stage in (0, num_tasks)
        return tasks, generation


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-trial compute. ``cpus_per_worker`` is also torch's thread count on CPU (results on CPU
    depend on it at the last bit, so both run paths use it)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 2
    gpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker < 1:
            # Ray would pack the workers onto one GPU and NCCL fails with "Duplicate GPU detected".
            raise ValueError("fractional gpus_per_worker is only safe with num_workers 1; use 1 GPU per worker")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0  # also checkpoint every N optimizer steps inside a task (0 = at task ends only)
    num_to_keep: int = 2  # 0 keeps all; keep ≥ 2 so a corrupt newest checkpoint can fall back
    max_failures: int = 3  # Ray Train restarts of a failed worker group, each from the latest checkpoint


@dataclass(frozen=True)
class CoinConfig:
    """The real-scale benchmark: a Chameleon/Anole checkpoint and CoIN data imported by
    ``mode-cl data import-coin``. Its presence in a run config selects this benchmark instead of
    the embedded digits one (``tasks`` then name imported CoIN tasks).

    Args:
        model: checkpoint directory or Hugging Face model id (the HF cache is used when present).
        data_dir: output directory of ``mode-cl data import-coin``.
        dtype / attn_implementation: how the frozen base model is loaded (bf16, ``sdpa`` by default).
        gradient_checkpointing: recompute decoder layers in backward (MoDE routing is replayed).
        max_length: sequences are cut to this many tokens (the paper's 2,048).
        max_new_tokens: greedy answer length limit at evaluation (the paper's 60).
        eval_limit: evaluate at most this many test samples per task (null = all).
        eval_batch_size: prompts per batch during greedy decoding and image-token scoring.
        separator_token: vocabulary-map name of the prompt/answer separator (Chameleon's end of turn).
        vqgan: Chameleon's VQGAN tokenizer checkpoint (``tokenizer/vqgan.ckpt``, or the ``.safetensors``
            written by ``trainables.vqgan.convert_vqgan_checkpoint``); its ``vqgan.yaml`` is read when next
            to it. With ``clip_model`` it turns on sampled text-to-image scoring (see ``trainables.coin_eval``).
        clip_model: CLIP model directory or Hugging Face id already in the local cache
            (e.g. ``openai/clip-vit-base-patch32``, the paper's ViT-B/32); set together with ``vqgan``.
        reference_images: directory of real reference images for ``image_align`` / ``fd_clip``;
            null = the VQGAN reconstructions of the held-out generation images.
        t2i_prompts: sample images for at most this many held-out generation captions (the paper: 101).
        t2i_temperature / t2i_top_k: sampling temperature (> 0) and optional top-k over the codebook.
        t2i_seed: sampling seed (each prompt has its own generator; the paper's 42).
    """

    model: str = "leloy/Anole-7b-v0.1-hf"
    data_dir: str = "mode-cl-work/coin"
    dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    max_length: int = 2048
    max_new_tokens: int = 60
    eval_limit: int | None = None
    eval_batch_size: int = 8
    separator_token: str = "<reserved08706>"
    vqgan: str | None = None
    clip_model: str | None = None
    reference_images: str | None = None
    t2i_prompts: int = 101
    t2i_temperature: float = 1.0
    t2i_top_k: int | None = None
    t2i_seed: int = 42

    def __post_init__(self) -> None:
        from trainables.chameleon import ATTN_IMPLEMENTATIONS, DTYPES

        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                f"got {self.attn_implementation!r}"
            )
        if self.eval_limit is not None and self.eval_limit <= 0:
            raise ValueError(f"eval_limit must be a positive integer or null, got {self.eval_limit!r}")
        if (self.vqgan is None) != (self.clip_model is None):
            missing = "clip_model" if self.clip_model is None else "vqgan"
            raise ValueError(
                f"{missing} is not set: sampled image-generation scores need both vqgan (Chameleon's "
                "tokenizer/vqgan.ckpt) and clip_model (e.g. openai/clip-vit-base-patch32); set both or neither"
            )
        if self.reference_images is not None and self.vqgan is None:
            raise ValueError("reference_images is set but vqgan/clip_model are not; set them or drop reference_images")
        if self.t2i_prompts <= 0:
            raise ValueError(f"t2i_prompts must be a positive integer, got {self.t2i_prompts!r}")
        if not self.t2i_temperature > 0:
            raise ValueError(
                f"t2i_temperature must be > 0 (greedy sampling gives blank images), got {self.t2i_temperature!r}"
            )
        if self.t2i_top_k is not None and self.t2i_top_k <= 0:
            raise ValueError(f"t2i_top_k must be a positive integer or null, got {self.t2i_top_k!r}")


# CoinConfig fields of sampled text-to-image scoring, left out of RunConfig.to_dict() while it is off.
T2I_FIELDS = ("vqgan", "clip_model", "reference_images", "t2i_prompts", "t2i_temperature", "t2i_top_k", "t2i_seed")


@dataclass(frozen=True)
class RunConfig:
    tasks: tuple[str, ...] = ("next", "parity", "previous", "bigsmall")
    seed: int = 0
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DigitsConfig = field(default_factory=DigitsConfig)
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    coin: CoinConfig | None = None  # set: the CoIN benchmark on a Chameleon checkpoint (see CoinConfig)

    def __post_init__(self) -> None:
        if self.base.hidden_size % self.base.num_attention_heads:
            raise ValueError("base.hidden_size must be a multiple of base.num_attention_heads")
        if not 0.0 <= self.train.warmup_ratio < 1.0:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.train.warmup_ratio}")
        if not 0 < self.data.test_images < 1797 - 100:
            raise ValueError("data.test_images must leave at least 100 of the 1,797 digits for training")

    def to_dict(self) -> dict[str, Any]:
        data = json.loads(json.dumps(asdict(self)))
        if data["coin"] is None:  # digits runs keep the dict (and hash) they had before CoIN existed
            del data["coin"]
        for name, default in (("tasks", "all"), ("generation", "every_stage")):
            if data["eval"][name] == default:  # runs on the default schedule keep their earlier hash
                del data["eval"][name]
        if "coin" not in data:
            return data
        if data["coin"]["vqgan"] is None:  # CoIN runs without T2I scoring keep their earlier dict (and hash)
            for name in T2I_FIELDS:
                del data["coin"][name]
        return data

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


POSITIVE_INTS = {"epochs", "batch_size", "r", "num_experts", "hidden_size", "intermediate_size", "num_hidden_layers"}
POSITIVE_INTS |= {"num_workers", "cpus_per_worker"}
POSITIVE_INTS |= {"num_attention_heads", "gen_samples_per_digit", "levels", "task_train", "task_test", "test_images"}
POSITIVE_FLOATS = {"lr", "alpha", "kd_temperature", "gpus_per_worker", "grad_clip"}
NON_NEGATIVE = {"kd_weight", "weight_decay", "seed", "gen_temperature", "every_steps", "num_to_keep"}
NON_NEGATIVE |= {"max_failures", "t2i_seed"}
POSITIVE_INTS |= {"max_length", "max_new_tokens", "eval_batch_size", "t2i_prompts"}


def _check_value(path: str, name: str, value: Any, expected: Any) -> Any:
    if expected in (int, "int") and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if expected in (float, "float"):
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
    if expected == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if expected == "str" and not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if name in POSITIVE_INTS | POSITIVE_FLOATS and value <= 0:
        raise ConfigError(f"{path}: must be > 0, got {value!r}")
    if name in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{path}: must be ≥ 0, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{path}: unknown key{hint}")
        expected = fields[key].type
        nested = {"method": MethodConfig, "train": TrainConfig, "eval": EvalConfig}
        nested |= {"data": DigitsConfig, "base": BaseModelConfig}
        nested |= {"resources": ResourcesConfig, "checkpoint": CheckpointConfig, "coin": CoinConfig}
        if cls is RunConfig and key == "coin" and value is None:
            kwargs[key] = None
        elif cls is RunConfig and key in nested:
            if key == "method" and isinstance(value, str):
                value = {"name": value}
            kwargs[key] = _build(nested[key], value, path)
        elif key == "tasks" and cls is RunConfig:
            kwargs[key] = _tasks(value, path, coin=cls is RunConfig and data.get("coin") is not None)
        elif key == "target_modules":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: expected a non-empty list of module names, e.g. [gate_proj, up_proj]")
            kwargs[key] = tuple(value)
        elif key == "name" and cls is MethodConfig:
            if not isinstance(value, str) or value not in METHODS:
                close = difflib.get_close_matches(str(value), list(METHODS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{path}: unknown method {value!r}{hint} (known: {', '.join(METHODS)})")
            kwargs[key] = value
        elif value is None and "None" in str(expected):
            kwargs[key] = None
        else:
            base_type = str(expected).split("|")[0].strip()
            kwargs[key] = _check_value(path, key, value, base_type)
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise ConfigError(f"{prefix or 'config'}: {error}") from None


def _tasks(value: Any, path: str, coin: bool = False) -> tuple[str, ...]:
    known = continual_tasks()
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"{path}: expected a non-empty list of task names from {'the imported CoIN tasks' if coin else known}"
        )
    for index, task in enumerate(value):
        if coin:  # CoIN task names are checked against the imported data when the run starts
            if not isinstance(task, str) or not task:
                raise ConfigError(f"{path}[{index}]: expected a task name string, got {task!r}")
            continue
        if task not in known:
            close = difflib.get_close_matches(str(task), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}[{index}]: unknown task {task!r}{hint} (known: {', '.join(known)})")
    duplicates = sorted({t for t in value if value.count(t) > 1})
    if duplicates:
        raise ConfigError(f"{path}: task(s) {duplicates} appear more than once; each task is learned once")
    return tuple(value)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a copy of ``data``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of settings, got {type(data).__name__}")
    try:
        result = json.loads(json.dumps(data))
    except TypeError as error:  # e.g. a YAML date
        raise ConfigError(f"config: unsupported value type ({error}); use numbers, strings and lists") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set method=seq_lora")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # YAML 1.1 reads "3e-3" as a string
                value = float(value)
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            current = node.get(part)
            if isinstance(current, str) and part == "method":
                current = {"name": current}
            node[part] = current if isinstance(current, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return result


def load_run_config_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from ``RunConfig.to_dict()`` output (e.g. inside a Ray worker)."""
    return _build(RunConfig, data, "")


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            raise ConfigError(f"{path}: cannot be read ({reason}); pass a readable YAML file") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(error, 'problem', error)})") from None
    return _build(RunConfig, apply_overrides(data, list(overrides)), "")


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
