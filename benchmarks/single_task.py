"""Every digits task trained alone from the base model with the default budget: is each one learnable?

    python benchmarks/single_task.py [--methods mode seq_lora] [--tasks parity prime] [--seed 0] [--jobs 2]
                                     [--set train.epochs=4 ...] [--out DIR]

Runs the in-process engine (``mode-cl run``'s path) with ``search_spaces/digits.yaml`` and
``tasks=[<task>]``, one process per run with one torch thread each, ``--jobs`` at a time. Prints,
per task and method, the base model's (zero-shot) and the trained model's test accuracy (constrained
to the task's answers, and open-vocabulary), against the benchmark's bar of 0.85, and writes the
table and every ``results.json`` under ``--out``. ``--set`` overrides config fields (as ``mode-cl run
--set``) to try another budget; a run whose results are already under ``--out`` is resumed, so give
each budget its own ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Fresh interpreters, not forks: a process forked after torch ran its thread pool (the base
# model pretrained here) can hang in its first parallel op.
SPAWN = multiprocessing.get_context("spawn")
ROOT = Path(__file__).resolve().parents[1]
BAR = 0.85  # every task, trained alone with the default budget, must reach this test accuracy


def _one(job: tuple[str, str, int, str, str, tuple[str, ...]]) -> dict:
    method, task, seed, work_dir, out_dir, settings = job
    from trainables.config import load_run_config
    from trainables.engine import run_sequence

    overrides = [f"tasks=[{task}]", f"method.name={method}", f"seed={seed}", "resources.cpus_per_worker=1", *settings]
    config = load_run_config(ROOT / "search_spaces" / "digits.yaml", overrides)
    return run_sequence(config, Path(work_dir), Path(out_dir) / f"{method}-{task}-seed{seed}", log=lambda _: None)


def main() -> None:
    from trainables.benchmarks.digits.data import continual_tasks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["mode", "seq_lora"])
    parser.add_argument("--tasks", nargs="+", default=continual_tasks())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", default="mode-cl-work")
    parser.add_argument("--out", default="mode-cl-work/benchmarks/single_task")
    args = parser.parse_args()

    from trainables.benchmarks import prepare
    from trainables.config import load_run_config

    config = load_run_config(ROOT / "search_spaces" / "digits.yaml", [f"seed={args.seed}", *args.settings])
    prepare(config, Path(args.work_dir))
    settings = tuple(args.settings)
    jobs = [(m, t, args.seed, args.work_dir, args.out, settings) for t in args.tasks for m in args.methods]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=SPAWN) as pool:
        results = list(pool.map(_one, jobs))
    wall = time.perf_counter() - started

    lines = [
        f"each task alone from the base, search_spaces/digits.yaml budget (epochs {config.train.epochs}, "
        f"batch {config.train.batch_size}, lr {config.train.lr}, {config.data.task_train} samples), seed {args.seed}, "
        f"wall {wall:.0f} s with {args.jobs} parallel runs"
        + (f", overrides {' '.join(args.settings)}" if args.settings else ""),
        "",
        "| task | method | zero-shot | trained | open-vocab trained | ≥ 0.85 | gen acc base → after | engine s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, task, *_), result in zip(jobs, results, strict=True):
        zero, trained = result["acc_matrix"][0][0], result["acc_matrix"][1][0]
        open_trained = result["open_acc_matrix"][1][0]
        gen = result["gen_acc"]
        lines.append(
            f"| {task} | {method} | {zero:.3f} | {trained:.3f} | {open_trained:.3f} | "
            f"{'yes' if trained >= BAR else 'NO'} | {gen[0]:.2f} → {gen[-1]:.2f} | "
            f"{result['profile']['seconds']['total']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text + "\n")
    (out / "all_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
