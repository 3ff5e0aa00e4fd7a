"""The imported CoIN data on disk: a manifest, and per task and split a directory of Parquet shards
written atomically so an interrupted import continues where it stopped."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainables.benchmarks.coin.records import CoinInputError, load_image

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLIT_STATE = "_import.json"
GENERATION = "generation"
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source_line", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("answer_start", pa.int32()),
        ("is_generation", pa.bool_()),
        ("question", pa.string()),
        ("answers", pa.list_(pa.string())),
    ]
)


def vocabulary_hash(vocabulary_map: dict[str, int], separator_token: str) -> str:
    payload = json.dumps({"map": sorted(vocabulary_map.items()), "separator": separator_token})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _shard_done(path: Path, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        return pq.read_metadata(path).num_rows == rows
    except (OSError, pa.ArrowInvalid):
        return False  # a damaged file from outside this tool: rewritten


@dataclass
class SplitJob:
    """One output split: its records and how each record becomes a row."""

    directory: Path
    records: list
    state: dict[str, Any]
    make_rows: Callable[[list, list[list[int] | None]], list[dict[str, Any]]]
    needs_image: Callable[[Any], bool] = field(default=lambda record: record.image is not None)


def _prepare_split(job: SplitJob) -> None:
    """Create the split directory, or check that an earlier import of it used the same source/settings."""
    state_file = job.directory / SPLIT_STATE
    if state_file.is_file():
        previous = json.loads(state_file.read_text())
        if previous != job.state:
            changed = sorted(k for k in set(previous) | set(job.state) if previous.get(k) != job.state.get(k))
            raise CoinInputError(
                f"{job.directory}: already imported with different {', '.join(changed)}; "
                "delete that directory or import into another --out"
            )
        return
    job.directory.mkdir(parents=True, exist_ok=True)
    for stale in job.directory.glob("part-*.parquet"):  # shards without a state file are not ours to trust
        stale.unlink()
    _write_json_atomic(state_file, job.state)


def run_split(
    job: SplitJob,
    shard_size: int,
    batch_size: int,
    encode_images: Callable[[list], list[list[int]]] | None,
    advance: Callable[[int], None],
) -> dict[str, int]:
    """Write the missing shards of one split; returns its record and shard counts."""
    _prepare_split(job)
    shards = max(1, math.ceil(len(job.records) / shard_size))
    written = 0
    for index in range(shards):
        chunk = job.records[index * shard_size : (index + 1) * shard_size]
        target = job.directory / shard_name(index)
        if _shard_done(target, len(chunk)):
            advance(len(chunk))
            continue
        spans: list[list[int] | None] = [None] * len(chunk)
        pending = [i for i, record in enumerate(chunk) if job.needs_image(record)]
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            if encode_images is None:
                raise CoinInputError(f"{chunk[batch[0]].where}: has an image but no VQ tokenizer was loaded")
            for i, span in zip(batch, encode_images([load_image(chunk[i]) for i in batch]), strict=True):
                spans[i] = span
            advance(len(batch))
        advance(len(chunk) - len(pending))
        table = pa.Table.from_pylist(job.make_rows(chunk, spans), schema=SCHEMA)
        tmp = target.with_name(f".{target.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(target)
        written += 1
    return {"records": len(job.records), "shards": shards, "shards_written": written}


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise CoinInputError(f"{data_dir}: no {MANIFEST}; import the data first with `mode-cl data import-coin`")
    return json.loads(path.read_text())


def update_manifest(data_dir: Path, entries: dict[str, Any]) -> dict[str, Any]:
    """Merge ``entries`` (top-level keys; ``tasks`` merged per task) into the manifest, atomically."""
    path = data_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {"format": FORMAT_VERSION, "tasks": {}}
    for key, value in entries.items():
        if key == "tasks":
            manifest["tasks"].update(value)
        else:
            manifest[key] = value
    _write_json_atomic(path, manifest)
    return manifest


def check_manifest_vocabulary(manifest: dict[str, Any], data_dir: Path, expected_hash: str) -> None:
    stored = manifest.get("vocabulary_hash")
    if stored is not None and stored != expected_hash:
        raise CoinInputError(
            f"{data_dir}: was tokenised with another vocabulary (hash {stored}, model has {expected_hash}); "
            "re-import it with this model or use another --out"
        )


def read_split(data_dir: str | Path, part: str, split: str, limit: int | None = None) -> pa.Table:
    """All shards of ``<part>/<split>`` in order (``part`` = a task name or ``generation``)."""
    directory = Path(data_dir) / part / split
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise CoinInputError(f"{directory}: no shards; import {part} with `mode-cl data import-coin`")
    table = pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])
    return table.slice(0, limit) if limit is not None else table


def holdout_split(count: int, holdout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded (train indices, held-out indices) of ``count`` records; at least one held out when count ≥ 2."""
    if count == 0:
        return [], []
    held = min(count - 1, max(1, round(holdout * count))) if count >= 2 and holdout > 0 else 0
    order = np.random.default_rng(seed).permutation(count).tolist()
    return sorted(order[held:]), sorted(order[:held])
