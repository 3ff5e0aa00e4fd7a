"""Replay: what the memory holds (quota, reservoir), how it is mixed into a batch, and exact resume."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import trainables.methods.replay as replay_module
from tests.conftest import MICRO_RUN
from trainables.batching import Batch, SampleSet
from trainables.benchmarks import open_benchmark
from trainables.config import load_run_config
from trainables.distributed import Distributed
from trainables.engine import run_sequence
from trainables.losses import IGNORE_INDEX, answer_labels, task_loss
from trainables.methods import MethodConfig, build_method
from trainables.methods.replay import Replay, replay_rows
from trainables.run_context import PhaseTimer, RunContext

THREE_TASKS = [
    *MICRO_RUN,
    "tasks=[parity, bigsmall, prime]",
    # method.name, not method=replay: the short form replaces the method section, dropping method.r.
    "method.name=replay",
    "method.replay_per_task=5",
    "eval.generation=base_and_final",  # generation scores are not what this file tests: sample less
    "checkpoint.every_steps=2",
    "checkpoint.num_to_keep=0",
]


def _comparable(results) -> str:
    # As JSON text: the stages without generation scores hold NaN, which never equals itself.
    return json.dumps({k: v for k, v in results.items() if k not in ("task_log", "profile")}, sort_keys=True)


def _memory(checkpoint: Path) -> Replay:
    """A replay method holding the memory stored in ``checkpoint``."""
    method = build_method(MethodConfig(name="replay"), None)
    method.load_state_dict(torch.load(checkpoint / "adapter" / "method_state.pt", weights_only=True))
    return method


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, micro_work_dir):
    """The uninterrupted 3-task micro run (3 steps a task, a checkpoint every 2 steps), with every
    step's replay batch and the rows of every batch the task loss saw."""
    root = tmp_path_factory.mktemp("replay")
    config = load_run_config(None, THREE_TASKS)
    steps, loss_rows = [], []
    extra_batches, loss = Replay.extra_batches, replay_module.task_loss

    def recording_extra(self, model, task_index, step, run):
        extra = extra_batches(self, model, task_index, step, run)
        steps.append((task_index, step, extra.get("replay")))
        return extra

    def recording_loss(model, input_ids, attention_mask, is_generation, token_ids):
        loss_rows.append(input_ids.shape[0])
        return loss(model, input_ids, attention_mask, is_generation, token_ids)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Replay, "extra_batches", recording_extra)
        patch.setattr(replay_module, "task_loss", recording_loss)
        results = run_sequence(config, micro_work_dir, root / "full", log=lambda _: None)
    bench = open_benchmark(config, micro_work_dir, lambda _: None, False)
    train_sets = [bench.train_set(task) for task in config.tasks]
    return SimpleNamespace(
        config=config,
        root=root,
        work=micro_work_dir,
        results=results,
        steps=steps,
        loss_rows=loss_rows,
        train_sets=train_sets,
    )


def test_quota_keeps_exactly_replay_per_task_train_samples_of_each_finished_task(full_run):
    checkpoints = full_run.root / "full" / "checkpoints"
    assert _memory(checkpoints / "ckpt_t00_s000000").sequences == []
    assert _memory(checkpoints / "ckpt_t01_s000002").tasks == [0] * 5  # inside task 2: task 1's quota
    memory = _memory(checkpoints / "ckpt_t03_s000000")
    assert memory.tasks == [0] * 5 + [1] * 5  # none of the last task: nothing trains after it
    for task in (0, 1):
        train = full_run.train_sets[task]
        kept = [
            (s, g) for s, g, t in zip(memory.sequences, memory.is_generation, memory.tasks, strict=True) if t == task
        ]
        indices = [train.sequences.index(s) for s, _ in kept]  # raises when a sample is no train sample
        assert len(set(indices)) == 5  # without replacement
        assert [g for _, g in kept] == [train.is_generation[i] for i in indices]
    # the two tasks' samples differ (each is the task's own question), so the quota is per task
    assert not set(map(tuple, memory.sequences[:5])) & set(map(tuple, full_run.train_sets[1].sequences))


