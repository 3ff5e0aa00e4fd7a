"""Results across seeds: per-group mean ± confidence interval, paired differences, seeds needed.

Pure functions over rows (dicts: a sweep's trial table, or benchmark runs), used by
``mode-cl report --group-by`` and ``benchmarks/digits_methods.py``. Intervals are Student t
intervals, meant for the small numbers of seeds a sweep has:

    mean ± t_{n−1, (1+level)/2} · s / √n,   s the sample standard deviation (ddof 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

INTERVAL = "Student t"


@dataclass(frozen=True)
class Interval:
    """n finite values' mean and the half-width of its ``level`` t interval (NaN for n < 2)."""

    n: int
    mean: float
    half: float
    std: float

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "—"
        mean = f"{self.mean:.{digits}f}"
        return mean if math.isnan(self.half) else f"{mean} ± {self.half:.{digits}f}"


def t_interval(values: Iterable[float | None], level: float = 0.95) -> Interval:
    """The mean of the finite ``values`` (None and NaN are left out) with its t interval."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(finite)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan)
    if n == 1:
        return Interval(1, float(finite[0]), math.nan, math.nan)
    std = float(finite.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(n, float(finite.mean()), half, std)


def seeds_needed(std: float, half_width: float, level: float = 0.95, limit: int = 10_000) -> int | None:
    """The smallest n ≥ 2 with t_{n−1,(1+level)/2} · std / √n ≤ ``half_width``: how many runs a
    group needs for that half-width if its spread stays ``std``. None when ``std`` is unknown (one
    run) or more than ``limit`` runs would be needed."""
    if not math.isfinite(std) or half_width <= 0:
        return None
    if std == 0:
        return 2
    for n in range(2, limit + 1):
        if stats.t.ppf((1 + level) / 2, n - 1) * std / math.sqrt(n) <= half_width:
            return n
    return None


def group_key(row: Mapping[str, Any], keys: Sequence[str]) -> tuple:
    return tuple(_hashable(row.get(key)) for key in keys)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def grouped(
    rows: Sequence[Mapping[str, Any]],
    by: Sequence[str],
    metrics: Sequence[str],
    level: float = 0.95,
) -> list[tuple[tuple, dict[str, Interval]]]:
    """One ``(group values, {metric: Interval})`` per distinct combination of the ``by`` keys, in
    order of first appearance."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(group_key(row, by), []).append(row)
    return [
        (key, {metric: t_interval((row.get(metric) for row in members), level) for metric in metrics})
        for key, members in groups.items()
    ]


def paired_differences(
    rows: Sequence[Mapping[str, Any]],
    by: Sequence[str],
    baseline: tuple[str, Any],
    pair_on: Sequence[str],
    metrics: Sequence[str],
    level: float = 0.95,
) -> list[tuple[tuple, dict[str, Interval]]]:
    """For every group (by ``by``) other than the baseline's: the t interval of (group − baseline)
    over pairs of runs that agree on ``pair_on`` (e.g. seed and task order) and on every ``by``
    key except the baseline's own key.

    ``baseline`` is ``(key, value)``, e.g. ``("config.method.name", "seq_lora")``; ``key`` must be
    one of ``by``. A group with no partner in the baseline has n = 0."""
    key, value = baseline
    if key not in by:
        raise ValueError(f"the baseline key {key!r} is not one of the grouping keys {list(by)}")
    position = list(by).index(key)
    others = [k for k in by if k != key]
    reference: dict[tuple, Mapping[str, Any]] = {}
    for row in rows:
        if _hashable(row.get(key)) == _hashable(value):
            reference[group_key(row, [*others, *pair_on])] = row
    if not reference:
        raise ValueError(f"no run has {key} = {value!r}")
    out = []
    for group, _ in grouped(rows, by, metrics, level):
        if group[position] == _hashable(value):
            continue
        members = [r for r in rows if group_key(r, by) == group]
        pairs = [(r, reference.get(group_key(r, [*others, *pair_on]))) for r in members]
        pairs = [(r, b) for r, b in pairs if b is not None]
        out.append((group, {m: t_interval(_difference(r.get(m), b.get(m)) for r, b in pairs) for m in metrics}))
    return out


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


SUMMARY_METRICS = (
    "avg_acc",
    "forgetting",
    "retention",
    "open_avg_acc",
    "gen_acc",
    "gen_fd",
    "inter_modal_forgetting",
)


def grouped_table(
    rows: Sequence[Mapping[str, Any]],
    by: Sequence[str],
    metrics: Sequence[str] = SUMMARY_METRICS,
    baseline: tuple[str, Any] | None = None,
    pair_on: Sequence[str] = (),
    half_width: float | None = None,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """Flat records for output: one per group (``kind`` "group"), then with a baseline one per
    other group (``kind`` "difference", group − baseline on paired runs). Each metric gives
    ``<metric>`` (mean), ``<metric>_ci`` (half-width), ``<metric>_n``; with ``half_width``,
    ``<metric>_seeds_needed`` for that half-width at the group's spread."""
    records = []
    sections = [("group", grouped(rows, by, metrics, level))]
    if baseline is not None:
        sections.append(("difference", paired_differences(rows, by, baseline, pair_on, metrics, level)))
    for kind, groups in sections:
        for key, intervals in groups:
            record: dict[str, Any] = {"kind": kind, **dict(zip(by, key, strict=True))}
            for metric, interval in intervals.items():
                record[metric] = interval.mean
                record[f"{metric}_ci"] = interval.half
                record[f"{metric}_n"] = interval.n
                if half_width is not None:
                    record[f"{metric}_seeds_needed"] = seeds_needed(interval.std, half_width, level)
            records.append(record)
    return records
