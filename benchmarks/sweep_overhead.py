"""Orchestration overhead of a sweep: Ray Tune + Ray Train + MLflow against the bare engine.

    python benchmarks/sweep_overhead.py [SPACE] [--trials N] [--work-dir DIR] [--keep-caches]
    python benchmarks/sweep_overhead.py --resume-only [--repeats N] [--keep-caches]

Measured in one run, on the trials of SPACE (default: the README's demo sweep; ``--trials N``
keeps its first N trials):
  1. back-to-back: the same trials one after the other with the in-process engine (no Ray, no MLflow);
  2. the sweep: ``mode-cl sweep`` on those trials (Ray Tune, Ray Train, embedded MLflow server);
  3. resume: a one-trial sweep killed (SIGKILL, whole process group) after its first task checkpoint,
     then ``mode-cl resume``: seconds until the first new training step;
and prints the sweep's wall time (target for the default sweep: ≤ 8 min), sweep wall / back-to-back
wall, the speedup from concurrent trials,
each trial's wall-time breakdown (engine phases + Ray Train worker start) and peak RSS per trial.
For the sweep and for each resume it also prints the CPU-seconds the whole machine was busy
(``/proc/stat``, Linux), and the wall time that work alone needs on this machine's cores: a target
below that bound cannot be met by scheduling, only by removing work.
Data, base model and teacher cache are prepared once before anything is timed (all runs share
them, as trials of a sweep do).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from orchestrator.space import load_space
from trainables.engine import run_sequence

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODE_CL, RAY = str(BIN / "mode-cl"), str(BIN / "ray")
console = Console(width=120)


def subset_space(space_path: Path, count: int | None, target: Path, name: str) -> tuple[Path, list[dict]]:
    """A copy of the space holding only its first ``count`` trials (as explicit extra trials)."""
    space = load_space(space_path)
    if space.distributions:
        raise SystemExit("sweep_overhead: the space samples distributions; use a grid space")
    trials = space.trials[:count] if count else space.trials
    seeds = {t.get("seed", 0) for t in trials}
    if len(seeds) != 1:
        raise SystemExit("sweep_overhead: pick trials with one seed (use --trials)")
    data = yaml.safe_load(space_path.read_text())
    data["name"] = name
    data["run_config"] = str((space_path.parent / data.get("run_config", "")).resolve())
    data["grid"] = {}
    data["extra_trials"] = [{k: v for k, v in t.items() if k != "seed"} for t in trials]
    data["seeds"] = sorted(seeds)
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target, trials


def busy_cpu_seconds() -> float | None:
    """CPU-seconds the whole machine has been busy since boot (``/proc/stat``: user, nice, system,
    irq and softirq; not idle, iowait or steal), or None where there is no ``/proc/stat``."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def busy_since(before: float | None) -> float | None:
    """Busy CPU-seconds of the machine since ``before`` (a :func:`busy_cpu_seconds` reading)."""
    now = busy_cpu_seconds()
    return None if before is None or now is None else now - before


def cpu_line(what: str, wall: float, busy: float | None) -> str:
    """How much CPU ``what`` took machine-wide and the wall time that work needs on all cores."""
    if busy is None:
        return f"{what}: machine CPU not measured (no /proc/stat)"
    cores = os.cpu_count() or 1
    return (
        f"{what}: {busy:.1f} CPU-s machine-wide in {wall:.1f}s wall ({busy / wall:.2f} of {cores} cores busy "
        f"on average); that work alone needs ≥ {busy / cores:.1f}s on {cores} cores"
    )


def back_to_back(space_file: Path, trials: list[dict], work_dir: Path) -> tuple[float, list[dict]]:
    space = load_space(space_file)
    profiles = []
    started = time.perf_counter()
    for index, trial in enumerate(trials):
        config = space.trial_config(trial)
        results = run_sequence(config, work_dir, work_dir / "back_to_back" / str(index), log=lambda _: None)
        profiles.append(results["profile"])
        console.print(f"  back-to-back trial {index + 1}/{len(trials)}: {results['profile']['seconds']['total']:.1f}s")
    return time.perf_counter() - started, profiles


