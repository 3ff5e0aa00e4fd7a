"""Turning Parquet rows into padded batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from trainables.methods import Batch, StreamBatch


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
