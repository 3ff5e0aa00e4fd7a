"""Every method on the default digits sequence, several seeds: mean ± std of the forgetting metrics.

    python benchmarks/digits_methods.py [--seeds 0 1 2] [--methods mode seq_lora] [--jobs 2] [--out DIR]

Runs the in-process engine (``mode-cl run``'s path) with ``search_spaces/digits.yaml``, one process
per run with one torch thread each, ``--jobs`` at a time. Prints a table and writes
``summary.md`` and every run's ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = (
    ("avg_acc", "final avg acc ↑"),
    ("forgetting", "forgetting ↓"),
    ("gen_acc_final", "gen acc (final) ↑"),
    ("gen_fd_final", "gen FD (final) ↓"),
    ("inter_modal_forgetting", "inter-modal forgetting ↓"),
)


def _one(job: tuple[str, int, str, str]) -> dict:
    method, seed, work_dir, out_dir = job
    from trainables.config import load_run_config
    from trainables.engine import run_sequence

    config = load_run_config(
        ROOT / "search_spaces" / "digits.yaml", [f"method.name={method}", f"seed={seed}", "resources.cpus_per_worker=1"]
    )
    return run_sequence(config, Path(work_dir), Path(out_dir) / f"{method}-seed{seed}", log=lambda _: None)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    from trainables.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work-dir", default="mode-cl-work")
    parser.add_argument("--out", default="mode-cl-work/benchmarks/digits_methods")
    args = parser.parse_args()

    from trainables.benchmarks import prepare
    from trainables.config import load_run_config

    config = load_run_config(ROOT / "search_spaces" / "digits.yaml")
    prepare(config, Path(args.work_dir))
    jobs = [(m, s, args.work_dir, args.out) for m in args.methods for s in args.seeds]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(_one, jobs))
    wall = time.perf_counter() - started

    lines = [
        f"tasks {config.tasks}, {len(args.seeds)} seeds ({args.seeds}), search_spaces/digits.yaml, "
        f"wall {wall:.0f} s with {args.jobs} parallel runs",
        "",
        "| method | " + " | ".join(label for _, label in METRICS) + " | s/run |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]
    for method in args.methods:
        runs = [r for r in results if r["method"] == method]
        for r in runs:
            r["gen_acc_final"], r["gen_fd_final"] = r["gen_acc"][-1], r["gen_fd"][-1]
        cells = [_mean_std([r[key] for r in runs]) for key, _ in METRICS]
        seconds = statistics.mean(r["wall_s"] for r in runs)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    base = results[0]
    lines += ["", f"base model: gen acc {base['gen_acc'][0]:.3f}, gen FD {base['gen_fd'][0]:.2f}"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    (out / "all_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
