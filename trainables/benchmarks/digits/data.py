"""The embedded benchmark: scikit-learn's handwritten digits as a tiny multimodal task suite.

Every sample is a token sequence in a Chameleon-style vocabulary. One image per sample, 64 image
tokens between begin-image and end-image. Splits are fixed by a seeded permutation: ``test``
images are never used for training at any stage (base pretraining, tasks, distillation stream).

Parquet schema of ``tasks.parquet`` (one row per sample):
    task: string            task name (see TASKS)
    split: string           "train" | "test"
    input_ids: list<int32>  the whole sequence: prompt, separator, answer
    answer_start: int32     index of the first answer token (the token after the separator)
    image_start: int32      index of begin-image of the sample's image span
    image_end: int32        index of end-image (inclusive)
    answer_text: string     answer words, or "<image>" for generation samples
    is_generation: bool     the answer is an image
    digit: int8             the digit shown / asked for
    image: list<uint8>      the 64 original intensities (0..16)
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainables.benchmarks.digits.config import DigitsConfig
from trainables.benchmarks.digits.tokenizers import DIGIT_WORDS, WORDS, PixelQuantizer, WordTokenizer
from trainables.vocab import TokenIds, make_vocabulary_map


@dataclass(frozen=True)
class TaskSpec:
    question: str
    answer: Callable[[int], str]
    description: str


UNDERSTANDING_TASKS: dict[str, TaskSpec] = {
    "caption": TaskSpec("what digit is this", lambda d: DIGIT_WORDS[d], "name the digit"),
    "parity": TaskSpec("is it even or odd", lambda d: "even" if d % 2 == 0 else "odd", "even or odd"),
    "next": TaskSpec("what is the next digit", lambda d: DIGIT_WORDS[(d + 1) % 10], "the digit after it (9 → zero)"),
    "previous": TaskSpec(
        "what is the previous digit", lambda d: DIGIT_WORDS[(d - 1) % 10], "the digit before it (0 → nine)"
    ),
    "bigsmall": TaskSpec("is it big or small", lambda d: "big" if d >= 5 else "small", "big (5–9) or small (0–4)"),
    "double": TaskSpec("what is double the digit", lambda d: DIGIT_WORDS[(2 * d) % 10], "last digit of 2·d"),
    "mirror": TaskSpec("what is the mirror digit", lambda d: DIGIT_WORDS[9 - d], "9 − d"),
}
GENERATION_TASK = "generate"  # "draw a <digit>" → the digit's image
BASE_TASKS = ("caption", GENERATION_TASK)
SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("answer_start", pa.int32()),
        ("image_start", pa.int32()),
        ("image_end", pa.int32()),
        ("answer_text", pa.string()),
        ("is_generation", pa.bool_()),
        ("digit", pa.int8()),
        ("image", pa.list_(pa.uint8())),
    ]
)


def vocabulary(config: DigitsConfig) -> dict[str, int]:
    return make_vocabulary_map(WORDS, config.levels)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.reshape(len(data.images), -1).astype(np.uint8), data.target.astype(np.int64)


@functools.lru_cache(maxsize=8)
def data_hash(config: DigitsConfig) -> str:
    """Hash of the build config and the raw dataset; memoized (every run start asks several times)."""
    images, labels = _digits()
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    digest.update(images.tobytes())
    digest.update(labels.tobytes())
    return digest.hexdigest()[:16]


def split_indices(config: DigitsConfig, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) image indices; disjoint, fixed by ``config.seed``."""
    order = np.random.default_rng(config.seed).permutation(total)
    return np.sort(order[config.test_images :]), np.sort(order[: config.test_images])