def test_mixed_batch_has_the_replay_share_and_none_in_the_first_task(full_run):
    batch_size = full_run.config.train.batch_size
    k = round(0.25 * batch_size / 0.75)
    assert replay_rows(0.25, batch_size) == k == 5
    assert replay_rows(0.0, batch_size) == 0 and replay_rows(0.01, batch_size) == 1
    assert [(t, s) for t, s, _ in full_run.steps] == [(t, s) for t in range(3) for s in range(3)]
    assert len(full_run.loss_rows) == len(full_run.steps)
    memory = _memory(full_run.root / "full" / "checkpoints" / "ckpt_t03_s000000")
    for (task, _, replay), rows in zip(full_run.steps, full_run.loss_rows, strict=True):
        if task == 0:
            assert replay is None and rows == batch_size
            continue
        assert replay.input_ids.shape[0] == k and rows == batch_size + k
        replayed = [
            ids[mask.bool()].tolist() for ids, mask in zip(replay.input_ids, replay.attention_mask, strict=True)
        ]
        finished = [s for s, t in zip(memory.sequences, memory.tasks, strict=True) if t < task]
        assert all(s in finished for s in replayed)
        if task == 1:  # the memory holds exactly k samples: drawn without replacement, each once
            assert sorted(replayed) == sorted(finished)
    # different steps draw different memory rows (the draw is keyed by the step)
    draws = {tuple(map(tuple, r.input_ids.tolist())) for t, _, r in full_run.steps if t == 2}
    assert len(draws) > 1


def test_resume_inside_task_3_reproduces_the_run_and_its_memory(full_run, tmp_path):
    crashed = tmp_path / "crashed"
    shutil.copytree(full_run.root / "full", crashed)
    for directory in (crashed / "checkpoints").iterdir():
        if directory.name > "ckpt_t02_s000002":
            shutil.rmtree(directory)
    (crashed / "results.json").unlink()
    messages = []
    resumed = run_sequence(full_run.config, full_run.work, crashed, log=messages.append)
    assert any("resuming from checkpoint ckpt_t02_s000002: task 3, step 2" in m for m in messages)
    assert _comparable(resumed) == _comparable(full_run.results)
    final, reference = (root / "checkpoints" / "ckpt_t03_s000000" for root in (crashed, full_run.root / "full"))
    assert vars(_memory(final)) == vars(_memory(reference)) and _memory(final).tasks == [0] * 5 + [1] * 5
    for file in ("adapter.safetensors", "method_state.pt"):
        assert (final / "adapter" / file).read_bytes() == (reference / "adapter" / file).read_bytes(), file


def _fake_run(sizes: list[int], seed: int = 0, per_task: int = 4) -> RunContext:
    """A run context over synthetic tasks: sample j of task t is ``[t, j, j]`` (distinct everywhere),
    every third one a generation sample. Only what ``after_task`` and ``extra_batches`` read is real."""
    names = ["parity", "bigsmall", "prime", "square", "round", "fibonacci"][: len(sizes)]
    overrides = [
        f"tasks=[{', '.join(names)}]",
        "method.name=replay",
        "method.replay_policy=reservoir",
        f"method.replay_per_task={per_task}",
    ]
    config = dataclasses.replace(load_run_config(None, overrides), seed=seed)
    sets = {
        name: SampleSet([[t, j, j] for j in range(n)], [j % 3 == 0 for j in range(n)], 0)
        for t, (name, n) in enumerate(zip(names, sizes, strict=True))
    }
    bench = SimpleNamespace(train_set=sets.__getitem__)
    return RunContext(config, Path("."), bench, torch.device("cpu"), Distributed(), lambda _: None, PhaseTimer())


def test_reservoir_respects_its_capacity_and_keeps_only_finished_tasks():
    sizes = [30, 7, 50, 20]
    run = _fake_run(sizes)
    method = build_method(run.config.method, None)
    capacity = 4 * (len(sizes) - 1)
    assert method.capacity(len(sizes)) == capacity == 12
    for task in range(len(sizes)):
        method.after_task(None, task, run)
        finished = min(task, len(sizes) - 2)  # the last task adds nothing
        assert method.seen == sum(sizes[: finished + 1])
        assert len(method.sequences) == min(capacity, method.seen)
        assert len(set(map(tuple, method.sequences))) == len(method.sequences)  # no sample twice
        for sequence, is_generation, source in zip(method.sequences, method.is_generation, method.tasks, strict=True):
            assert source <= finished and sequence[0] == source and sequence[1] < sizes[source]
            assert is_generation == (sequence[1] % 3 == 0)
    assert set(method.tasks) == {0, 1, 2}  # after 87 samples each task has a share (here)


