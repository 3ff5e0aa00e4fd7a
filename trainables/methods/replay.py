"""Experience replay (rehearsal) on one shared LoRA.

Rehearsal keeps a small memory of earlier tasks' training samples and mixes them into every batch
of the later tasks, so the loss keeps scoring the old answers while the model learns new ones
(Robins 1995, "Catastrophic forgetting, rehearsal and pseudorehearsal"; Rolnick et al., NeurIPS
2019, "Experience Replay for Continual Learning"; Chaudhry et al. 2019, "On Tiny Episodic Memories
in Continual Learning", whose ER baseline this follows: a tiny memory, a random memory minibatch
concatenated to every task minibatch, one shared loss).

What :class:`Replay` does:

* **Adapter.** One peft LoRA carried across tasks, exactly as :class:`SeqLoRA` (same target
  modules, same parameter-matched rank rule): replay is ``seq_lora`` plus the memory, so the two
  compare at equal trainable parameters.
* **Memory.** Token sequences of finished tasks' *training* samples (from
  ``run.bench.train_set``), with their ``is_generation`` flag (which label space the loss uses)
  and the index of the task they came from. Filled in :meth:`Replay.after_task` of every task but
  the sequence's last (no task trains after it, so nothing would replay its samples):

  - ``quota``: exactly ``replay_per_task`` samples of every finished task (all of them when the
    task has fewer), drawn without replacement — the "tiny episodic memory" with a fixed budget
    per task, so every old task stays equally represented however long the sequence.
  - ``reservoir``: ``replay_per_task × (tasks − 1)`` samples (the quota memory's final size) kept
    by reservoir sampling (Vitter's algorithm R) over the stream of every finished task's training
    samples, each task's samples in a seeded order: after n samples seen, each is in the memory
    with probability capacity / n, so older tasks get a share in proportion to their size.

* **Mixing.** From the second task on, every step draws ``k = round(ρ·B / (1 − ρ))`` memory
  samples (``ρ = replay_ratio``, ``B = train.batch_size``, at least 1 when ρ > 0) and appends them
  to the task batch, so they are a share ρ of the mixed batch of B + k rows (up to rounding; the
  task batch keeps its B rows, so the current task trains exactly as many samples as without
  replay). The memory samples of a step are drawn without replacement (successive independent
  permutations of the memory when k exceeds its size), so no sample repeats within a batch
  unless the memory is smaller than k. The task loss
  (:func:`~trainables.losses.task_loss`, a mean over the answer tokens of the whole batch) is
  computed once on the mixed batch and returned as ``task``.

Exactness: the memory is filled after a task's last step, from that task's training set in an
order drawn from ``run.generator(task, 0, FILL)`` alone, so it is a pure function of the tasks
finished; it is the method's state (:meth:`Replay.state_dict`), written with every checkpoint,
because ``after_task`` does not run again for the tasks a resumed run has finished. Each step's
memory batch comes from ``run.generator(task, step, DRAW)``, so a resumed run draws the same rows.

Simplified vs the papers, and why:

* The reservoir is filled when a task ends rather than sample by sample while it trains. For a
  reservoir over the same stream order the result is the same (algorithm R only looks at the
  stream). What is lost is replaying the current task's own samples while it trains, which would
  only re-weight that task's loss. It also keeps the memory independent of the batch order and of
  where a run was resumed. The stream holds each
  training sample once (not once per epoch), so repeated epochs do not push older tasks out.
* Memory rows are mixed into one loss rather than given their own weighted term (as some ER
  variants do): with the per-token mean of :func:`~trainables.losses.task_loss` the memory's
  weight is its share of the mixed batch's answer tokens, which ``replay_ratio`` sets.
* Rolnick et al. (CLEAR) add behavioural cloning of the old policy to the replayed samples; this
  is plain rehearsal on the stored labels (their ablation without cloning).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from trainables.batching import Batch, pad, to_device
from trainables.losses import task_loss
from trainables.methods.base import MethodConfig
from trainables.methods.registry import register_method
from trainables.methods.seq_lora import SeqLoRA
from trainables.run_context import RunContext
from trainables.vocab import TokenIds

# Purpose ids of ``run.generator(task, step, purpose)``. The engine orders the task's samples with
# (task, epoch, 0) and MoDE draws its stream with (task, step, 1): replay keeps to ids of its own, so
# its draws are never the same stream as the batch order (a quota drawn with (task, 0, 0) would be
# the first samples of epoch 0's order).
FILL = 2  # which samples of a finished task enter the memory (step 0 of that task)
DRAW = 3  # which memory samples join the batch of one step


def replay_rows(ratio: float, batch_size: int) -> int:
    """Memory samples per step so that they are a share ``ratio`` of the mixed batch:
    k / (B + k) = ρ ⇔ k = ρ·B / (1 − ρ), rounded, and at least 1 when ρ > 0."""
    if ratio <= 0:
        return 0
    return max(1, round(ratio * batch_size / (1 - ratio)))


def pad_to(batch: Batch, width: int, pad_id: int) -> Batch:
    """``batch`` right-padded with ``pad_id`` (attention 0) to ``width`` columns. Padding is never
    scored (:func:`~trainables.losses.answer_labels` ignores masked positions) and, being on the
    right of a causal model, never attended to by a real position, so a sample's loss terms stay
    those of its own narrower batch."""
    extra = width - batch.input_ids.shape[1]
    if extra <= 0:
        return batch
    rows = batch.input_ids.shape[0]
    ids = batch.input_ids.new_full((rows, extra), pad_id)
    mask = batch.attention_mask.new_zeros((rows, extra))
    return Batch(
        torch.cat([batch.input_ids, ids], dim=1), torch.cat([batch.attention_mask, mask], dim=1), batch.is_generation
    )


def concatenate(first: Batch, second: Batch, pad_id: int) -> Batch:
    """The rows of ``first`` then those of ``second``, padded to a common width."""
    width = max(first.input_ids.shape[1], second.input_ids.shape[1])
    a, b = pad_to(first, width, pad_id), pad_to(second, width, pad_id)
    return Batch(
        torch.cat([a.input_ids, b.input_ids]),
        torch.cat([a.attention_mask, b.attention_mask]),
        torch.cat([a.is_generation, b.is_generation.to(a.is_generation.device)]),
    )


@register_method
class Replay(SeqLoRA):
    """Experience replay on one shared LoRA: a memory of finished tasks' training samples (``quota``
    or ``reservoir``, ``replay_per_task``) mixed into every later batch at a share ``replay_ratio``
    (see the module docstring)."""

    NAME = "replay"

    def __init__(self, config: MethodConfig, token_ids: TokenIds) -> None:
        super().__init__(config, token_ids)
        # The memory, one entry per sample, in the same order in the three lists.
        self.sequences: list[list[int]] = []
        self.is_generation: list[bool] = []
        self.tasks: list[int] = []
        # Reservoir only: how many samples the stream has offered so far (algorithm R's n).
        self.seen = 0

    def capacity(self, num_tasks: int) -> int:
        """The reservoir's size: the quota memory's size once every task but the last has finished."""
        return self.config.replay_per_task * max(num_tasks - 1, 0)

    def after_task(self, model: nn.Module, task_index: int, run: RunContext) -> None:
        """Add task ``task_index``'s training samples to the memory, by the configured policy."""
        if task_index == len(run.config.tasks) - 1:
            return  # no later task replays it (and the reservoir's stream order stays the same)
        samples = run.bench.train_set(run.config.tasks[task_index])
        generator = run.generator(task_index, 0, FILL)
        order = torch.randperm(len(samples), generator=generator).tolist()
        if self.config.replay_policy == "quota":
            for i in order[: self.config.replay_per_task]:
                self._append(samples.sequences[i], samples.is_generation[i], task_index)
            return
        capacity = self.capacity(len(run.config.tasks))
        for i in order:
            self.seen += 1
            if len(self.sequences) < capacity:
                self._append(samples.sequences[i], samples.is_generation[i], task_index)
                continue
            # Algorithm R: the n-th sample replaces a uniformly chosen slot with probability capacity / n.
            slot = int(torch.randint(self.seen, (1,), generator=generator))
            if slot < capacity:
                self.sequences[slot] = list(samples.sequences[i])
                self.is_generation[slot] = bool(samples.is_generation[i])
                self.tasks[slot] = task_index

    def _append(self, sequence: Sequence[int], is_generation: bool, task_index: int) -> None:
        self.sequences.append(list(sequence))
        self.is_generation.append(bool(is_generation))
        self.tasks.append(task_index)

    def draw(self, k: int, generator: torch.Generator) -> list[int]:
        """``k`` memory indices: successive random permutations of the memory, cut at ``k`` (no
        repeat within a batch while k ≤ the memory's size)."""
        picks: list[int] = []
        while len(picks) < k:
            picks += torch.randperm(len(self.sequences), generator=generator).tolist()
        return picks[:k]

    def extra_batches(self, model: nn.Module, task_index: int, step: int, run: RunContext) -> dict[str, Any]:
        """``{"replay": batch}``: this rank's share of the step's memory samples (none while the
        memory is empty, i.e. during the first task, or when ``replay_ratio`` is 0)."""
        k = replay_rows(self.config.replay_ratio, run.config.train.batch_size)
        if not self.sequences or k == 0:
            return {}
        mine = run.dist.shard(self.draw(k, run.generator(task_index, step, DRAW)))
        if not mine:
            return {}  # more ranks than memory rows: this rank's batch is the task's alone
        ids, mask = pad([self.sequences[i] for i in mine], self.token_ids.pad)
        batch = Batch(ids, mask, torch.tensor([self.is_generation[i] for i in mine], dtype=torch.bool))
        return {"replay": to_device(batch, run.device)}

    def loss_terms(
        self, model: nn.Module, batch: Batch, replay: Batch | None = None, **extra: Any
    ) -> dict[str, torch.Tensor]:
        """``task``: the answer CE of the task batch and the memory batch together (one forward)."""
        if replay is not None:
            batch = concatenate(batch, replay, self.token_ids.pad)
        return {"task": task_loss(model, batch.input_ids, batch.attention_mask, batch.is_generation, self.token_ids)}

    def state_dict(self) -> dict[str, Any]:
        """The memory as tensors (every sequence's tokens end to end, their lengths, flags and
        tasks) and the reservoir's count: compact, and loadable with ``weights_only=True``."""
        lengths = [len(s) for s in self.sequences]
        return {
            "tokens": torch.tensor([t for s in self.sequences for t in s], dtype=torch.long),
            "lengths": torch.tensor(lengths, dtype=torch.long),
            "is_generation": torch.tensor(self.is_generation, dtype=torch.bool),
            "tasks": torch.tensor(self.tasks, dtype=torch.long),
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a checkpoint written before the method kept state: an empty memory
            self.sequences, self.is_generation, self.tasks, self.seen = [], [], [], 0
            return
        expected = {"tokens", "lengths", "is_generation", "tasks", "seen"}
        if set(state) != expected:
            raise ValueError(f"replay state must hold {sorted(expected)}, got {sorted(state)}")
        lengths = state["lengths"].tolist()
        tokens = state["tokens"].tolist()
        if sum(lengths) != len(tokens) or not len(lengths) == len(state["is_generation"]) == len(state["tasks"]):
            raise ValueError("replay state is inconsistent: lengths, tokens, flags and tasks disagree")
        starts = [0, *itertools.accumulate(lengths)][:-1]
        self.sequences = [tokens[start : start + n] for start, n in zip(starts, lengths, strict=True)]
        self.is_generation = [bool(v) for v in state["is_generation"].tolist()]
        self.tasks = [int(v) for v in state["tasks"].tolist()]
        self.seen = int(state["seen"])
