"""CoIN-format records: reading JSON/JSONL files and parsing each record into an instruction or a
generation record, with one-line errors that name the file, line and field (see
:mod:`trainables.benchmarks.coin.data` for the formats)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.errors import UserError

QUESTION_FIELDS = ("question", "text", "prompt", "instruction")
CAPTION_FIELDS = ("caption", "text", "prompt")


class CoinInputError(UserError, ValueError):
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
