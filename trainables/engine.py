"""The continual-learning engine: one method, one task order → accuracy matrix and generation metrics.

Plain Python, no Ray: the CLI's in-process path, the tests and the Ray Train worker call
:func:`run_sequence`. It knows benchmarks only through :class:`trainables.benchmarks.Benchmark`
and methods only through the hooks of :class:`trainables.methods.Method`. Order of work:

    set up (benchmark opened, base model loaded, method attached and set up) → restore
    → evaluate stage 0 (base) → for each task: train it (fresh AdamW + warmup-cosine, the
    method's loss terms) → evaluate the stage → checkpoint → results from the progress
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from trainables.batching import to_device
from trainables.benchmarks import Benchmark, open_benchmark
from trainables.checkpoint import LoadedCheckpoint, LocalCheckpointer, Progress
from trainables.config import RunConfig
from trainables.distributed import Distributed
from trainables.methods import Method, build_method
from trainables.results import metrics_so_far, results_from_progress, write_predictions, write_results
from trainables.run_context import Log, PhaseTimer, RunContext, seeded_generator

METHOD_STATE = "method_state.pt"  # inside a checkpoint's adapter directory, when the method keeps state


def evaluate_stage(bench: Benchmark, model: torch.nn.Module, config: RunConfig, stage: int, dist: Distributed):
    """One stage's accuracy row and generation scores, on the schedule ``config.eval`` asks for.
    A ``sharded_eval`` benchmark is called on every rank and shares the work; otherwise rank 0
    evaluates and broadcasts."""
    tasks, generation = config.eval.stage_plan(stage, len(config.tasks))
    if bench.sharded_eval:
        return bench.evaluate(model, stage, tasks, generation, dist)
    return dist.from_rank0(bench.evaluate(model, stage, tasks, generation, None) if dist.rank == 0 else None)


def fused_adamw(params: list[torch.nn.Parameter]) -> bool:
    """Whether AdamW can take its fused kernel (one pass over all parameters instead of a dozen
    small ops per tensor: 2.5 → 0.6 ms a step for the digits adapters on one CPU thread); the
    same update up to float rounding."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def save_method(method: Method, model: torch.nn.Module, directory: Path) -> None:
    """The method's adapter and, if it keeps any, its other state (one checkpoint directory)."""
    method.save(model, directory)
    state = method.state_dict()
    if state:
        torch.save(state, Path(directory) / METHOD_STATE)


def load_method(method: Method, model: torch.nn.Module, directory: Path) -> None:
    method.load(model, directory)
    path = Path(directory) / METHOD_STATE
    method.load_state_dict(torch.load(path, weights_only=True) if path.is_file() else {})


@dataclass
class Session:
    """A run in progress: its surroundings, method, model and where it stands."""

    run: RunContext
    method: Method
    model: torch.nn.Module
    progress: Progress
    restored: LoadedCheckpoint | None
    checkpointer: Any

    def save(self, optimizer_state: dict[str, Any] | None) -> None:
        if self.checkpointer is None:
            return
        with self.run.timer("checkpoint"):
            self.checkpointer.save(
                self.progress,
                lambda directory: save_method(self.method, self.model, directory),
                optimizer_state,
                metrics_so_far(self.run.config, self.progress),
            )

    def evaluate(self, stage: int) -> tuple[list[float], dict[str, float]]:
        with self.run.timer("evaluate"), self.method.evaluation(self.model):
            row, scores = evaluate_stage(self.run.bench, self.model, self.run.config, stage, self.run.dist)
        self.progress.acc_matrix.append(row)
        self.progress.generation.append(scores)
        return row, scores


