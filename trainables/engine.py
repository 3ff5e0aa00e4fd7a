"""The continual-learning engine: one method, one task order → accuracy matrix and generation metrics.

Plain Python, no Ray: the CLI's in-process path, the tests and (later) the Ray Train worker call
:func:`run_sequence`. Order of work:

    prepare data (cached) → base model (cached) → attach method → evaluate stage 0 (base)
    for each task i: fresh AdamW + warmup-cosine → train (task CE + method terms, e.g. λ·KD on
        the image stream) → evaluate every task and generation (stage i) → save adapter checkpoint
    → metrics of the accuracy matrix and of the generation scores per stage
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_cosine_schedule_with_warmup

from trainables import __version__
from trainables.base_model import load_base, pretrain_base
from trainables.batching import SampleSet
from trainables.checkpoint import LoadedCheckpoint, Progress, latest_good, list_checkpoints, prune, write_checkpoint
from trainables.config import RunConfig
from trainables.data.digits import GENERATION_TASK, SequenceBuilder, build_digits, data_hash, read_tasks, vocabulary
from trainables.data.tokenizers import PixelQuantizer
from trainables.evaluate import ReferenceClassifier, answer_accuracy, generation_scores
from trainables.methods import METHODS, build_method
from trainables.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer, inter_modal_forgetting
from trainables.mode.checkpointing import enable_activation_checkpointing
from trainables.teacher_cache import TeacherCache, load_or_build, model_fingerprint
from trainables.vocab import TokenIds

Log = Callable[[str], None]


def prepare_data(config: RunConfig, work_dir: Path) -> Path:
    """The benchmark's task file for ``config.data``, built once per data hash."""
    directory = Path(work_dir) / "data" / data_hash(config.data)
    if not (directory / "tasks.parquet").is_file():
        build_digits(directory, config.data)
    return directory / "tasks.parquet"


class DigitsBenchmark:
    """Everything evaluation needs, loaded once per run."""

    def __init__(self, config: RunConfig, task_file: Path) -> None:
        self.config = config
        self.builder = SequenceBuilder(vocabulary(config.data), PixelQuantizer(config.data.levels))
        self.ids: TokenIds = self.builder.ids
        self.task_file = task_file
        train_images = read_tasks(task_file, [GENERATION_TASK], "train")
        test_images = read_tasks(task_file, [GENERATION_TASK], "test")
        quantizer = self.builder.quantizer
        real_train = quantizer.decode(quantizer.encode(np.asarray(train_images.column("image").to_pylist())))
        labels = np.asarray(train_images.column("digit").to_pylist())
        self.reference = ReferenceClassifier.cached(real_train, labels, Path(task_file).parent)
        self.real_test_images = np.asarray(test_images.column("image").to_pylist())
        self.test_generation = SampleSet.from_table(test_images, self.ids.pad)
        # Distillation stream: image-only sequences (begin-image … end-image) of train images.
        spans = [self.builder.image_span(np.asarray(img)) for img in train_images.column("image").to_pylist()]
        self.stream = SampleSet(spans, [True] * len(spans), self.ids.pad)
        self.tests = {}
        for task in config.tasks:
            table = read_tasks(task_file, [task], "test")
            self.tests[task] = (table.column("input_ids").to_pylist(), table.column("answer_start").to_pylist())

    def train_set(self, task: str) -> SampleSet:
        return SampleSet.from_table(read_tasks(self.task_file, [task], "train"), self.ids.pad)

    def evaluate(
        self, model: torch.nn.Module, stage: int, tasks: Sequence[int], generation: bool = True
    ) -> tuple[list[float], dict[str, float]]:
        """Accuracy on each task in ``tasks`` (NaN for the others) and, if ``generation``, the
        generation scores (else NaN)."""
        model.eval()
        row = [
            answer_accuracy(model, *self.tests[task], self.builder) if index in tasks else math.nan
            for index, task in enumerate(self.config.tasks)
        ]
        if not generation:
            return row, {"accuracy": math.nan, "frechet": math.nan, "nll": math.nan}
        scores = generation_scores(
            model,
            self.builder,
            self.reference,
            self.real_test_images,
            self.test_generation,
            self.config.eval.gen_samples_per_digit,
            self.config.eval.gen_temperature,
            seed=self.config.seed * 1000 + stage,
        )
        return row, asdict(scores)


