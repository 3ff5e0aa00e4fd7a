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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.benchmarks.coin.records import (
    CoinInputError,
    GenerationRecord,
    InstructionRecord,
    check_images,
    parse_generation,
    parse_instruction,
    read_json_records,
)
from trainables.benchmarks.coin.store import (
    FORMAT_VERSION,
    GENERATION,
    MANIFEST,
    SplitJob,
    check_manifest_vocabulary,
    file_hash,
    holdout_split,
    read_manifest,
    run_split,
    update_manifest,
    vocabulary_hash,
)
from trainables.vocab import IMAGE_PLACEHOLDER, TokenIds, image_code_name


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

    from trainables.benchmarks.coin.chameleon import (
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