def set_up(
    config: RunConfig, work_dir: Path, log: Log, timer: PhaseTimer
) -> tuple[RunContext, Method, torch.nn.Module]:
    """Open the benchmark, load the frozen base model, attach and set up the method."""
    dist = Distributed()
    device = torch.device("cuda" if config.resources.use_gpu and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(config.resources.cpus_per_worker)
    bench = open_benchmark(config, Path(work_dir), log, dist.rank == 0, timer)
    run = RunContext(config, Path(work_dir), bench, device, dist, log, timer)
    with timer("model"):
        method = build_method(config.method, bench.ids)
        model = bench.prepare_model(method.attach(bench.load_base_model()).to(device))
    method.setup(model, run)
    return run, method, model


def restore(config: RunConfig, checkpointer, method: Method, model: torch.nn.Module, run: RunContext):
    """(progress, restored checkpoint or None): the newest good checkpoint's, or a fresh start."""
    with run.timer("restore"):
        restored = checkpointer.restore() if checkpointer is not None else None
    if restored is None:
        return Progress(config_hash=config.config_hash(), config=config.to_dict()), None
    progress = restored.progress
    if progress.config_hash != config.config_hash():
        raise ValueError(
            f"checkpoint {restored.directory} belongs to a different config "
            f"(hash {progress.config_hash} vs {config.config_hash()}); use another --out/--name"
        )
    load_method(method, model, restored.directory / "adapter")
    restored.restore_rng()
    run.log(f"resuming from checkpoint {restored.directory.name}: task {progress.next_task + 1}, step {progress.step}")
    return progress, restored


def train_task(session: Session, task_index: int, on_step: Callable[[int, int], None] | None) -> int:
    """Train task ``task_index`` from where the progress stands to its last step; returns the
    number of optimizer steps per epoch."""
    run, method, model, progress = session.run, session.method, session.model, session.progress
    config, train, dist = run.config, run.config.train, run.dist
    with run.timer("data"):
        samples = run.bench.train_set(config.tasks[task_index])
    per_epoch = -(-len(samples) // train.batch_size)
    total_steps = train.epochs * per_epoch
    restored = session.restored
    resuming = progress.step > 0 and restored is not None and bool(restored.optimizer_state)
    if not resuming:
        method.before_task(model, task_index, run)
    params = list(method.trainable_parameters(model))
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused_adamw(params))
    schedule = get_cosine_schedule_with_warmup(optimizer, int(train.warmup_ratio * total_steps), total_steps)
    if resuming:
        # The saved param group carries its ``fused`` flag: a task resumes on the kernel it began
        # with (bit-for-bit resume), the next task's optimizer is built as above.
        optimizer.load_state_dict(restored.optimizer_state["optimizer"])
        schedule.load_state_dict(restored.optimizer_state["schedule"])
        progress.task_log.append({"task": task_index, "event": "resume", "step": progress.step})
    else:
        progress.task_log.append({"task": task_index, "event": "start", "step": 0})
        progress.losses.append([])
    announce_resume = restored is not None  # the resume benchmark times until this first new step
    model.train()
    for step in range(progress.step, total_steps):
        step_started = time.perf_counter()
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(len(samples), generator=seeded_generator(config.seed, task_index, epoch, 0)).tolist()
        batch = to_device(
            samples.batch(dist.shard(order[position * train.batch_size :][: train.batch_size])), run.device
        )
        extra = method.extra_batches(model, task_index, step, run)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
            loss = sum(method.loss_terms(model, batch, **extra).values())
        optimizer.zero_grad()
        loss.backward()
        dist.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
        schedule.step()
        progress.losses[task_index].append(dist.mean(loss.item()))
        progress.step = step + 1
        run.timer.add("train", time.perf_counter() - step_started)
        if announce_resume:
            run.log(f"training again after the resume: task {task_index + 1}, step {progress.step} done")
            announce_resume = False
        if on_step is not None:
            with run.timer("tracking"):
                on_step(task_index, progress.step)
        every = config.checkpoint.every_steps
        if every > 0 and progress.step % every == 0 and progress.step < total_steps:
            session.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})
    method.after_task(model, task_index, run)
    return per_epoch


def run_sequence(
    config: RunConfig,
    work_dir: Path,
    out_dir: Path | None = None,
    log: Log = print,
    checkpointer: Any = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``config``'s task sequence and return its results.

    With ``out_dir`` and no ``checkpointer``, checkpoints go to ``out_dir/checkpoints`` and the run
    resumes from the newest good one; ``results.json`` is written to ``out_dir`` at the end.
    ``checkpointer`` is anything with ``restore()`` and ``save(progress, save_adapter,
    optimizer_state, metrics)`` (:class:`LocalCheckpointer`, the Ray worker's).
    """
    started, started_at = time.perf_counter(), time.time()
    timer = PhaseTimer()
    if checkpointer is None and out_dir is not None:
        checkpointer = LocalCheckpointer(Path(out_dir) / "checkpoints", config.checkpoint.num_to_keep, log)
    run, method, model = set_up(config, Path(work_dir), log, timer)
    progress, restored = restore(config, checkpointer, method, model, run)
    session = Session(run, method, model, progress, restored, checkpointer)
    if not progress.acc_matrix:
        row, scores = session.evaluate(0)
        log(f"stage 0 (base): acc {_fmt(row)}  gen acc {scores['accuracy']:.3f}  gen FD {scores['frechet']:.2f}")
        session.save(None)
    for task_index in range(progress.next_task, len(config.tasks)):
        task_started = time.perf_counter()
        per_epoch = train_task(session, task_index, on_step)
        row, scores = session.evaluate(task_index + 1)
        progress.task_log.append({"task": task_index, "event": "end", "step": progress.step})
        progress.next_task, progress.step = task_index + 1, 0
        session.restored = None
        session.save(None)
        log(
            f"stage {task_index + 1} ({config.tasks[task_index]}): "
            f"loss {np.mean(progress.losses[task_index][-per_epoch:]):.3f}  "
            f"acc {_fmt(row)}  gen acc {scores['accuracy']:.3f}  gen FD {scores['frechet']:.2f}  "
            f"[{time.perf_counter() - task_started:.1f}s]"
        )
    results = results_from_progress(config, progress)
    timer.seconds["total"] = time.perf_counter() - started
    results["profile"] = {
        "started_at": started_at,
        "seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if run.device.type == "cuda" else None,
    }
    log(f"sequence finished in {time.perf_counter() - started:.1f}s ({_fmt_timings(timer.seconds)})")
    if out_dir is not None and run.dist.rank == 0:
        write_results(results, Path(out_dir))
        write_predictions(progress, Path(out_dir))
    return results


def _fmt_timings(seconds: dict[str, float]) -> str:
    return ", ".join(f"{phase} {value:.1f}s" for phase, value in seconds.items() if phase != "total")


def _fmt(row: list[float]) -> str:
    return "[" + " ".join(f"{v:.2f}" if not math.isnan(v) else "—" for v in row) + "]"
