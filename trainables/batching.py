"""Turning Parquet rows into padded batches, and the batch types methods train on."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """A padded batch of task samples. ``is_generation[b]``: sample b's answer is an image."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    is_generation: torch.Tensor  # [B] bool


@dataclass
class StreamBatch:
    """A batch of the image-generation distillation stream (image spans only).

    ``teacher_logits`` (optional, from :mod:`trainables.teacher_cache`) are the frozen base model's
    image-vocabulary logits for these positions; ``teacher_index`` says which image-vocabulary
    entries they are when the cache holds only the teacher's top-K. Without them the teacher runs live.
    """

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    teacher_logits: torch.Tensor | None = None  # [B, S, K] fp32
    teacher_index: torch.Tensor | None = None  # [B, S, K] positions in the image vocabulary


def to_device(batch, device: torch.device):
    """A copy of ``batch`` (any of the dataclasses above) with every tensor on ``device``."""
    return dataclasses.replace(batch, **{k: v.to(device) for k, v in vars(batch).items() if v is not None})


def pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids ``[B, S]``, attention_mask ``[B, S]``)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


class SampleSet:
    """Token sequences of one or more tasks, batched in a seeded random order."""

    def __init__(self, sequences: list[list[int]], is_generation: list[bool], pad_id: int) -> None:
        if not sequences:
            raise ValueError("no samples: check the task names and the split")
        self.sequences, self.is_generation, self.pad_id = sequences, is_generation, pad_id

    @classmethod
    def from_table(cls, table, pad_id: int) -> SampleSet:
        return cls(table.column("input_ids").to_pylist(), table.column("is_generation").to_pylist(), pad_id)

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, indices: Sequence[int]) -> Batch:
        ids, mask = pad([self.sequences[i] for i in indices], self.pad_id)
        return Batch(ids, mask, torch.tensor([self.is_generation[i] for i in indices]))

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        order = torch.randperm(len(self), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size])

    def stream_batch_of(self, indices: Sequence[int]) -> StreamBatch:
        """The given samples as a distillation-stream batch (sequences used as they are)."""
        ids, mask = pad([self.sequences[i] for i in indices], self.pad_id)
        return StreamBatch(ids, mask)
