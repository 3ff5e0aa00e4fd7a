"""CoIN-format instruction data and an image-generation stream → tokenised, sharded Parquet.

Input records (one JSON object per line in ``.jsonl``, or a JSON list in ``.json``):

* CoIN / LLaVA conversation format (CoIN's train and test files)::

      {"id": "sqa-1", "image": "scienceqa/1.png",
       "conversations": [{"from": "human", "value": "<image>\\nWhich ...?\\nA. x\\nB. y"},
                         {"from": "gpt", "value": "A"}]}

  The first human turn is the question, the gpt turn after it the answer; later turns are not used.
* Flat question/answer format (CoIN's evaluation files): ``question_id``/``id``, ``image``, the
  question in ``text``/``question``/``prompt``, the answer in ``answer`` (a string) or
  ``answers`` (a list of strings or of ``{"answer": ...}``; the first one is the training target,
  any of them counts as correct at evaluation).

``image`` is optional (ScienceQA has text-only questions); relative paths are resolved against
``--image-root`` (default: the JSON file's directory). The image is placed where the question has
CoIN's ``<image>`` marker, else before the question. A sample becomes the token sequence

    <s> question-before-image [begin-image, VQ codes…, end-image] question-after <sep> answer </s>

with ``<sep>`` the model's separator token (``answer_start`` = index after it). The image-generation
stream holds either pre-tokenised images (``image_tokens``: the paper's LAION stream — image BPE ids,
with or without begin/end-image) or image files (``image``), with an optional ``caption``/``text``.
Its rows are ``<s> caption <sep> [begin-image … end-image]``; a seeded share is held out as the
generation test split, the rest is the distillation stream (its image spans only).

Layout written under the output directory, one Parquet file per shard of ``shard_size`` records::

    manifest.json   tokenizer/   <task>/{train,test}/part-00000.parquet …   generation/{stream,test}/…

Re-running the same command continues where it stopped: each shard is written to a temporary file
and renamed when complete, finished shards are kept, and a split's ``_import.json`` pins the source
file hash and settings (a different source for the same split is refused, not mixed in).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainables.vocab import IMAGE_PLACEHOLDER, TokenIds, image_code_name

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
QUESTION_FIELDS = ("question", "text", "prompt", "instruction")
CAPTION_FIELDS = ("caption", "text", "prompt")


class CoinInputError(ValueError):
    """Bad import input; the message is one line naming the file (and line) and the fix."""


@dataclass(frozen=True)
class InstructionRecord:
    id: str
    where: str  # "file:line" (JSON lines) or "file record N" (JSON list), for messages
    line: int
    image: Path | None
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class GenerationRecord:
    id: str
    where: str
    line: int
    image: Path | None
    image_tokens: tuple[int, ...] | None
    caption: str


def read_json_records(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(where, line or record number, object) for every record of a ``.jsonl`` or ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise CoinInputError(f"{path}: file not found; check the path")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CoinInputError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix the file") from None
        if not isinstance(data, list):
            raise CoinInputError(f"{path}: expected a JSON list of records (or use .jsonl, one record per line)")
        for number, item in enumerate(data, start=1):
            yield f"{path} record {number}", number, item
        return
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as error:
            raise CoinInputError(f"{path}:{number}: not valid JSON ({error.msg}); fix or remove the line") from None
        yield f"{path}:{number}", number, item


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _image_path(item: dict, where: str, image_root: Path) -> Path | None:
    image = item.get("image")
    if image is None:
        return None
    if not isinstance(image, str) or not image.strip():
        raise CoinInputError(f"{where}: 'image' must be a file path string, got {image!r}")
    path = Path(image).expanduser()
    return path if path.is_absolute() else image_root / path


def parse_instruction(item: Any, where: str, line: int, image_root: Path) -> InstructionRecord:
    """One CoIN record (conversation or flat format) → :class:`InstructionRecord`."""
    if not isinstance(item, dict):
        raise CoinInputError(f"{where}: expected a JSON object, got {type(item).__name__}")
    question, answers = None, []
    if "conversations" in item:
        turns = item["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise CoinInputError(f"{where}: 'conversations' must be a list of {{'from': ..., 'value': ...}} turns")
        for index, turn in enumerate(turns):
            if str(turn.get("from", "")).lower() in ("human", "user"):
                question = _text(turn.get("value"))
                reply = next(
                    (t for t in turns[index + 1 :] if str(t.get("from", "")).lower() in ("gpt", "assistant")), None
                )
                answer = _text(reply.get("value")) if reply is not None else None
                answers = [answer] if answer is not None else []
                break
    else:
        question = next((_text(item[k]) for k in QUESTION_FIELDS if _text(item.get(k)) is not None), None)
        if "answer" in item and _text(item["answer"]) is not None:
            answers = [_text(item["answer"])]
        elif isinstance(item.get("answers"), list):
            for entry in item["answers"]:
                value = _text(entry.get("answer")) if isinstance(entry, dict) else _text(entry)
                if value is not None:
                    answers.append(value)
    if question is None:
        raise CoinInputError(
            f"{where}: no question (expected a 'human' turn in 'conversations' or one of {', '.join(QUESTION_FIELDS)})"
        )
    if not answers:
        raise CoinInputError(
            f"{where}: no answer (expected a 'gpt' turn after the question, 'answer' or 'answers'); "
            "add it or drop the record"
        )
    record_id = _text(item.get("id")) or _text(item.get("question_id")) or f"{Path(where.split(':')[0]).stem}-{line}"
    return InstructionRecord(
        record_id,
        where,
        line,
        _image_path(item, where, image_root),
        question.strip(),
        tuple(a.strip() for a in answers),
    )


def parse_generation(item: Any, where: str, line: int, image_root: Path) -> GenerationRecord:
    """One image-generation stream record (``image_tokens`` or ``image``, optional caption)."""
    if not isinstance(item, dict):
        raise CoinInputError(f"{where}: expected a JSON object, got {type(item).__name__}")
    tokens = item.get("image_tokens")
    if tokens is not None and (
        not isinstance(tokens, list)
        or not tokens
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
    ):
        raise CoinInputError(f"{where}: 'image_tokens' must be a non-empty list of integer token ids")
    image = _image_path(item, where, image_root)
    if tokens is None and image is None:
        raise CoinInputError(f"{where}: no image (expected 'image_tokens' or 'image'); add one or drop the record")
    caption = next((_text(item[k]) for k in CAPTION_FIELDS if _text(item.get(k)) is not None), "")
    record_id = _text(item.get("id")) or f"{Path(where.split(':')[0]).stem}-{line}"
    return GenerationRecord(record_id, where, line, image, tuple(tokens) if tokens else None, caption.strip())


def check_images(records: Sequence[InstructionRecord | GenerationRecord]) -> None:
    for record in records:
        if record.image is not None and not record.image.is_file():
            raise CoinInputError(
                f"{record.where}: image {record.image} not found; fix the path or pass --image-root DIR"
            )


def load_image(record: InstructionRecord | GenerationRecord):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(record.image) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise CoinInputError(
            f"{record.where}: cannot read image {record.image} ({error.__class__.__name__}); replace or drop it"
        ) from None


class SequenceBuilder:
    """Token sequences of CoIN samples and generation rows, every special id from the vocabulary map."""

    def __init__(self, tokenizer, ids: TokenIds, vocabulary_map: dict[str, int] | None = None) -> None:
        self.tokenizer, self.ids = tokenizer, ids
        self.vocabulary_map = vocabulary_map

    def text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def understanding(self, question: str, answer: str, image_span: list[int] | None) -> tuple[list[int], int]:
        before, marker, after = question.partition(IMAGE_PLACEHOLDER)
        if not marker:
            before, after = "", question
        prompt = [self.ids.bos, *self.text(before.strip()), *(image_span or []), *self.text(after.strip())]
        answer_start = len(prompt) + 1
        return [*prompt, self.ids.separator, *self.text(answer), self.ids.eos], answer_start

    def prompt(self, question: str, image_span: list[int] | None) -> list[int]:
        """The understanding prompt through the separator (what greedy decoding continues)."""
        sequence, answer_start = self.understanding(question, "", image_span)
        return sequence[:answer_start]

    def generation(self, caption: str, image_span: list[int]) -> tuple[list[int], int]:
        prompt = [self.ids.bos, *self.text(caption), self.ids.separator]
        return [*prompt, *image_span], len(prompt)

    def image_span_from_tokens(self, tokens: Sequence[int], where: str, codes: str = "bpe") -> list[int]:
        """Pre-tokenised image → ``[begin-image, codes…, end-image]``. ``codes='vq'`` reads raw VQ
        codebook indices (0…N−1) and maps them through the vocabulary map's ``IMGIMG`` names."""
        tokens = list(tokens)
        if codes == "vq":
            n = len(self.ids.image_codes)
            bad = next((t for t in tokens if not 0 <= t < n), None)
            if bad is not None or self.vocabulary_map is None:
                raise CoinInputError(f"{where}: VQ code {bad} is outside the codebook 0..{n - 1}")
            bpe = [self.vocabulary_map[image_code_name(t)] for t in tokens]
            return [self.ids.begin_image, *bpe, self.ids.end_image]
        if tokens and tokens[0] == self.ids.begin_image:
            tokens = tokens[1:]
        if tokens and tokens[-1] == self.ids.end_image:
            tokens = tokens[:-1]
        allowed = set(self.ids.image_codes)
        bad = next((t for t in tokens if t not in allowed), None)
        if bad is not None or not tokens:
            first, last = self.ids.image_codes[0], self.ids.image_codes[-1]
            raise CoinInputError(
                f"{where}: image_tokens holds {bad if bad is not None else 'no codes'}, not an image code of this "
                f"model's vocabulary (ids {first}..{last}); for raw VQ indices pass --stream-codes vq"
            )
        return [self.ids.begin_image, *tokens, self.ids.end_image]


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