def build_benchmark(
    config: RunConfig,
    work_dir: Path,
    log: Log = print,
    show_progress: bool = True,
    timer: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> tuple[Any, Callable[[], torch.nn.Module]]:
    """The run's benchmark and a loader of its frozen base model: the embedded digits benchmark
    (data and tiny base model built and cached under ``work_dir``), or, when ``config.coin`` is set,
    CoIN data imported by ``mode-cl data import-coin`` on a Chameleon/Anole checkpoint."""
    timer = timer or (lambda phase: contextlib.nullcontext())
    if config.coin is not None:
        from transformers import ChameleonConfig

        from trainables.chameleon import load_chameleon, resolve_model_dir
        from trainables.coin_eval import CoinBenchmark

        coin = config.coin
        torch.manual_seed(config.seed)
        with timer("benchmark"):
            model_config = ChameleonConfig.from_pretrained(resolve_model_dir(coin.model, "coin.model"))
            bench = CoinBenchmark(config, model_config, log)
        return bench, lambda: load_chameleon(coin.model, coin.dtype, coin.attn_implementation, "coin.model")
    with timer("data"):
        task_file = prepare_data(config, work_dir)
    with timer("base_model"):
        base_dir = pretrain_base(config.base, config.data, task_file, Path(work_dir), show_progress=show_progress)
    torch.manual_seed(config.seed)
    with timer("benchmark"):
        bench = DigitsBenchmark(config, task_file)
    return bench, lambda: load_base(base_dir)


def summarize(tasks: list[str], acc_matrix: list[list[float]], generation: list[dict[str, float]]) -> dict[str, Any]:
    gen_acc = [g["accuracy"] for g in generation]
    gen_fd = [g["frechet"] for g in generation]
    return {
        "tasks": tasks,
        "acc_matrix": acc_matrix,
        "avg_acc": average_accuracy(acc_matrix),
        "forgetting": forgetting(acc_matrix),
        "bwt": backward_transfer(acc_matrix),
        "fwt": forward_transfer(acc_matrix),
        "gen_acc": gen_acc,
        "gen_fd": gen_fd,
        "gen_nll": [g["nll"] for g in generation],
        "inter_modal_forgetting": inter_modal_forgetting(gen_acc),
        "gen_fd_increase": gen_fd[-1] - gen_fd[0],
    }


class Distributed:
    """Rank/world of a torch.distributed group (world 1 without one). Ray Train sets the group up."""

    def __init__(self) -> None:
        initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world = torch.distributed.get_world_size() if initialized else 1
        self.rank = torch.distributed.get_rank() if initialized else 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's share of a global batch (ranks take interleaved samples)."""
        return indices[self.rank :: self.world]

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        for param in params:
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad)
                param.grad /= self.world

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        return float(total.item()) / self.world

    def from_rank0(self, value: Any) -> Any:
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


class LocalCheckpointer:
    """Checkpoints in a local (or shared) directory; used by ``--no-ray`` and the tests."""

    def __init__(self, root: Path, num_to_keep: int = 2, log: Log = print) -> None:
        self.root, self.num_to_keep, self.log = Path(root), num_to_keep, log

    def restore(self) -> LoadedCheckpoint | None:
        return latest_good(list_checkpoints(self.root), warn=lambda m: self.log(f"[yellow]warning:[/] {m}"))

    def save(self, progress: Progress, save_adapter, optimizer_state, metrics: dict[str, Any]) -> None:
        write_checkpoint(self.root / progress.name, progress, save_adapter, optimizer_state)
        prune(self.root, self.num_to_keep)


def _generator(*key: int) -> torch.Generator:
    """A generator seeded from ``key`` alone, so any step's data can be recomputed after a restart."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def _batch_order(config: RunConfig, task_index: int, epoch: int, size: int) -> list[int]:
    return torch.randperm(size, generator=_generator(config.seed, task_index, epoch, 0)).tolist()


def _stream_picks(config: RunConfig, task_index: int, step: int, size: int, count: int) -> list[int]:
    return torch.randint(size, (count,), generator=_generator(config.seed, task_index, step, 1)).tolist()


def _to(batch, device: torch.device):
    return dataclasses.replace(batch, **{k: v.to(device) for k, v in vars(batch).items() if v is not None})


def uses_teacher_cache(config: RunConfig) -> bool:
    method = config.method
    return method.kd_teacher == "cached" and method.kd_weight > 0 and METHODS[method.name].USES_KD


class PhaseTimer:
    """Wall seconds per phase of a run (summed over repeats), for the overhead breakdown."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started


