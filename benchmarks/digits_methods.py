"""The paper-style table on the digits benchmark: every method × seeds × task orders, mean ± 95 % CI.

    python benchmarks/digits_methods.py [--seeds 0 1 2 3 4] [--methods mode seq_lora] [--jobs 2]
                                        [--set resources.use_gpu=true ...] [--out DIR] [--runs DIR]
    python benchmarks/digits_methods.py --summarize [--out DIR]    # the table from results so far

Runs the in-process engine (``mode-cl run``'s path) with ``search_spaces/digits.yaml``, on its task
order and the reverse order, one process per run with one torch thread each, ``--jobs`` at a time,
seed by seed (every method of a seed before the next seed). Each seed has its own data split and
base model (built first, once per seed). Each finished run is appended to ``all_results.jsonl`` in
``--out`` at once, and runs already there are not run again: an interrupted benchmark continues
where it stopped, and ``--summarize`` tables whatever has finished. ``--set`` overrides config
fields of every run (as ``mode-cl run --set``). Writes the runs asked for (without per-step losses)
to ``table.jsonl`` and prints and writes ``summary.md``, the table ``mode-cl report table.jsonl
--group-by method.name --baseline method.name=mode`` gives:

- per method, the mean and the 95 % confidence interval (Student t over the seed × order runs) of
  understanding accuracy, forgetting, retention, open-vocabulary accuracy, generation accuracy,
  gen FD, inter-modal forgetting and engine seconds; a zero-shot row from the base model's stage-0
  scores;
- paired differences of each other method minus ``--reference`` (default ``mode``), over runs with
  the same seed and task order, with their 95 % t interval.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

# Fresh interpreters, not forks: a process forked after torch ran its thread pool (the base
# model pretrained here) can hang in its first parallel op.
SPAWN = multiprocessing.get_context("spawn")
ROOT = Path(__file__).resolve().parents[1]


def _config(method: str, seed: int, order: list[str], settings: tuple[str, ...] = ()):
    from trainables.config import load_run_config

    overrides = [f"method.name={method}", f"seed={seed}", f"tasks=[{', '.join(order)}]", "resources.cpus_per_worker=1"]
    return load_run_config(ROOT / "search_spaces" / "digits.yaml", [*overrides, *settings])


def _one(job: tuple[str, int, tuple[str, ...], str, str, tuple[str, ...]]) -> dict:
    method, seed, order, work_dir, runs_dir, settings = job
    from trainables.engine import run_sequence

    name = f"{method}-seed{seed}-{'_'.join(order)}"
    config = _config(method, seed, list(order), settings)
    result = run_sequence(config, Path(work_dir), Path(runs_dir) / name, log=lambda _: None)
    result["order"] = list(order)
    result["gen_acc_final"], result["gen_fd_final"] = result["gen_acc"][-1], result["gen_fd"][-1]
    return result


def main() -> None:
    from trainables.methods import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--reference", default="mode", help="the method the paired differences are taken from")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work-dir", default="mode-cl-work")
    parser.add_argument("--out", default="mode-cl-work/benchmarks/digits_methods")
    parser.add_argument("--runs", help="each run's checkpoints and results.json (default: OUT/runs)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--summarize", action="store_true", help="only table the runs already in OUT")
    args = parser.parse_args()

    from trainables.benchmarks import prepare
    from trainables.config import load_run_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "all_results.jsonl"
    done = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    order = list(load_run_config(ROOT / "search_spaces" / "digits.yaml").tasks)
    orders = [tuple(order), tuple(reversed(order))]
    settings = tuple(args.settings)
    planned = {  # seed by seed, so that an interrupted benchmark holds whole seeds of every method
        (m, s, o): _config(m, s, list(o), settings).config_hash()
        for s in args.seeds
        for o in orders
        for m in args.methods
    }
    finished = {r["config_hash"] for r in done}  # a run counts only with the very config asked for now
    jobs = [
        (m, s, o, args.work_dir, args.runs or str(out / "runs"), settings)
        for (m, s, o), config_hash in planned.items()
        if config_hash not in finished
    ]
    started = time.perf_counter()
    if jobs and not args.summarize:
        for seed in dict.fromkeys(job[1] for job in jobs):  # data and base model of each seed, once
            prepare(_config(args.methods[0], seed, order, settings), Path(args.work_dir))
        with (
            ProcessPoolExecutor(max_workers=args.jobs, mp_context=SPAWN) as pool,
            record.open("a") as sink,
        ):
            for future in as_completed([pool.submit(_one, job) for job in jobs]):
                result = future.result()
                done.append(result)
                sink.write(json.dumps(result) + "\n")
                sink.flush()
                print(f"done: {result['method']} seed {result['seed']} {result['order'][0]} first "
                      f"({result['profile']['seconds']['total']:.0f} s)", flush=True)  # fmt: skip
    wall = time.perf_counter() - started
    wanted = set(planned.values())
    results = [r for r in done if r["config_hash"] in wanted]
    if not results:
        raise SystemExit(f"no finished runs in {record}")
    devices = sorted({r["config"]["resources"].get("use_gpu", False) for r in results})
    counts = sorted({sum(r["method"] == m for r in results) for m in args.methods})
    header = (
        f"digits, search_spaces/digits.yaml, seeds {sorted({r['seed'] for r in results})} × orders "
        f"{[' → '.join(o) for o in orders]}; runs per method {counts}; this invocation's wall {wall:.0f} s, "
        f"{args.jobs} in parallel; use_gpu {devices}" + (f"; overrides {' '.join(settings)}" if settings else "")
    )
    # The table is `mode-cl report`'s, over exactly the runs asked for now (without per-step losses).
    table = out / "table.jsonl"
    table.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k not in ("losses", "task_log")}) + "\n" for r in results)
    )
    from orchestrator.report import report_groups

    print(header)
    baseline = f"method.name={args.reference}" if args.reference in args.methods else None
    report_groups(table, ["method.name"], baseline, None, "markdown", str(out / "summary.md"))
    (out / "summary.md").write_text(header + "\n\n" + (out / "summary.md").read_text())
    print((out / "summary.md").read_text())
    print(f"mode-cl report {table} --group-by method.name" + (f" --baseline {baseline}" if baseline else ""))


if __name__ == "__main__":
    main()