class SequenceBuilder:
    """Token sequences of the benchmark, with every special id from the vocabulary map."""

    def __init__(self, vocabulary_map: dict[str, int], quantizer: PixelQuantizer) -> None:
        self.ids = TokenIds.from_vocabulary_map(vocabulary_map)
        self.words = WordTokenizer(vocabulary_map)
        self.quantizer = quantizer
        self.code_ids = np.asarray(self.ids.image_codes)  # codebook index → token id

    def image_span(self, image: np.ndarray) -> list[int]:
        codes = self.quantizer.encode(image[None])[0]
        return [self.ids.begin_image, *self.code_ids[codes].tolist(), self.ids.end_image]

    def understanding(self, image: np.ndarray, question: str, answer: str) -> tuple[list[int], int, int]:
        """(tokens, answer_start, image_start) for ``[bos, image, question, sep, answer, eos]``."""
        prompt = [self.ids.bos, *self.image_span(image), *self.words.encode(question), self.ids.separator]
        return [*prompt, *self.words.encode(answer), self.ids.eos], len(prompt), 1

    def generation_prompt(self, digit: int) -> list[int]:
        """``[bos, draw a <digit>, sep]`` — the prompt a generated image follows."""
        return [self.ids.bos, *self.words.encode(f"draw a {DIGIT_WORDS[digit]}"), self.ids.separator]

    def generation(self, image: np.ndarray, digit: int) -> tuple[list[int], int, int]:
        prompt = self.generation_prompt(digit)
        return [*prompt, *self.image_span(image)], len(prompt), len(prompt)

    def image_codes_to_pixels(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids of 64 image tokens per row → intensities ``[N, 64]``."""
        lookup = {int(t): i for i, t in enumerate(self.code_ids)}
        codes = np.vectorize(lambda t: lookup.get(int(t), 0))(tokens)
        return self.quantizer.decode(codes)


def _rows(task: str, split: str, indices, images, labels, builder: SequenceBuilder) -> list[dict]:
    rows = []
    for index in indices:
        image, digit = images[index], int(labels[index])
        if task == GENERATION_TASK:
            tokens, answer_start, image_start = builder.generation(image, digit)
            answer = "<image>"
        else:
            spec = UNDERSTANDING_TASKS[task]
            answer = spec.answer(digit)
            tokens, answer_start, image_start = builder.understanding(image, spec.question, answer)
        rows.append(
            {
                "task": task,
                "split": split,
                "input_ids": tokens,
                "answer_start": answer_start,
                "image_start": image_start,
                "image_end": image_start + 65,
                "answer_text": answer,
                "is_generation": task == GENERATION_TASK,
                "digit": digit,
                "image": image.tolist(),
            }
        )
    return rows


def build_digits(directory: str | Path, config: DigitsConfig | None = None) -> Path:
    """Write ``tasks.parquet`` and ``meta.json`` for ``config`` into ``directory`` (atomically)."""
    config = config or DigitsConfig()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = _digits()
    train, test = split_indices(config, len(images))
    builder = SequenceBuilder(vocabulary(config), PixelQuantizer(config.levels))
    rows: list[dict] = []
    for task in BASE_TASKS:  # base capabilities: every train image, every test image
        rows += _rows(task, "train", train, images, labels, builder)
        rows += _rows(task, "test", test, images, labels, builder)
    for offset, task in enumerate(t for t in UNDERSTANDING_TASKS if t != "caption"):
        rng = np.random.default_rng([config.seed, offset])
        rows += _rows(task, "train", rng.choice(train, config.task_train, replace=False), images, labels, builder)
        rows += _rows(task, "test", rng.choice(test, config.task_test, replace=False), images, labels, builder)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    tmp = directory / ".tasks.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(directory / "tasks.parquet")
    meta = {
        "config": config.to_dict(),
        "data_hash": data_hash(config),
        "vocabulary_map": vocabulary(config),
        "reconstruction_rmse": PixelQuantizer(config.levels).reconstruction_error(images),
        "train_images": len(train),
        "test_images": len(test),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))
    return directory


def continual_tasks() -> list[str]:
    return [t for t in UNDERSTANDING_TASKS if t != "caption"]


def read_tasks(path: str | Path, tasks: list[str] | None = None, split: str | None = None) -> pa.Table:
    """Rows of ``tasks.parquet`` for the given tasks/split; the schema is checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"task file {path} does not exist; build it with trainables.benchmarks.digits.data.build_digits"
        )
    table = pq.read_table(path)
    missing = [f.name for f in SCHEMA if f.name not in table.schema.names]
    if missing:
        raise ValueError(f"{path} is not a mode-cl task file: missing columns {missing}")
    import pyarrow.compute as pc

    mask = None
    if tasks is not None:
        mask = pc.is_in(table["task"], value_set=pa.array(tasks))
    if split is not None:
        split_mask = pc.equal(table["split"], split)
        mask = split_mask if mask is None else pc.and_(mask, split_mask)
    return table.filter(mask) if mask is not None else table