def evaluate_stage(bench, model: torch.nn.Module, config: RunConfig, stage: int, dist: Distributed):
    """One stage's accuracy row and generation scores, on the schedule ``config.eval`` asks for.
    A benchmark whose ``evaluate`` takes ``dist`` (``SHARDED_EVAL``) is called on every rank and
    shares the work; otherwise rank 0 evaluates and broadcasts."""
    tasks, generation = config.eval.stage_plan(stage, len(config.tasks))
    if getattr(bench, "SHARDED_EVAL", False):
        return bench.evaluate(model, stage, tasks, generation, dist=dist)
    return dist.from_rank0(bench.evaluate(model, stage, tasks, generation) if dist.rank == 0 else None)


def _metrics_so_far(config: RunConfig, progress: Progress) -> dict[str, Any]:
    done = progress.next_task
    if done == 0:  # the base model: objective-style numbers exist already, forgetting does not
        generation = progress.generation[0]
        return {
            "tasks_done": 0,
            "avg_acc": float(np.mean(progress.acc_matrix[0])),
            "gen_acc": [generation["accuracy"]],
            "gen_fd": [generation["frechet"]],
            "gen_nll": [generation["nll"]],
        }
    matrix = [row[:done] for row in progress.acc_matrix[: done + 1]]
    summary = summarize(list(config.tasks[:done]), matrix, progress.generation[: done + 1])
    return {"tasks_done": done, **summary}