@dataclass(frozen=True)
class TaskFiles:
    """One CoIN task to import: its name and its train/test instruction files."""

    name: str
    train: Path | None = None
    test: Path | None = None


def _understanding_rows(builder: SequenceBuilder):
    def make_rows(records: list[InstructionRecord], spans: list[list[int] | None]) -> list[dict[str, Any]]:
        rows = []
        for record, span in zip(records, spans, strict=True):
            input_ids, answer_start = builder.understanding(record.question, record.answers[0], span)
            rows.append(
                {
                    "id": record.id,
                    "source_line": record.line,
                    "input_ids": input_ids,
                    "answer_start": answer_start,
                    "is_generation": False,
                    "question": record.question,
                    "answers": list(record.answers),
                }
            )
        return rows

    return make_rows


def _generation_rows(builder: SequenceBuilder, stream_codes: str):
    def make_rows(records: list[GenerationRecord], spans: list[list[int] | None]) -> list[dict[str, Any]]:
        rows = []
        for record, span in zip(records, spans, strict=True):
            if span is None:
                span = builder.image_span_from_tokens(record.image_tokens, record.where, stream_codes)
            input_ids, answer_start = builder.generation(record.caption, span)
            rows.append(
                {
                    "id": record.id,
                    "source_line": record.line,
                    "input_ids": input_ids,
                    "answer_start": answer_start,
                    "is_generation": True,
                    "question": record.caption,
                    "answers": [],
                }
            )
        return rows

    return make_rows


