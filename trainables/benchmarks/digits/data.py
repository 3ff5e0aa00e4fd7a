"""The embedded benchmark: scikit-learn's handwritten digits as a tiny multimodal task suite.

Every sample is a token sequence in a Chameleon-style vocabulary. One image per sample, 64 image
tokens between begin-image and end-image. The base model learns to name a digit, to answer "is it
<digit>" with yes/no, and to draw a digit (``BASE_TASKS``, every image of the train split). The
continual tasks (``UNDERSTANDING_TASKS``) ask yes/no questions about other properties of the digit
shown, each with half of its samples answered yes. The split into train and test images, and every
sampling, follow ``DigitsConfig.seed``: ``test`` images are never used for training at any stage
(base pretraining, tasks, distillation stream).

Parquet schema of ``tasks.parquet`` (one row per sample):
    task: string            task name (BASE_TASKS, UNDERSTANDING_TASKS)
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
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainables.benchmarks.digits import tokenizers
from trainables.benchmarks.digits.config import DigitsConfig
from trainables.benchmarks.digits.tokenizers import DIGIT_WORDS, WORDS, PixelQuantizer, WordTokenizer
from trainables.vocab import TokenIds, make_vocabulary_map


@dataclass(frozen=True)
class TaskSpec:
    """An understanding task: a question about the digit shown and its answer for each digit."""

    question: str
    answer: Callable[[int], str]
    answers: tuple[str, ...]  # the task's answer set: constrained scoring picks among these
    description: str


def _yes_no(question: str, members: set[int], description: str) -> TaskSpec:
    return TaskSpec(question, lambda d: YES if d in members else NO, (YES, NO), description)


YES, NO = "yes", "no"
# The continual tasks: yes/no questions about different properties of the same digit, so that
# they share one answer format. An old task's answers stay in the output space whatever is
# learned next; keeping it means answering by the question, not by which words are in fashion.
# Every question is "is it <one word>": a question ending in "a <word>" reads to the base model
# like "draw a <digit>" (it prepares to draw), and tasks phrased so were not learned in budget.
UNDERSTANDING_TASKS: dict[str, TaskSpec] = {
    "parity": _yes_no("is it even", {0, 2, 4, 6, 8}, "even: 0 2 4 6 8"),
    "bigsmall": _yes_no("is it big", {5, 6, 7, 8, 9}, "big: 5 6 7 8 9"),
    "prime": _yes_no("is it prime", {2, 3, 5, 7}, "prime: 2 3 5 7"),
    "square": _yes_no("is it square", {0, 1, 4, 9}, "a square number: 0 1 4 9"),
    "round": _yes_no("is it round", {0, 6, 8, 9}, "drawn with a closed loop: 0 6 8 9"),
    "fibonacci": _yes_no("is it fibonacci", {0, 1, 2, 3, 5, 8}, "a Fibonacci number: 0 1 2 3 5 8"),
}
# What the base model is pretrained on, besides drawing: naming the digit, and yes/no questions
# about which digit it is ("is it <digit>") — the format and answer words of every task.
BASE_UNDERSTANDING: dict[str, TaskSpec] = {
    "caption": TaskSpec("what digit is this", lambda d: DIGIT_WORDS[d], DIGIT_WORDS, "name the digit"),
}
IDENTITY_TASK = "identity"  # "is it <digit word>" → yes/no, half of the samples about the shown digit
GENERATION_TASK = "generate"  # "draw a <digit>" → the digit's image
BASE_TASKS = ("caption", IDENTITY_TASK, GENERATION_TASK)
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
    """Hash of the build config, the raw dataset and the code that builds the task file (a
    changed task or prompt rebuilds it); memoized (every run start asks several times)."""
    images, labels = _digits()
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    digest.update(images.tobytes())
    digest.update(labels.tobytes())
    for module in (__file__, tokenizers.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:16]


def data_seed(config: DigitsConfig) -> int:
    """The seed the data follow (a run config sets it to the run's seed; 0 when left unset)."""
    return 0 if config.seed is None else config.seed


def split_indices(config: DigitsConfig, total: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) image indices; disjoint, fixed by ``config.seed``."""
    order = np.random.default_rng(data_seed(config)).permutation(total)
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


def task_spec(task: str) -> TaskSpec:
    """The question/answer spec of an understanding task (continual or base)."""
    return UNDERSTANDING_TASKS.get(task) or BASE_UNDERSTANDING[task]


def _row(task: str, split: str, image: np.ndarray, digit: int, builder: SequenceBuilder, question: str, answer: str):
    if task == GENERATION_TASK:
        tokens, answer_start, image_start = builder.generation(image, digit)
    else:
        tokens, answer_start, image_start = builder.understanding(image, question, answer)
    return {
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


def _base_rows(split: str, indices, images, labels, builder: SequenceBuilder, rng: np.random.Generator) -> list[dict]:
    """Every image of ``indices`` once per base task: drawn, named, and asked "is it <digit>"
    (about its own digit for a random half, about another random digit for the rest)."""
    rows = []
    for index in indices:
        image, digit = images[index], int(labels[index])
        rows.append(_row(GENERATION_TASK, split, image, digit, builder, "", "<image>"))
        caption = BASE_UNDERSTANDING["caption"]
        rows.append(_row("caption", split, image, digit, builder, caption.question, caption.answer(digit)))
        asked = digit if rng.random() < 0.5 else int((digit + rng.integers(1, 10)) % 10)
        answer = YES if asked == digit else NO
        rows.append(_row(IDENTITY_TASK, split, image, digit, builder, f"is it {DIGIT_WORDS[asked]}", answer))
    return rows


def balanced_choice(indices: np.ndarray, answers: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of ``indices`` (without replacement) with each answer equally often (the first
    answers get one more when ``count`` does not divide), in random order."""
    values = sorted(set(answers.tolist()))
    chosen = []
    for position, value in enumerate(values):
        pool = indices[answers == value]
        share = count // len(values) + (position < count % len(values))
        if share > len(pool):
            raise ValueError(f"only {len(pool)} images answer {value!r}; ask for at most {len(pool) * len(values)}")
        chosen.append(rng.choice(pool, share, replace=False))
    return rng.permutation(np.concatenate(chosen))


def _task_rows(task: str, split: str, indices, count: int, images, labels, builder, rng) -> list[dict]:
    spec = UNDERSTANDING_TASKS[task]
    answers = np.asarray([spec.answer(int(labels[i])) for i in indices])
    rows = []
    for index in balanced_choice(np.asarray(indices), answers, count, rng):
        digit = int(labels[index])
        rows.append(_row(task, split, images[index], digit, builder, spec.question, spec.answer(digit)))
    return rows


def build_digits(directory: str | Path, config: DigitsConfig | None = None) -> Path:
    """Write ``tasks.parquet`` and ``meta.json`` for ``config`` into ``directory`` (atomically).

    Everything random (the train/test split, the identity questions, which images each task
    samples) follows ``config.seed``."""
    config = config or DigitsConfig()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images, labels = _digits()
    train, test = split_indices(config, len(images))
    builder = SequenceBuilder(vocabulary(config), PixelQuantizer(config.levels))
    rows: list[dict] = []
    for offset, (split, indices) in enumerate((("train", train), ("test", test))):
        rows += _base_rows(
            split, indices, images, labels, builder, np.random.default_rng([data_seed(config), 100, offset])
        )
    for offset, task in enumerate(UNDERSTANDING_TASKS):
        rng = np.random.default_rng([data_seed(config), offset])
        rows += _task_rows(task, "train", train, config.task_train, images, labels, builder, rng)
        rows += _task_rows(task, "test", test, config.task_test, images, labels, builder, rng)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    tmp = directory / f".tasks.parquet.{os.getpid()}.tmp"  # concurrent builders do not share it
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
    return list(UNDERSTANDING_TASKS)


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