def run_sequence(
    config: RunConfig,
    work_dir: Path,
    out_dir: Path | None = None,
    log: Log = print,
    checkpointer: LocalCheckpointer | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``config``'s task sequence and return its results.

    With ``out_dir`` and no ``checkpointer``, checkpoints go to ``out_dir/checkpoints`` and the run
    resumes from the newest good one; ``results.json`` is written to ``out_dir`` at the end.
    """
    started = time.perf_counter()
    started_at = time.time()
    timer = PhaseTimer()
    dist = Distributed()
    device = torch.device("cuda" if config.resources.use_gpu and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(config.resources.cpus_per_worker)
    if checkpointer is None and out_dir is not None:
        checkpointer = LocalCheckpointer(Path(out_dir) / "checkpoints", config.checkpoint.num_to_keep, log)
    bench, load_base_model = build_benchmark(config, Path(work_dir), log, dist.rank == 0, timer)
    with timer("model"):
        method = build_method(config.method, bench.ids)
        base = load_base_model()
        base_fingerprint = model_fingerprint(base) if uses_teacher_cache(config) else None
        model = method.attach(base).to(device)
        if config.coin is not None and config.coin.gradient_checkpointing:
            enable_activation_checkpointing(model)
        params = list(method.trainable_parameters(model))

    teacher_cache: TeacherCache | None = None
    if base_fingerprint is not None:
        with timer("teacher_cache"):
            teacher_cache = load_or_build(
                Path(work_dir) / "teacher_cache",
                base_fingerprint,
                bench.stream,
                int(bench.ids.image_vocab_mask().sum()),
                config.method.kd_top_k,
                lambda ids, mask: method.teacher_logits(model, ids, mask),
                device,
                log,
            )

    with timer("restore"):
        restored = checkpointer.restore() if checkpointer is not None else None
    if restored is not None:
        progress = restored.progress
        if progress.config_hash != config.config_hash():
            raise ValueError(
                f"checkpoint {restored.directory} belongs to a different config "
                f"(hash {progress.config_hash} vs {config.config_hash()}); use another --out/--name"
            )
        method.load(model, restored.directory / "adapter")
        restored.restore_rng()
        log(f"resuming from checkpoint {restored.directory.name}: task {progress.next_task + 1}, step {progress.step}")
    else:
        progress = Progress(config_hash=config.config_hash(), config=config.to_dict())

    def save(optimizer_state: dict[str, Any] | None) -> None:
        if checkpointer is None:
            return
        with timer("checkpoint"):
            checkpointer.save(
                progress, lambda d: method.save(model, d), optimizer_state, _metrics_so_far(config, progress)
            )

    announce_resume = restored is not None  # the resume benchmark times until this first new step
    if not progress.acc_matrix:
        with timer("evaluate"):
            row, scores = evaluate_stage(bench, model, config, 0, dist)
        progress.acc_matrix.append(row)
        progress.generation.append(scores)
        log(f"stage 0 (base): acc {_fmt(row)}  gen acc {scores['accuracy']:.3f}  gen FD {scores['frechet']:.2f}")
        save(None)

    train = config.train
    for task_index in range(progress.next_task, len(config.tasks)):
        task = config.tasks[task_index]
        task_started = time.perf_counter()
        with timer("data"):
            samples = bench.train_set(task)
        per_epoch = -(-len(samples) // train.batch_size)
        total_steps = train.epochs * per_epoch
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        schedule = get_cosine_schedule_with_warmup(optimizer, int(train.warmup_ratio * total_steps), total_steps)
        if progress.step > 0 and restored is not None and restored.optimizer_state:
            optimizer.load_state_dict(restored.optimizer_state["optimizer"])
            schedule.load_state_dict(restored.optimizer_state["schedule"])
            progress.task_log.append({"task": task_index, "event": "resume", "step": progress.step})
        else:
            progress.task_log.append({"task": task_index, "event": "start", "step": 0})
            progress.losses.append([])
        model.train()
        for step in range(progress.step, total_steps):
            step_started = time.perf_counter()
            epoch, position = divmod(step, per_epoch)
            order = _batch_order(config, task_index, epoch, len(samples))
            batch = _to(samples.batch(dist.shard(order[position * train.batch_size :][: train.batch_size])), device)
            stream = None
            if method.USES_KD:
                picks = _stream_picks(config, task_index, step, len(bench.stream), train.batch_size)
                stream = bench.stream.stream_batch_of(dist.shard(picks))
                if teacher_cache is not None:
                    width = stream.input_ids.shape[1]
                    stream.teacher_logits, stream.teacher_index = teacher_cache.batch(dist.shard(picks), width)
                stream = _to(stream, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                terms = method.loss_terms(model, batch, stream)
                loss = sum(terms.values())
            optimizer.zero_grad()
            loss.backward()
            dist.average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
            optimizer.step()
            schedule.step()
            progress.losses[task_index].append(dist.mean(loss.item()))
            progress.step = step + 1
            timer.seconds["train"] = timer.seconds.get("train", 0.0) + time.perf_counter() - step_started
            if announce_resume:
                log(f"training again after the resume: task {task_index + 1}, step {progress.step} done")
                announce_resume = False
            if on_step is not None:
                with timer("tracking"):
                    on_step(task_index, progress.step)
            every = config.checkpoint.every_steps
            if every > 0 and progress.step % every == 0 and progress.step < total_steps:
                save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()})
        with timer("evaluate"):
            row, scores = evaluate_stage(bench, model, config, task_index + 1, dist)
        progress.acc_matrix.append(row)
        progress.generation.append(scores)
        progress.task_log.append({"task": task_index, "event": "end", "step": progress.step})
        progress.next_task, progress.step = task_index + 1, 0
        restored = None
        save(None)
        log(
            f"stage {task_index + 1} ({task}): loss {np.mean(progress.losses[task_index][-per_epoch:]):.3f}  "
            f"acc {_fmt(row)}  gen acc {scores['accuracy']:.3f}  gen FD {scores['frechet']:.2f}  "
            f"[{time.perf_counter() - task_started:.1f}s]"
        )
    results = results_from_progress(config, progress)
    timer.seconds["total"] = time.perf_counter() - started
    results["profile"] = {
        "started_at": started_at,
        "seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
    }
    log(f"sequence finished in {time.perf_counter() - started:.1f}s ({_fmt_timings(timer.seconds)})")
    if out_dir is not None and dist.rank == 0:
        write_results(results, Path(out_dir))
    return results


def results_from_progress(config: RunConfig, progress: Progress) -> dict[str, Any]:
    """The results of a finished sequence, from its final progress (same for every run path)."""
    return {
        **summarize(list(config.tasks), progress.acc_matrix, progress.generation),
        "method": config.method.name,
        "seed": config.seed,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "task_log": progress.task_log,
        "losses": progress.losses,
        "mode_cl_version": __version__,
    }


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    return tmp.replace(out_dir / "results.json")


def _fmt_timings(seconds: dict[str, float]) -> str:
    return ", ".join(f"{phase} {value:.1f}s" for phase, value in seconds.items() if phase != "total")


def _fmt(row: list[float]) -> str:
    return "[" + " ".join(f"{v:.2f}" for v in row) + "]"