def test_reservoir_keeps_every_sample_seen_with_equal_probability():
    """Two tasks of 40 samples, capacity 8: each task's expected share is ½ (a memory that kept the
    first or the last task's samples would give 1 or 0)."""
    shares = []
    for seed in range(200):
        run = _fake_run([40, 40, 5], seed=seed)
        method = build_method(run.config.method, None)
        method.after_task(None, 0, run)
        assert method.tasks == [0] * 8
        method.after_task(None, 1, run)
        shares.append(method.tasks.count(0) / 8)
    mean = sum(shares) / len(shares)
    assert 0.45 < mean < 0.55, mean
    assert min(shares) < 0.25 and max(shares) > 0.75  # random, not a fixed split


@pytest.mark.parametrize("policy", ["quota", "reservoir"])
def test_memory_round_trips_through_a_checkpoint_and_fills_on_identically(policy):
    run = _fake_run([30, 7, 50, 20])
    config = dataclasses.replace(run.config.method, replay_policy=policy)
    whole = build_method(config, None)
    for task in range(3):
        whole.after_task(None, task, run)
    interrupted = build_method(config, None)
    interrupted.after_task(None, 0, run)
    interrupted.after_task(None, 1, run)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    restored = build_method(config, None)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert vars(restored) == vars(interrupted)
    restored.after_task(None, 2, run)
    assert vars(restored) == vars(whole)
    assert len(whole.sequences) == 12
    if policy == "quota":
        assert whole.tasks == [0] * 4 + [1] * 4 + [2] * 4
    restored.load_state_dict({})  # a checkpoint without method state: an empty memory
    assert restored.sequences == [] and restored.seen == 0


def test_extra_batches_draw_the_replay_share_of_this_rank(ids):
    run = _fake_run([30, 7, 50, 20])
    method = build_method(dataclasses.replace(run.config.method, replay_policy="quota", replay_ratio=0.5), ids)
    assert method.extra_batches(None, 0, 0, run) == {}  # empty memory: the first task
    method.after_task(None, 0, run)
    method.after_task(None, 1, run)
    extra = method.extra_batches(None, 2, 3, run)
    batch_size = run.config.train.batch_size
    assert extra["replay"].input_ids.shape[0] == batch_size  # ρ = ½: as many memory rows as task rows
    again = method.extra_batches(None, 2, 3, run)["replay"]
    assert torch.equal(again.input_ids, extra["replay"].input_ids)  # keyed by (task, step): a resume draws it again
    assert not torch.equal(method.extra_batches(None, 2, 4, run)["replay"].input_ids, again.input_ids)
    run.dist.rank, run.dist.world = 1, 2
    half = method.extra_batches(None, 2, 3, run)["replay"]
    assert torch.equal(half.input_ids, extra["replay"].input_ids[1::2, : half.input_ids.shape[1]])


def test_mixed_loss_is_the_token_mean_of_both_batches_and_padding_is_inert(make_model, ids, seq):
    method = build_method(MethodConfig(name="replay", lora_r=2, dropout=0.0), ids)
    model = method.attach(make_model()).eval()
    task_rows = [seq.understanding([1, 2], "is this even", "odd"), seq.understanding([3], "is this even", "even")]
    long_answer = "three two one zero"
    memory_rows = [
        seq.understanding([1, 2, 3, 4, 5, 6], "what digit is this", long_answer),
        seq.generation("draw", [7]),
    ]

    def batch(rows, flags):
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [ids.pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return Batch(input_ids, mask, torch.tensor(flags))

    task, memory = batch(task_rows, [False, False]), batch(memory_rows, [False, True])
    assert memory.input_ids.shape[1] > task.input_ids.shape[1]  # the task rows get padded wider

    def answers(b):
        return int((answer_labels(b.input_ids, b.attention_mask, ids.separator)[:, 1:] != IGNORE_INDEX).sum())

    with torch.no_grad():
        alone = task_loss(model, task.input_ids, task.attention_mask, task.is_generation, ids)
        wide = replay_module.pad_to(task, memory.input_ids.shape[1], ids.pad)
        padded = task_loss(model, wide.input_ids, wide.attention_mask, wide.is_generation, ids)
        replayed = task_loss(model, memory.input_ids, memory.attention_mask, memory.is_generation, ids)
        mixed = method.loss_terms(model, task, replay=memory)
        plain = method.loss_terms(model, task)
    assert set(mixed) == {"task"} and torch.equal(plain["task"], alone)
    assert padded.item() == pytest.approx(alone.item(), rel=1e-5)
    n_task, n_memory = answers(task), answers(memory)
    expected = (n_task * alone + n_memory * replayed) / (n_task + n_memory)
    assert mixed["task"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(mixed["task"].item() - alone.item()) > 1e-3  # the memory rows count
