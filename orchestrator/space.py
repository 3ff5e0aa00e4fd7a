"""Sweep spaces: one YAML file → the list of trials Ray Tune runs, validated before Ray starts.

    name: digits_sweep
    run_config: digits.yaml            # trials start from this run config (path relative to this file)
    fixed: {resources.cpus_per_worker: 1}   # overrides applied to every trial
    grid:                              # cartesian product; a value is a list (grid) or a distribution
      method.r: [4, 8]
      method.kd_weight: {loguniform: [0.05, 1.0]}
      tasks: {orders: [[next, parity], [parity, next]]}   # or {permutations: 3, of: [...]} or {all_orders_of: [...]}
    extra_trials: [{method.name: seq_lora}]   # appended once each (with the fixed overrides)
    seeds: [0, 1]
    objective: {metric: avg_acc, mode: max}
    scheduler: {type: fifo}            # or {type: asha, grace_period: 1, reduction_factor: 2}
    search: {type: grid}               # grid | random | optuna (optuna: distributions/choices only)
    num_samples: 1                     # repetitions of the grid (random draws for distributions)
    max_concurrent_trials: 2           # default: CPUs // CPUs per trial
    tracking: {checkpoints: all}       # all | final | none: task checkpoints logged to MLflow
    max_trials: 1000                   # refuse a larger sweep (trials x num_samples) before any work

A sweep's size is computed arithmetically (grid product x seeds, n! for all_orders_of) and refused
above ``max_trials`` before anything is enumerated.

Every error is one line naming the YAML path of the bad field (``grid.method.r[1]: must be > 0``).
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainables.config import ConfigError, RunConfig, load_run_config_dict, read_config_file
from trainables.config_rules import field_type

TOP_LEVEL = (
    "name",
    "run_config",
    "fixed",
    "grid",
    "extra_trials",
    "seeds",
    "objective",
    "scheduler",
    "search",
    "num_samples",
    "max_concurrent_trials",
    "tracking",
    "max_trials",
)
DEFAULT_MAX_TRIALS = 1000
SECTION_KEYS = {
    "objective": ("metric", "mode"),
    "scheduler": ("type", "grace_period", "reduction_factor"),
    "search": ("type",),
    "tracking": ("checkpoints",),
}
DISTRIBUTIONS = ("choice", "loguniform", "uniform", "randint")
OBJECTIVE_METRICS = (
    "avg_acc",
    "forgetting",
    "retention",
    "bwt",
    "open_avg_acc",
    "gen_acc",
    "gen_fd",
    "inter_modal_forgetting",
    "fwt",
)


@dataclass
class SweepSpace:
    name: str
    path: Path
    base: dict[str, Any]  # the run config data the trials start from
    fixed: dict[str, Any]
    trials: list[dict[str, Any]]  # explicit overrides per trial (grid expanded, extras, seeds)
    configs: list[RunConfig]  # each trial's config, validated (distributions not yet sampled)
    distributions: dict[str, tuple[str, list]]  # sampled per trial: path → (kind, args)
    objective_metric: str = "avg_acc"
    objective_mode: str = "max"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "fifo"})
    search: str = "grid"
    num_samples: int = 1
    max_concurrent_trials: int = 1
    checkpoints_to_mlflow: str = "all"

    def trial_config(self, overrides: dict[str, Any]) -> RunConfig:
        """The config of a trial with these overrides (e.g. with sampled values)."""
        return load_run_config_dict(self.base, {**self.fixed, **overrides})

    @property
    def size(self) -> int:
        return len(self.trials) * self.num_samples


def _fail(path: str, message: str) -> None:
    raise ConfigError(path, message)


def _unknown(path: str, key: str, known: tuple[str, ...] | list[str]) -> None:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
    _fail(f"{path}{key}" if path else str(key), f"unknown key{hint}")


def _task_order_count(value: Any) -> int | None:
    """How many task orders ``value`` stands for, computed without enumerating them (None: not a
    task-order value; its own checks report that)."""
    if isinstance(value, list):
        return len(value)
    if not isinstance(value, dict):
        return None
    # The same key precedence as _task_orders, so the count is that of the orders it builds.
    for key, count in (("orders", len), ("all_orders_of", lambda v: math.factorial(len(v)))):
        if key in value:
            return count(value[key]) if isinstance(value[key], list) else None
    permutations = value.get("permutations")
    return permutations if isinstance(permutations, int) else None


def _task_orders(value: Any, path: str, seed: int) -> list[list[str]]:
    if isinstance(value, list):
        return value
    if not isinstance(value, dict) or len(value) == 0:
        _fail(
            path,
            "expected a list of task orders or {orders: [...]}, {permutations: k, of: [...]}, {all_orders_of: [...]}",
        )
    if "orders" in value:
        return value["orders"]
    if "all_orders_of" in value:
        tasks = value["all_orders_of"]
        if not isinstance(tasks, list) or not tasks:
            _fail(f"{path}.all_orders_of", "expected the list of tasks to order")
        return [list(p) for p in itertools.permutations(tasks)]
    if "permutations" in value:
        count, tasks = value["permutations"], value.get("of")
        if not isinstance(count, int) or count <= 0:
            _fail(f"{path}.permutations", f"expected a positive integer, got {count!r}")
        if not isinstance(tasks, list) or not tasks:
            _fail(f"{path}.of", "expected the list of tasks to permute")
        rng = np.random.default_rng(seed)
        return [[str(t) for t in rng.permutation(tasks)] for _ in range(count)]
    _unknown(f"{path}.", next(iter(value)), ["orders", "permutations", "all_orders_of"])
    return []


def _check(base: dict[str, Any], overrides: dict[str, Any], path: str) -> None:
    """Check ``base`` with ``overrides``; an error is reported at the space's ``path``."""
    try:
        load_run_config_dict(base, overrides)
    except ConfigError as error:
        raise ConfigError(path, error.reason) from None