def sweep(space_file: Path, work_dir: Path, name: str) -> tuple[float, float | None, list[dict]]:
    """The sweep's wall seconds, the machine's busy CPU-seconds meanwhile, and each trial's profile."""
    from mlflow.tracking import MlflowClient

    started, busy_before = time.perf_counter(), busy_cpu_seconds()
    command = [MODE_CL, "sweep", str(space_file), "--name", name, "--work-dir", str(work_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    wall, busy = time.perf_counter() - started, busy_since(busy_before)
    if result.returncode != 0:
        raise SystemExit(f"sweep failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{work_dir / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name)
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    profiles = []
    for child in children:
        metrics = child.data.metrics
        seconds = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("time_s/")}
        trial_wall = (child.info.end_time - child.info.start_time) / 1000 if child.info.end_time else None
        profiles.append({"seconds": seconds, "peak_rss_mb": metrics.get("peak_rss_mb"), "run_wall": trial_wall})
    return wall, busy, profiles


def resume_latency(space_file: Path, work_dir: Path, name: str, trace: bool = False) -> tuple[float, float | None]:
    """Seconds from ``mode-cl resume`` to the first new training step, and the CPU-seconds the
    machine was busy in that time (None without ``/proc/stat``)."""
    common = ["--work-dir", str(work_dir)]
    log_path = work_dir / f"{name}-first.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [MODE_CL, "sweep", str(space_file), "--name", name, *common],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    train_dir = work_dir / "sweeps" / name / "train"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None:
        if list(train_dir.glob("train-*/ckpt_t01_s000000/manifest.json")):
            break
        time.sleep(0.2)
    else:
        raise SystemExit(f"no first-task checkpoint appeared:\n{log_path.read_text()[-3000:]}")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    subprocess.run([RAY, "stop", "--force"], capture_output=True, check=False)
    started, busy_before = time.perf_counter(), busy_cpu_seconds()
    resumed = subprocess.Popen(
        # --verbose: the worker's "training again" line reaches the terminal only with it
        [MODE_CL, "resume", name, "--verbose", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    latency = busy = None
    for line in resumed.stdout:
        if trace:  # where the seconds go: each line of `mode-cl resume` with its time since launch
            print(f"{time.perf_counter() - started:6.1f}s  {line.rstrip()}", flush=True)
        if "training again after the resume" in line:
            latency, busy = time.perf_counter() - started, busy_since(busy_before)
            break
    os.killpg(resumed.pid, signal.SIGKILL)  # the rest of the trial is not what is measured
    resumed.wait()
    subprocess.run([RAY, "stop", "--force"], capture_output=True, check=False)
    if latency is None:
        raise SystemExit("mode-cl resume never reached a training step")
    return latency, busy


def phase_table(title: str, profiles: list[dict]) -> Table:
    phases = sorted({p for profile in profiles for p in profile["seconds"]}, key=lambda p: (p == "total", p))
    table = Table(title=title)
    table.add_column("phase")
    table.add_column("mean s/trial", justify="right")
    table.add_column("share of engine total", justify="right")
    total = statistics.mean(p["seconds"].get("total", 0.0) for p in profiles)
    for phase in phases:
        mean = statistics.mean(p["seconds"].get(phase, 0.0) for p in profiles)
        share = "" if phase == "worker_start" else f"{100 * mean / total:.1f}%"
        table.add_row(phase, f"{mean:.1f}", share)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("space", nargs="?", default=str(ROOT / "search_spaces" / "digits_sweep.yaml"))
    parser.add_argument("--trials", type=int, help="use the space's first N trials (default: all)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "mode-cl-work" / "bench_overhead")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--resume-only", action="store_true", help="measure only `mode-cl resume` → first step, with a timed trace"
    )
    parser.add_argument("--repeats", type=int, default=1, help="with --resume-only: measure it this many times")
    parser.add_argument(
        "--keep-caches", action="store_true", help="keep the work dir's data, base model and teacher cache"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    work_dir = args.work_dir.resolve()
    # --keep-caches keeps data, base model and teacher cache, never the runs' own folders:
    # run_sequence would resume a finished back-to-back run from them.
    stale = [work_dir / "back_to_back", work_dir / "warm"] if args.keep_caches else [work_dir]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    space_file, trials = subset_space(Path(args.space), args.trials, work_dir / "space.yaml", f"overhead-{stamp}")
    one_trial, _ = subset_space(Path(args.space), 1, work_dir / "resume_space.yaml", f"resume-{stamp}")
    if args.resume_only:
        # The first measurement prints its trace; each one kills and resumes a sweep of its own.
        measured = [
            resume_latency(one_trial, work_dir, f"resume-{stamp}-{index}", trace=index == 0)
            for index in range(args.repeats)
        ]
        latencies = [latency for latency, _ in measured]
        each = ", ".join(f"{s:.1f}" for s in latencies)
        console.print(
            f"mode-cl resume → first new training step: median {statistics.median(latencies):.1f}s "
            f"(each: {each}; target ≤ 15 s)"
        )
        for index, (latency, busy) in enumerate(measured, start=1):
            console.print(cpu_line(f"resume {index}, command → first step", latency, busy))
        return
    console.print(f"[bold]sweep overhead[/]: {len(trials)} trials of {args.space}; work dir {work_dir}")

    # Warm every shared cache (data, base model, teacher cache) outside the timings.
    warm = load_space(space_file).trial_config({**trials[0], "train.epochs": 1})
    run_sequence(warm, work_dir, work_dir / "warm", log=lambda _: None)

    b2b_wall, b2b_profiles = back_to_back(space_file, trials, work_dir)
    console.print(f"back-to-back in-process: {b2b_wall:.1f}s")
    sweep_wall, sweep_busy, sweep_profiles = sweep(space_file, work_dir, f"overhead-{stamp}")
    console.print(f"mode-cl sweep: {sweep_wall:.1f}s")
    resume_s, resume_busy = resume_latency(one_trial, work_dir, f"resume-{stamp}")

    console.print(phase_table("in-process engine, per trial", b2b_profiles))
    console.print(phase_table("inside the sweep (Ray Train worker), per trial", sweep_profiles))
    engine_mean = statistics.mean(p["seconds"]["total"] for p in sweep_profiles)
    run_walls = [p["run_wall"] for p in sweep_profiles if p["run_wall"]]
    rss = [p["peak_rss_mb"] for p in sweep_profiles if p["peak_rss_mb"]]
    concurrency = load_space(space_file).max_concurrent_trials
    ratio = sweep_wall / b2b_wall
    lines = [
        f"sweep wall: {sweep_wall / 60:.1f} min (target ≤ 8 min for the default sweep; {len(trials)} trials, "
        f"max {concurrency} concurrent); sweep wall / back-to-back wall: {ratio:.2f}",
        f"speedup of the sweep over back-to-back: {b2b_wall / sweep_wall:.2f}×",
        f"per trial: engine {engine_mean:.1f}s, MLflow child run open {statistics.mean(run_walls):.1f}s, "
        f"Ray Train worker start {statistics.mean(p['seconds'].get('worker_start', 0) for p in sweep_profiles):.1f}s",
        cpu_line("the sweep", sweep_wall, sweep_busy),
        f"mode-cl resume → first new training step: {resume_s:.1f}s  (target ≤ 15 s)",
        cpu_line("the resume, command → first step", resume_s, resume_busy),
        f"peak RSS per trial (Train worker): mean {statistics.mean(rss):.0f} MB, max {max(rss):.0f} MB",
    ]
    for line in lines:
        console.print(line)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {os.cpu_count()} CPUs {platform.processor() or platform.machine()}",
        "python": platform.python_version(),
        "trials": len(trials),
        "back_to_back_s": b2b_wall,
        "sweep_s": sweep_wall,
        "ratio": ratio,
        "sweep_busy_cpu_s": sweep_busy,
        "resume_to_first_step_s": resume_s,
        "resume_busy_cpu_s": resume_busy,
        "peak_rss_mb": rss,
        "sweep_profiles": sweep_profiles,
        "back_to_back_profiles": b2b_profiles,
        "summary": lines,
    }
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
