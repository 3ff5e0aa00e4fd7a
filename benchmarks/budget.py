"""Engine time of one default run per method on one core, against the benchmark's budget of 150 s.

    python benchmarks/budget.py [--methods mode seq_lora] [--seed 0] [--jobs 1] [--set KEY=VALUE ...]

Runs the in-process engine (``mode-cl run --no-ray``'s path) on ``search_spaces/digits.yaml`` with
``resources.cpus_per_worker=1`` (one torch thread), one method after the other (``--jobs 2``: two
at a time, each on its own core, so that they share the memory bandwidth and caches), every run
from scratch in a fresh folder. The seed's base model is built first and not counted: it is cached
for every run after it. Prints per method the engine seconds by phase (``run_sequence``'s profile),
the number of train steps and seconds per step, and whether the run fits the budget.

Machines of one kind differ from day to day (this one ran 2× faster on 2026-12-05 than on
2026-11-30), so the script also prints what one thread of ``torch.matmul`` reaches at a fixed shape:
compare budgets across days only next to it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Fresh interpreters, not forks: a process forked after torch ran its thread pool (the base
# model pretrained here) can hang in its first parallel op.
SPAWN = multiprocessing.get_context("spawn")
ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 150.0  # the benchmark issue's budget for a default MoDE run on one core
CALIBRATION_SHAPE = (512, 512, 512)  # m, k, n of the matmul timed for the machine's speed


def matmul_gflops(repeats: int = 50) -> float:
    """Single-thread fp32 ``torch.matmul`` GFLOP/s at ``CALIBRATION_SHAPE``, median of ``repeats``:
    2·m·k·n / seconds per product."""
    import statistics

    import torch

    torch.set_num_threads(1)
    m, k, n = CALIBRATION_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * m * k * n / statistics.median(times) / 1e9


def _one(job: tuple[str, int, str, str, tuple[str, ...]]) -> dict:
    method, seed, work_dir, out_dir, settings = job
    from trainables.config import load_run_config
    from trainables.engine import run_sequence

    overrides = [f"method.name={method}", f"seed={seed}", "resources.cpus_per_worker=1", *settings]
    config = load_run_config(ROOT / "search_spaces" / "digits.yaml", overrides)
    result = run_sequence(config, Path(work_dir), Path(out_dir) / method, log=lambda _: None)
    return {"method": method, "profile": result["profile"], "steps": sum(len(losses) for losses in result["losses"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["mode", "mode_no_kd", "seq_lora"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one core each")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", default="mode-cl-work")
    args = parser.parse_args()

    from trainables.benchmarks import prepare
    from trainables.config import load_run_config
    from trainables.methods import METHODS

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
    config = load_run_config(ROOT / "search_spaces" / "digits.yaml", [f"seed={args.seed}", *args.settings])
    prepare(config, Path(args.work_dir))  # the base model, built once and cached: not part of any run's time
    gflops = matmul_gflops()
    out_dir = Path(tempfile.mkdtemp(prefix="budget-", dir=args.work_dir))
    jobs = [(m, args.seed, args.work_dir, str(out_dir), tuple(args.settings)) for m in args.methods]
    started = time.perf_counter()
    try:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=SPAWN) as pool:
            results = list(pool.map(_one, jobs))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    wall = time.perf_counter() - started

    print(
        f"default digits run (tasks {', '.join(config.tasks)}; {config.train.epochs} epochs, batch "
        f"{config.train.batch_size}), seed {args.seed}, 1 torch thread per run, {args.jobs} run(s) at a time, "
        f"wall {wall:.0f} s" + (f", overrides {' '.join(args.settings)}" if args.settings else "")
    )
    print(f"machine speed: torch.matmul {CALIBRATION_SHAPE[0]}³ fp32 on one thread: {gflops:.1f} GFLOP/s")
    print()
    print("| method | engine s | train s | steps | ms/step | evaluate s | teacher cache s | other s | ≤ 150 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        seconds = result["profile"]["seconds"]
        train, evaluate = seconds.get("train", 0.0), seconds.get("evaluate", 0.0)
        teacher = seconds.get("teacher_cache", 0.0)
        total = seconds["total"]
        other = total - train - evaluate - teacher
        print(
            f"| {result['method']} | {total:.1f} | {train:.1f} | {result['steps']} | "
            f"{1000 * train / max(result['steps'], 1):.0f} | {evaluate:.1f} | {teacher:.1f} | {other:.1f} | "
            f"{'yes' if total <= BUDGET_S else 'no'} |"
        )
    print()
    for result in results:
        target = f"target ≤ {BUDGET_S:.0f} s" + ("" if result["method"] == "mode" else ", MoDE's; baselines less")
        print(f"one-core engine time, {result['method']}: {result['profile']['seconds']['total']:.1f} s  ({target})")


if __name__ == "__main__":
    main()