def _culprit(
    base: dict[str, Any], fixed: dict[str, Any], grid_values: dict[str, list], extras: list[dict[str, Any]]
) -> None:
    """Find the one fixed, grid or extra value that makes a trial invalid by itself, and report it
    at its YAML path (only run once a trial failed: each value alone, in the file's order)."""
    for key, value in fixed.items():
        _check(base, {key: value}, f"fixed.{key}")
    for key, values in grid_values.items():
        for index, item in enumerate(values):
            _check(base, {**fixed, key: item}, f"grid.{key}[{index}]")
    for index, extra in enumerate(extras):
        for key, value in extra.items():
            _check(base, {**fixed, key: value}, f"extra_trials[{index}].{key}")


def load_space(path: str | Path, cpus_available: int | None = None) -> SweepSpace:
    """Parse and fully validate a sweep space; raises :class:`ConfigError` with a one-line message."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(str(path), "sweep space file not found")
    data = read_config_file(path)  # not a regular file, too large, not UTF-8 text, or not YAML: one line
    if not data or not isinstance(data, dict):
        raise ConfigError(str(path), "expected a mapping of sweep settings")
    for key in data:
        if key not in TOP_LEVEL:
            _unknown("", key, TOP_LEVEL)

    run_config = data.get("run_config", "digits.yaml")
    if not isinstance(run_config, str):
        _fail("run_config", "expected the path of a run config YAML, e.g. digits.yaml")
    for key in ("objective", "scheduler", "search", "tracking"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            _fail(
                key, f"expected a mapping, e.g. {key}: {{{'type: asha' if key != 'objective' else 'metric: avg_acc'}}}"
            )
    for key, known in SECTION_KEYS.items():
        for name in data.get(key) or {}:
            if name not in known:
                _unknown(f"{key}.", name, known)
    run_config_path = path.parent / run_config
    try:
        base = read_config_file(run_config_path)
        load_run_config_dict(base)
    except ConfigError as error:
        raise ConfigError(f"run_config ({run_config_path})", str(error)) from None

    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        _fail("fixed", "expected a mapping of config paths to values")

    seeds = data.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        _fail("seeds", "expected a non-empty list of integers")

    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        _fail("grid", "expected a mapping of config paths to value lists or distributions")
    extras = data.get("extra_trials") or []
    if not isinstance(extras, list) or not all(isinstance(e, dict) for e in extras):
        _fail("extra_trials", "expected a list of mappings of config overrides")
    num_samples = data.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
        _fail("num_samples", f"expected a positive integer, got {num_samples!r}")
    _check_size(data, base, fixed, grid, extras, len(seeds), num_samples)
    grid_values: dict[str, list] = {}
    distributions: dict[str, tuple[str, list]] = {}
    for key, value in grid.items():
        key_path = f"grid.{key}"
        if key == "tasks":
            value = _task_orders(value, key_path, seed=seeds[0])
        if isinstance(value, dict):
            if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
                _fail(key_path, f"expected a list of values or one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
            kind, args = next(iter(value.items()))
            _check_distribution(base, fixed, key, kind, args, f"{key_path}.{kind}")
            distributions[key] = (kind, args)
            continue
        if not isinstance(value, list) or not value:
            _fail(key_path, "expected a non-empty list of values")
        grid_values[key] = value

    combos = [dict(zip(grid_values, values, strict=True)) for values in itertools.product(*grid_values.values())]
    if not grid_values:
        combos = [{}] if not extras else []
    trials = [{**combo, "seed": seed} for combo in combos for seed in seeds]
    trials += [{**extra, "seed": seed} for extra in extras for seed in seeds]
    configs = []
    for index, trial in enumerate(trials):
        try:
            configs.append(load_run_config_dict(base, {**fixed, **trial}))
        except ConfigError as error:
            _culprit(base, fixed, grid_values, extras)
            _fail(f"grid (trial {index}: {trial})", error.reason)  # the values are invalid only together

    objective = data.get("objective") or {}
    metric, mode = objective.get("metric", "avg_acc"), objective.get("mode", "max")
    if metric not in OBJECTIVE_METRICS:
        _fail("objective.metric", f"unknown metric {metric!r} (known: {', '.join(OBJECTIVE_METRICS)})")
    if mode not in ("max", "min"):
        _fail("objective.mode", f"expected max or min, got {mode!r}")

    scheduler = data.get("scheduler") or {"type": "fifo"}
    if scheduler.get("type") not in ("fifo", "asha"):
        _fail("scheduler.type", f"expected fifo or asha, got {scheduler.get('type')!r}")
    if scheduler.get("type") == "asha":
        _check_asha(scheduler, max(len(config.tasks) for config in configs))

    if scheduler.get("type") == "asha" and (metric.startswith("gen_") or metric == "inter_modal_forgetting"):
        # ASHA compares trials on the objective after every task: it must exist at every stage.
        for index, config in enumerate(configs):
            if config.eval.generation != "every_stage":
                _fail(
                    "scheduler.type",
                    f"asha ranks trials by {metric} after every task, but trial {index} scores generation "
                    "only at the base and final stages (eval.generation: base_and_final); use every_stage or fifo",
                )

    search = (data.get("search") or {"type": "grid"}).get("type", "grid")
    if search not in ("grid", "random", "optuna"):
        _fail("search.type", f"expected grid, random or optuna, got {search!r}")
    if search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            _fail("search.type", "optuna is not installed; pip install optuna, or use grid/random")
        if grid_values:
            _fail("grid", "optuna samples distributions only: write {choice: [...]} instead of plain lists")

    cpus_per_trial = configs[0].resources.cpus_per_worker * configs[0].resources.num_workers
    cpus = cpus_available if cpus_available is not None else os.cpu_count() or 1
    if cpus_per_trial > cpus:
        _fail(
            "fixed.resources.cpus_per_worker",
            f"a trial needs {cpus_per_trial} CPUs but only {cpus} are available; lower it or join a cluster",
        )
    concurrency = data.get("max_concurrent_trials", max(1, cpus // cpus_per_trial))
    if not isinstance(concurrency, int) or concurrency <= 0:
        _fail("max_concurrent_trials", f"expected a positive integer, got {concurrency!r}")

    checkpoints = (data.get("tracking") or {}).get("checkpoints", "all")
    if checkpoints not in ("all", "final", "none"):
        _fail("tracking.checkpoints", f"expected all, final or none, got {checkpoints!r}")

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        _fail("name", "use letters, digits, '-' and '_' only")
    return SweepSpace(
        name=name,
        path=path,
        base=base,
        fixed=fixed,
        trials=trials,
        configs=configs,
        distributions=distributions,
        objective_metric=metric,
        objective_mode=mode,
        scheduler=scheduler,
        search=search,
        num_samples=num_samples,
        max_concurrent_trials=concurrency,
        checkpoints_to_mlflow=checkpoints,
    )


def _check_asha(scheduler: dict[str, Any], tasks: int) -> None:
    """ASHA's settings, in Ray's units (tasks learned): grace_period in [1, max_t] where max_t is the
    longest sequence's task count, reduction_factor a number > 1 (2-4 are usual)."""
    grace = scheduler.get("grace_period", 1)
    if not isinstance(grace, int) or isinstance(grace, bool) or not 1 <= grace <= tasks:
        _fail(
            "scheduler.grace_period",
            f"expected an integer from 1 to {tasks} (tasks in the longest sequence), got {grace!r}",
        )
    factor = scheduler.get("reduction_factor", 2)
    if not isinstance(factor, int | float) or isinstance(factor, bool) or not 1 < factor <= 100:
        _fail("scheduler.reduction_factor", f"expected a number above 1 and at most 100 (usually 2-4), got {factor!r}")