def import_coin(
    out_dir: str | Path,
    model: str,
    tasks: Sequence[TaskFiles] = (),
    generation: Path | None = None,
    image_root: Path | None = None,
    separator_token: str | None = None,
    shard_size: int = 1000,
    batch_size: int = 16,
    gen_holdout: float = 0.05,
    stream_codes: str = "bpe",
    device: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Import CoIN tasks and/or an image-generation stream into ``out_dir`` (see the module doc).

    Every input file is parsed and every image path checked before anything is written; images
    are tokenised in batches of ``batch_size`` with the model's VQ-VAE. Returns the manifest and
    the number of shards this call wrote per split (0 where an earlier run had finished them).
    """
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from trainables.chameleon import (
        SEPARATOR_TOKEN,
        VQImageTokenizer,
        load_tokenizer,
        resolve_model_dir,
        tokens_per_image,
    )

    if not tasks and generation is None:
        raise CoinInputError("nothing to import: pass --task NAME with --train/--test files, and/or --generation FILE")
    if shard_size <= 0 or batch_size <= 0:
        raise CoinInputError("--shard-size and --batch-size must be positive integers")
    if not 0 <= gen_holdout < 1:
        raise CoinInputError(f"--gen-holdout must be in [0, 1), got {gen_holdout}")
    if stream_codes not in ("bpe", "vq"):
        raise CoinInputError(f"--stream-codes must be bpe or vq, got {stream_codes!r}")
    names = [t.name for t in tasks]
    for name in names:
        if not name or name == GENERATION or not name.replace("-", "").replace("_", "").isalnum():
            raise CoinInputError(f"--task {name!r}: use letters, digits, '-' and '_' (and not {GENERATION!r})")
    if len(set(names)) != len(names):
        raise CoinInputError(f"--task: each task once, got {names}")

    # 1. Parse and check everything before writing anything.
    parsed: dict[tuple[str, str], tuple[Path, list]] = {}
    for task in tasks:
        if task.train is None and task.test is None:
            raise CoinInputError(f"--task {task.name}: give its --train and/or --test file")
        for split, path in (("train", task.train), ("test", task.test)):
            if path is None:
                continue
            root = Path(image_root) if image_root is not None else Path(path).parent
            records = [parse_instruction(item, w, n, root) for w, n, item in read_json_records(Path(path))]
            if not records:
                raise CoinInputError(f"{path}: no records")
            parsed[(task.name, split)] = (Path(path), records)
    stream: list[GenerationRecord] = []
    if generation is not None:
        root = Path(image_root) if image_root is not None else Path(generation).parent
        stream = [parse_generation(item, w, n, root) for w, n, item in read_json_records(Path(generation))]
        if not stream:
            raise CoinInputError(f"{generation}: no records")
    all_records = [r for _, records in parsed.values() for r in records] + stream
    check_images(all_records)

    model_dir = resolve_model_dir(model, "--model")
    from transformers import ChameleonConfig

    config = ChameleonConfig.from_pretrained(model_dir)
    separator_token = separator_token or SEPARATOR_TOKEN
    try:
        ids = TokenIds.from_vocabulary_map(
            config.vocabulary_map or {}, vocab_size=config.vocab_size, separator=separator_token
        )
    except ValueError as error:
        raise CoinInputError(f"--model {model}: {error}") from None
    tokenizer = load_tokenizer(model_dir, "--model")
    builder = SequenceBuilder(tokenizer, ids, config.vocabulary_map)
    for record in stream:  # validate pre-tokenised images up front too
        if record.image is None:
            builder.image_span_from_tokens(record.image_tokens, record.where, stream_codes)
    vocab_hash = vocabulary_hash(config.vocabulary_map, separator_token)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir) if (out_dir / MANIFEST).is_file() else {}
    check_manifest_vocabulary(manifest, out_dir, vocab_hash)

    encode = None
    if any(r.image is not None for r in all_records):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        encode = VQImageTokenizer.from_model_dir(model_dir, device).encode

    settings = {"vocabulary_hash": vocab_hash, "shard_size": shard_size, "format": FORMAT_VERSION}
    jobs: list[tuple[str, str, SplitJob]] = []
    for (name, split), (path, records) in parsed.items():
        state = {**settings, "source": str(path.resolve()), "source_hash": file_hash(path), "records": len(records)}
        jobs.append((name, split, SplitJob(out_dir / name / split, records, state, _understanding_rows(builder))))
    if stream:
        train_index, test_index = holdout_split(len(stream), gen_holdout)
        base_state = {**settings, "source": str(Path(generation).resolve()), "source_hash": file_hash(generation)}
        base_state |= {"gen_holdout": gen_holdout, "stream_codes": stream_codes}
        make_rows = _generation_rows(builder, stream_codes)
        for split, index in (("stream", train_index), ("test", test_index)):
            if index:
                records = [stream[i] for i in index]
                job = SplitJob(
                    out_dir / GENERATION / split, records, {**base_state, "records": len(records)}, make_rows
                )
                jobs.append((GENERATION, split, job))

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    summary: dict[str, dict[str, Any]] = {}
    written: dict[str, int] = {}
    with Progress(*columns, disable=not show_progress) as progress:
        for name, split, job in jobs:
            bar = progress.add_task(f"{name}/{split}", total=len(job.records))
            counts = run_split(job, shard_size, batch_size, encode, lambda n, bar=bar: progress.advance(bar, n))
            summary.setdefault(name, {})[split] = {"records": counts["records"], "shards": counts["shards"]}
            written[f"{name}/{split}"] = counts["shards_written"]

    tokenizer.save_pretrained(out_dir / "tokenizer")
    entries: dict[str, Any] = {
        "vocabulary_hash": vocab_hash,
        "separator_token": separator_token,
        "model": model,
        "tokens_per_image": tokens_per_image(config),
    }
    task_entries = {name: splits for name, splits in summary.items() if name != GENERATION}
    entries["tasks"] = {n: {**manifest.get("tasks", {}).get(n, {}), **s} for n, s in task_entries.items()}
    if GENERATION in summary:
        entries[GENERATION] = summary[GENERATION]
    return {"manifest": update_manifest(out_dir, entries), "shards_written": written}
