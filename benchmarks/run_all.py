"""Every performance benchmark in one run; prints each measured ratio next to its target.

    python benchmarks/run_all.py [--trials N] [--record]

Runs, one after the other on an otherwise idle machine: ``step_time.py`` (MoDE / LoRA step),
``official_step.py`` (official-style step / ours), ``cpu_fraction.py`` (achieved share of matmul
speed), ``budget.py`` (one-core engine time of a default MoDE and seq_lora run) and
``sweep_overhead.py`` (sweep wall time, sweep vs back-to-back, resume latency, peak RSS;
``--trials N`` uses the demo sweep's first N trials instead of all 10).
``--record`` appends the summary — date, machine, versions and the lines the scripts printed — to
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKERS = ("target", "speedup", "per trial:", "peak RSS", "machine speed", "| tiny", "| medium")


def run(script: str, *args: str) -> list[str]:
    print(f"\n$ python benchmarks/{script} {' '.join(args)}", flush=True)
    process = subprocess.Popen(
        [sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    kept = []
    for line in process.stdout:
        print(line, end="", flush=True)
        if any(marker in line for marker in MARKERS):
            kept.append(line.rstrip())
    if process.wait() != 0:
        raise SystemExit(f"{script} failed (exit {process.returncode})")
    return kept


def versions() -> str:
    import mlflow
    import peft
    import ray
    import torch
    import transformers

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, help="sweep_overhead on the demo sweep's first N trials")
    parser.add_argument("--record", action="store_true", help="append the summary to benchmarks/RESULTS.md")
    args = parser.parse_args()
    started = time.time()
    summary = run("step_time.py")
    summary += run("official_step.py")
    summary += run("cpu_fraction.py")
    summary += run("budget.py", "--methods", "mode", "seq_lora")
    summary += run("sweep_overhead.py", *(["--trials", str(args.trials)] if args.trials else []))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU" if not _has_gpu() else _gpu_name()
    header = [
        f"### {time.strftime('%Y-%m-%d')} — {machine}",
        "",
        f"`python benchmarks/run_all.py{f' --trials {args.trials}' if args.trials else ''}` "
        f"({(time.time() - started) / 60:.0f} min); {versions()}",
        "",
        "```",
        *summary,
        "```",
    ]
    print("\n" + "\n".join(header))
    if args.record:
        with (HERE / "RESULTS.md").open("a") as results:
            results.write("\n" + "\n".join(header) + "\n")
        print(f"appended to {HERE / 'RESULTS.md'}")


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()