def _check_size(
    data: dict[str, Any],
    base: dict[str, Any],
    fixed: dict[str, Any],
    grid: dict[str, Any],
    extras: list[dict[str, Any]],
    seeds: int,
    num_samples: int,
) -> None:
    """Refuse a sweep of more than ``max_trials`` trials from its size alone, computed as
    (product of the grid's list lengths, n! for ``all_orders_of``) x seeds x num_samples, plus the
    extra trials x seeds x num_samples, before any trial is enumerated or checked."""
    limit = data.get("max_trials", DEFAULT_MAX_TRIALS)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        _fail("max_trials", f"expected a positive integer, got {limit!r}")
    factors = []
    for key, value in grid.items():
        if key == "tasks":
            for name in ("all_orders_of", "of"):
                names = value.get(name) if isinstance(value, dict) else None
                if isinstance(names, list) and names:
                    # The names are checked once, before n! (or k) orders of them would be.
                    _check(base, {**fixed, "tasks": names}, f"grid.tasks.{name}")
            count = _task_order_count(value)
        else:
            count = len(value) if isinstance(value, list) else None  # a distribution: one draw per sample
        if count is not None and count > 0:
            factors.append(count)
    combos = math.prod(factors) if factors else (0 if extras else 1)
    size = (combos + len(extras)) * seeds * num_samples
    if size > limit:
        shape = " x ".join(str(f) for f in factors) or "1"
        _fail(
            "max_trials",
            f"this sweep has {size:,} trials (grid {shape}, + {len(extras)} extra, x {seeds} seeds x {num_samples} "
            f"samples), above the limit of {limit:,}; shrink the grid or set max_trials: {size} in the space file",
        )


def _check_distribution(base, fixed, key: str, kind: str, args: Any, path: str) -> None:
    if kind == "choice":
        if not isinstance(args, list) or not args:
            _fail(path, "expected a non-empty list of values")
        for index, item in enumerate(args):
            _check(base, {**fixed, key: item}, f"{path}[{index}]")
        return
    if not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, int | float) for a in args):
        _fail(path, "expected [low, high]")
    low, high = args
    if not low < high or not all(math.isfinite(a) for a in args):
        _fail(path, f"expected low < high, got {args}")
    if kind in ("loguniform", "uniform") and field_type(RunConfig, key) is int:
        _fail(path, f"{key} takes integers: use {{randint: [low, high_exclusive]}} or {{choice: [...]}}")
    if kind == "loguniform" and low <= 0:
        _fail(path, f"loguniform needs low > 0, got {low}")
    for bound in (low, high):
        _check(base, {**fixed, key: bound}, path)
