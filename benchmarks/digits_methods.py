"""The paper-style table on the digits benchmark: every method × seeds × task orders, mean ± 95 % CI.

    python benchmarks/digits_methods.py [--seeds 0 1 2 3 4] [--methods mode seq_lora] [--jobs 2] [--out DIR]

Runs the in-process engine (``mode-cl run``'s path) with ``search_spaces/digits.yaml``, on its task
order and the reverse order, one process per run with one torch thread each, ``--jobs`` at a time.
Each seed has its own data split and base model (built first, once per seed). Prints and writes
(``summary.md``, every run in ``all_results.json``):

- per method, the mean and the 95 % confidence interval (Student t over the seed × order runs) of
  understanding accuracy, forgetting, retention, open-vocabulary accuracy, generation accuracy,
  gen FD and inter-modal forgetting; a zero-shot row from the base model's stage-0 scores;
- paired differences of ``--reference`` (default ``mode``) minus each other method, over runs with
  the same seed and task order, with their 95 % t interval.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
METRICS = (
    ("avg_acc", "understanding acc ↑"),
    ("forgetting", "forgetting ↓"),
    ("retention", "retention ↑"),
    ("open_avg_acc", "open-vocab acc ↑"),
    ("gen_acc_final", "gen acc ↑"),
    ("gen_fd_final", "gen FD ↓"),
    ("inter_modal_forgetting", "inter-modal forgetting ↓"),
)


def _config(method: str, seed: int, order: list[str]):
    from trainables.config import load_run_config

    overrides = [f"method.name={method}", f"seed={seed}", f"tasks=[{', '.join(order)}]", "resources.cpus_per_worker=1"]
    return load_run_config(ROOT / "search_spaces" / "digits.yaml", overrides)


def _one(job: tuple[str, int, tuple[str, ...], str, str]) -> dict:
    method, seed, order, work_dir, out_dir = job
    from trainables.engine import run_sequence

    name = f"{method}-seed{seed}-{'_'.join(order)}"
    result = run_sequence(_config(method, seed, list(order)), Path(work_dir), Path(out_dir) / name, log=lambda _: None)
    result["order"] = list(order)
    result["gen_acc_final"], result["gen_fd_final"] = result["gen_acc"][-1], result["gen_fd"][-1]
    return result


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t confidence interval); half-width NaN for one value."""
    array = np.asarray(values, dtype=np.float64)
    if len(array) < 2:
        return float(array.mean()), math.nan
    half = stats.t.ppf((1 + level) / 2, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array))
    return float(array.mean()), float(half)


def _cell(values: list[float]) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def main() -> None:
    from trainables.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--reference", default="mode", help="the method the paired differences are taken from")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work-dir", default="mode-cl-work")
    parser.add_argument("--out", default="mode-cl-work/benchmarks/digits_methods")
    args = parser.parse_args()

    from trainables.benchmarks import prepare
    from trainables.config import load_run_config

    order = list(load_run_config(ROOT / "search_spaces" / "digits.yaml").tasks)
    orders = [tuple(order), tuple(reversed(order))]
    for seed in args.seeds:  # data and base model of each seed, once, before the runs share them
        prepare(_config(args.methods[0], seed, order), Path(args.work_dir))
    jobs = [(m, s, o, args.work_dir, args.out) for m in args.methods for s in args.seeds for o in orders]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(_one, jobs))
    wall = time.perf_counter() - started

    runs = len(args.seeds) * len(orders)
    lines = [
        f"digits, search_spaces/digits.yaml, seeds {args.seeds} × orders {[' → '.join(o) for o in orders]} "
        f"= {runs} runs per method; mean ± 95 % CI (Student t, n = {runs}); wall {wall:.0f} s, {args.jobs} in parallel",
        "",
        "| method | " + " | ".join(label for _, label in METRICS) + " | engine s/run |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    base_rows = {(r["seed"], tuple(r["order"])): r for r in results}
    zero_shot = [float(np.mean(r["acc_matrix"][0])) for r in base_rows.values()]
    zero_open = [float(np.mean(r["open_acc_matrix"][0])) for r in base_rows.values()]
    zero_gen = [r["gen_acc"][0] for r in base_rows.values()]
    zero_fd = [r["gen_fd"][0] for r in base_rows.values()]
    zero = [_cell(zero_shot), "—", "—", _cell(zero_open), _cell(zero_gen), _cell(zero_fd), "—", "—"]
    lines.append("| zero-shot (base) | " + " | ".join(zero) + " |")
    for method in args.methods:
        mine = [r for r in results if r["method"] == method]
        cells = [_cell([r[key] for r in mine if r[key] is not None]) for key, _ in METRICS]
        seconds = np.mean([r["profile"]["seconds"]["total"] for r in mine])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    if args.reference in args.methods:
        lines += ["", f"paired differences {args.reference} − method (same seed and order), mean ± 95 % CI:", ""]
        lines += ["| method | " + " | ".join(label for _, label in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        reference = {(r["seed"], tuple(r["order"])): r for r in results if r["method"] == args.reference}
        for method in (m for m in args.methods if m != args.reference):
            other = {(r["seed"], tuple(r["order"])): r for r in results if r["method"] == method}
            cells = []
            for key, _ in METRICS:
                pairs = [(reference[k][key], other[k][key]) for k in reference if k in other]
                cells.append(_cell([a - b for a, b in pairs if a is not None and b is not None]))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    (out / "all_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
