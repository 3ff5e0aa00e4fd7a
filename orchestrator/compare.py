"""``mode-cl compare A B …``: one grouped table across sweeps or results collections.

Each source is a sweep (name or directory) or a results collection (a ``.jsonl`` of results, a
folder of ``results.json``). Its *fixed* config is every config field that is not swept: for a
sweep, the first trial's full config without the keys any trial overrides; for a collection, the
fields equal across its runs. Two sources may be compared only when their fixed configs agree on
every field, apart from the fields named by ``--allow-diff`` (e.g. comparing two code versions
with equal configs, or two budgets with ``--allow-diff train.epochs``): otherwise the difference
would be read as the effect of whatever the user meant to compare. A field swept in one source and
fixed in another becomes a column whose value, for the fixed source, is its fixed value.

The table groups by ``source`` plus ``--group-by`` (default: every swept key but the seed), with
optional paired differences against ``--baseline KEY=VALUE`` (e.g. ``source=main``), on runs that
agree on seed and task order, as ``mode-cl report --group-by`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainables.config_rules import ConfigError

PAIR_ON = ("config.seed", "config.tasks")


def source_rows(name: str, storage: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A source's finished rows (``config.<key>`` columns for its swept keys, plus seed and tasks)
    and its fixed config, flattened to dotted keys."""
    from orchestrator.report import column_value, flatten_config, is_results_collection, result_rows, sweep_rows

    if is_results_collection(name):
        import json

        path = Path(name)
        files = sorted(path.rglob("results.json")) if path.is_dir() else None
        lines = [f.read_text() for f in files] if files else path.read_text().splitlines()
        configs = [flatten_config(json.loads(line)["config"]) for line in lines if line.strip()]
        rows = result_rows(name)
        fixed = {k: v for k, v in configs[0].items() if all(repr(c.get(k)) == repr(v) for c in configs)}
    else:
        from orchestrator.space import load_space
        from orchestrator.sweep_store import find_sweep, read_record

        directory = find_sweep(name, storage)
        space_file = read_record(directory)["space"]
        if not Path(space_file).is_file():
            raise ConfigError(name, f"its sweep space {space_file} is gone: compare needs it for the fixed config")
        space = load_space(space_file)
        swept = {k for trial in space.trials for k in flatten_config(trial)} | set(space.distributions)
        full = flatten_config(space.configs[0].to_dict())
        fixed = {k: v for k, v in full.items() if k not in swept}
        rows = sweep_rows(directory)
    for key in ("seed", "tasks"):  # runs pair on these, swept or not
        for row in rows:
            row.setdefault(f"config.{key}", column_value(fixed.get(key)))
    return [r for r in rows if r.get("status") == "TERMINATED"], fixed


def compare(
    sources: list[str],
    storage: str,
    by: list[str],
    baseline: str | None,
    allow_diff: list[str],
    output_format: str,
    output: str | None,
) -> int:
    """Print (or write) the grouped table of ``sources``; refuses fixed-config differences not
    named by ``allow_diff``."""
    from orchestrator.report import column_value, render_grouped

    if len(sources) < 2:
        raise ConfigError("compare", "give two or more sweeps or results collections")
    labels = [Path(s.rstrip("/")).stem or s for s in sources]
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels, 1)]
    loaded = [source_rows(s, storage) for s in sources]
    for (rows, _), label in zip(loaded, labels, strict=True):
        if not rows:
            raise ConfigError(label, "no finished run to compare")
    swept = sorted({k for rows, _ in loaded for row in rows for k in row if k.startswith("config.")})
    first_label, first_fixed = labels[0], loaded[0][1]
    for (_, fixed), label in zip(loaded[1:], labels[1:], strict=True):
        for key in sorted(set(first_fixed) | set(fixed)):
            if f"config.{key}" in swept or key in allow_diff:
                continue
            if repr(first_fixed.get(key)) != repr(fixed.get(key)):
                raise ConfigError(
                    "--allow-diff",
                    f"{first_label} and {label} differ in {key} ({first_fixed.get(key)!r} vs {fixed.get(key)!r}): "
                    f"add --allow-diff {key} to compare them anyway",
                )
    rows = []
    for (own, fixed), label in zip(loaded, labels, strict=True):
        for row in own:
            filled = {k: column_value(fixed.get(k.removeprefix("config."))) for k in swept if k not in row}
            rows.append({**row, **filled, "source": label})
    if not by:  # every key that varies, but the seed and what follows it (runs pair on the seed)
        varies = lambda k: len({repr(r.get(k)) for r in rows}) > 1  # noqa: E731
        follows_seed = lambda k: all(r.get(k) == r.get("config.seed") for r in rows)  # noqa: E731
        by = [k for k in swept if k != "config.seed" and varies(k) and not follows_seed(k)]
    by = ["source", *(k for k in by if k != "source")]
    return render_grouped(rows, by, baseline, None, output_format, output, Path.cwd(), "source")
