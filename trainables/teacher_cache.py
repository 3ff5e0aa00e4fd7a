"""The distillation teacher, computed once: the frozen base model's image-vocabulary logits on the
fixed image-generation stream, stored as Parquet and read by every step, task and trial.

The teacher is the *pre-trained* model (never the previous task's), and the stream is fixed, so its
logits depend only on (base model, stream, K). The cache key hashes exactly those:

    key = sha256(base-model fingerprint, stream token ids, K, image-vocabulary size)

Values are raw logits (before the temperature), so trials that differ only in β share one cache.
K is ``method.kd_top_k`` (the teacher's top-K ids per position and their positions in the image
vocabulary are stored) or, when null, the whole image vocabulary (no index stored).

Layout: ``<root>/<key>/teacher.parquet`` with one row per stream sample (``sample``, ``length``,
``logits`` = list<float32> of length×K, and ``index`` = list<int32> when top-K) and the key's inputs
in ``meta.json``. The directory is written under a temporary name and renamed when complete; a
file lock makes concurrent trials on one machine (or one shared filesystem) compute it once.
Size: samples × tokens × K × 4 bytes (× 2 with an index) — e.g. 1,400 digits × 66 × 10 = 3.7 MB;
for Anole streams use ``kd_top_k`` (the official code uses 256).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from trainables import __version__
from trainables.batching import SampleSet
from trainables.run_context import torch_threads

FORMAT_VERSION = 1
Log = Callable[[str], None]


def model_fingerprint(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """A content fingerprint of a (base) model: its config plus, for every tensor of its state dict,
    name, shape, dtype, float64 sum and sum of squares, and the exact bytes of its first and last
    16 values. One pass over the weights (fast on GPU, ~1 s per GB on CPU); two different
    checkpoints that agree on all of it are not a practical concern. ``state_dict`` replaces the
    model's own (e.g. the base weights inside an adapted model, under their base names)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # Where the weights were loaded from is not what they are: the same base read from another
        # folder (a relative or an absolute work dir, another node's path) must find the same cache.
        described = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
        digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted((model.state_dict() if state_dict is None else state_dict).items()):
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            if flat.numel() == 0:
                continue
            as_double = flat.double()
            digest.update(struct.pack("<dd", as_double.sum().item(), (as_double * as_double).sum().item()))
            ends = torch.cat([flat[:16], flat[-16:]]).cpu()
            digest.update(ends.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def stream_hash(sequences: Sequence[Sequence[int]]) -> str:
    """Hash of the stream's token ids, in order."""
    digest = hashlib.sha256()
    for sequence in sequences:
        digest.update(np.asarray(sequence, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def cache_key(base_fingerprint: str, stream_digest: str, top_k: int | None, image_vocab_size: int) -> str:
    k = image_vocab_size if top_k is None or top_k >= image_vocab_size else top_k
    payload = {"base": base_fingerprint, "stream": stream_digest, "k": k, "image_vocab": image_vocab_size}
    payload["format"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class TeacherCache:
    """Teacher logits of every stream sample, in memory: ``logits`` ``[positions, K]`` (all samples
    concatenated), ``index`` the same shape or None, ``offsets[i]`` where sample i starts."""

    def __init__(self, logits: torch.Tensor, index: torch.Tensor | None, lengths: list[int], key: str) -> None:
        self.logits, self.index, self.lengths, self.key = logits, index, lengths, key
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()

    @property
    def k(self) -> int:
        return self.logits.shape[1]

    def batch(self, indices: Sequence[int], width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (and index) of ``indices`` right-padded to ``width`` positions, as
        :meth:`SampleSet.stream_batch_of` pads their tokens: ``[B, width, K]``."""
        logits = torch.zeros(len(indices), width, self.k, dtype=self.logits.dtype)
        index = None if self.index is None else torch.zeros(len(indices), width, self.k, dtype=torch.int32)
        for row, sample in enumerate(indices):
            start, length = self.offsets[sample], self.lengths[sample]
            logits[row, :length] = self.logits[start : start + length]
            if index is not None:
                index[row, :length] = self.index[start : start + length]
        return logits, index

    @classmethod
    def read(cls, directory: Path) -> TeacherCache:
        meta = json.loads((directory / "meta.json").read_text())
        table = pq.read_table(directory / "teacher.parquet")
        k = meta["k"]
        lengths = table.column("length").to_pylist()
        flat = table.column("logits").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        logits = torch.from_numpy(np.array(flat, dtype=np.float32).reshape(-1, k))
        index = None
        if "index" in table.column_names:
            flat_index = table.column("index").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            index = torch.from_numpy(np.array(flat_index, dtype=np.int32).reshape(-1, k))
        if logits.shape[0] != sum(lengths):
            rows, expected = logits.shape[0], sum(lengths)
            raise ValueError(f"teacher cache {directory} is inconsistent ({rows} rows, {expected} expected)")
        return cls(logits, index, lengths, meta["key"])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def compute_teacher_logits(
    teacher_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    stream: SampleSet,
    top_k: int | None,
    device: torch.device,
    batch_size: int = 64,
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Per-sample teacher logits ``[length, K]`` (and top-K positions) for every stream sample.

    ``teacher_logits(input_ids, attention_mask)`` returns the base model's image-vocabulary logits,
    e.g. :meth:`trainables.methods.base.MoDEFamily.teacher_logits` bound to a model. Runs under the
    same bf16 autocast as training on GPU, so cached and live teachers see the same arithmetic.
    """
    values, positions = [], [] if top_k is not None else None
    for start in range(0, len(stream), batch_size):
        indices = list(range(start, min(start + batch_size, len(stream))))
        batch = stream.stream_batch_of(indices)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = teacher_logits(batch.input_ids.to(device), batch.attention_mask.to(device)).float()
        index = None
        if top_k is not None and top_k < logits.shape[-1]:
            logits, index = logits.topk(top_k, dim=-1)
        for row, sample in enumerate(indices):
            length = len(stream.sequences[sample])
            values.append(logits[row, :length].cpu().numpy())
            if positions is not None:
                positions.append(index[row, :length].to(torch.int32).cpu().numpy())
    return values, positions


def load_or_build(
    root: Path,
    base_fingerprint: str,
    stream: SampleSet,
    image_vocab_size: int,
    top_k: int | None,
    teacher_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    log: Log = print,
) -> TeacherCache:
    """The teacher cache for (base model, stream, K): read it, or compute and store it first.

    A cache that fails to read (truncated, tampered) is rebuilt with a warning.
    """
    top_k = None if top_k is not None and top_k >= image_vocab_size else top_k
    digest = stream_hash(stream.sequences)
    key = cache_key(base_fingerprint, digest, top_k, image_vocab_size)
    directory = Path(root) / key
    with _locked(Path(root) / f"{key}.lock"):
        if (directory / "meta.json").is_file():
            try:
                cache = TeacherCache.read(directory)
                if cache.lengths == [len(s) for s in stream.sequences]:
                    log(f"teacher cache {key}: read {len(cache.lengths)} stream samples (K={cache.k})")
                    return cache
                raise ValueError("sample lengths differ from the stream")
            except Exception as error:  # any unreadable cache is rebuilt, never trusted
                log(f"[yellow]warning:[/] teacher cache {directory} is unreadable ({error}); rebuilding it")
                shutil.rmtree(directory, ignore_errors=True)
        started = time.perf_counter()
        with torch_threads():  # the same bits whether a sweep's driver or a trial computes it
            values, positions = compute_teacher_logits(teacher_logits, stream, top_k, device)
        k = values[0].shape[1]
        columns = {
            "sample": pa.array(range(len(values)), pa.int32()),
            "length": pa.array([v.shape[0] for v in values], pa.int32()),
            "logits": pa.array([v.reshape(-1) for v in values], pa.list_(pa.float32())),
        }
        if positions is not None:
            columns["index"] = pa.array([p.reshape(-1) for p in positions], pa.list_(pa.int32()))
        meta = {
            "key": key,
            "k": k,
            "top_k": top_k,
            "image_vocab_size": image_vocab_size,
            "base_fingerprint": base_fingerprint,
            "stream_hash": digest,
            "samples": len(values),
            "format": FORMAT_VERSION,
            "mode_cl_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        partial = directory.with_name(f".{key}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        pq.write_table(pa.table(columns), partial / "teacher.parquet")
        (partial / "meta.json").write_text(json.dumps(meta, indent=2))
        partial.rename(directory)
        elapsed = time.perf_counter() - started
        log(f"teacher cache {key}: computed {len(values)} stream samples (K={k}) in {elapsed:.1f}s")
        index = None if positions is None else torch.from_numpy(np.concatenate(positions))
        return TeacherCache(torch.from_numpy(np.concatenate(values)), index, [v.shape[0] for v in values], key)
