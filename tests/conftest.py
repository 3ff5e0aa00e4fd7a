"""Shared fixtures: a tiny Chameleon with a Chameleon-style vocabulary, and sequences over it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Every Ray the tests start (ray.init, ray.cluster_utils, `ray start` in a subprocess) listens on
# loopback only: set before anything imports Ray (see orchestrator.ray_runtime.prefer_loopback).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch

from trainables.benchmarks.digits.tiny import ChameleonShape, build_tiny_chameleon, make_vocabulary_map
from trainables.vocab import TokenIds

WORDS = ("what", "digit", "is", "this", "draw", "zero", "one", "two", "three", "even", "odd")
NUM_CODES = 16
# A 2-task sequence on a 1-layer base model that pretrains in seconds: the engine, Ray and sweep
# tests all start from it (as --set overrides).
MICRO_RUN = [
    "tasks=[parity, bigsmall]",
    "base.hidden_size=32",
    "base.intermediate_size=64",
    "base.num_hidden_layers=1",
    "base.epochs=1",
    "data.task_train=48",
    "data.task_test=24",
    "train.epochs=1",
    "train.batch_size=16",
    "eval.gen_samples_per_digit=2",
    "method.r=2",
    "method.num_experts=2",
]
ARCH = ChameleonShape(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256
)


@pytest.fixture(scope="session")
def micro_work_dir(tmp_path_factory):
    """A work dir (data + pretrained base) shared by every test that runs MICRO_RUN's data and base
    settings, whatever its tasks and method: the micro base is pretrained once per session. Tests of
    the caches themselves keep their own work dirs."""
    return tmp_path_factory.mktemp("micro_work")


@pytest.fixture(scope="session")
def vocab() -> dict[str, int]:
    return make_vocabulary_map(WORDS, NUM_CODES)


@pytest.fixture(scope="session")
def ids(vocab) -> TokenIds:
    return TokenIds.from_vocabulary_map(vocab)


@pytest.fixture
def make_model(vocab):
    """Factory: a fresh tiny Chameleon, identical for equal seeds."""

    def make(seed: int = 0):
        return build_tiny_chameleon(vocab, ARCH, seed=seed)

    return make


class Seq:
    """Builds token sequences from words, ``IMG(n)`` image spans and specials."""

    def __init__(self, vocab: dict[str, int], ids: TokenIds) -> None:
        self.vocab, self.ids = vocab, ids

    def image(self, codes: list[int]) -> list[int]:
        return [self.ids.begin_image, *(self.ids.image_codes[c] for c in codes), self.ids.end_image]

    def words(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def understanding(self, codes: list[int], question: str, answer: str) -> list[int]:
        return [
            self.ids.bos,
            *self.image(codes),
            *self.words(question),
            self.ids.separator,
            *self.words(answer),
            self.ids.eos,
        ]

    def generation(self, prompt: str, codes: list[int]) -> list[int]:
        return [self.ids.bos, *self.words(prompt), self.ids.separator, *self.image(codes)]


@pytest.fixture(scope="session")
def seq(vocab, ids) -> Seq:
    return Seq(vocab, ids)


def randomize_adapters(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Give every adapter tensor (B matrices included) non-zero values, so gradients can flow everywhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "mode_" in name or "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def crashed_copy(full: Path, crashed: Path, last_checkpoint: str) -> Path:
    """A copy of the finished run in ``full`` rewound to ``last_checkpoint``, as if it had crashed
    right after writing it (later checkpoints and results.json gone); returns its checkpoints dir."""
    shutil.copytree(full, crashed)
    for directory in (crashed / "checkpoints").iterdir():
        if directory.name > last_checkpoint:
            shutil.rmtree(directory)
    (crashed / "results.json").unlink()
    return crashed / "checkpoints"


def padded_batch(rows: list[list[int]], is_generation: list[bool], pad: int):
    """Token rows right-padded with ``pad`` into a method ``Batch``."""
    from trainables.batching import Batch

    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return Batch(ids, mask, torch.tensor(is_generation))


def run_then_crash(overrides: list[str], work_dir: Path, tmp_path: Path, at: str = "ckpt_t01_s000002"):
    """The run of ``overrides`` with a checkpoint every 2 steps (all kept), uninterrupted in
    ``tmp_path/full``, and a copy in ``tmp_path/crashed`` rewound to checkpoint ``at`` (default: two
    steps into task 2). Returns (config, the full run's results, the copy's checkpoints dir)."""
    from trainables.config import load_run_config
    from trainables.engine import run_sequence

    config = load_run_config(None, [*overrides, "checkpoint.every_steps=2", "checkpoint.num_to_keep=0"])
    full = run_sequence(config, work_dir, tmp_path / "full", log=lambda _: None)
    return config, full, crashed_copy(tmp_path / "full", tmp_path / "crashed", at)


def resume_and_compare(config, work_dir: Path, tmp_path: Path, full: dict, files: tuple[str, ...]) -> dict:
    """Resume the rewound copy of :func:`run_then_crash` and check it against the uninterrupted run:
    the same results, and byte-equal ``files`` in every later task-end checkpoint's adapter dir."""
    from trainables.engine import run_sequence

    messages: list[str] = []
    resumed = run_sequence(config, work_dir, tmp_path / "crashed", log=messages.append)
    assert any("resuming from checkpoint ckpt_t01_s000002: task 2, step 2" in m for m in messages), messages
    ignored = ("task_log", "profile")
    assert {k: v for k, v in resumed.items() if k not in ignored} == {k: v for k, v in full.items() if k not in ignored}
    later = sorted(d.name for d in (tmp_path / "full" / "checkpoints").iterdir() if d.name >= "ckpt_t02_s000000")
    for name in later:
        for file in files:
            final = tmp_path / "crashed" / "checkpoints" / name / "adapter" / file
            assert final.read_bytes() == (tmp_path / "full" / "checkpoints" / name / "adapter" / file).read_bytes()
    return resumed


def two_task_batches(seq: Seq, pad: int):
    """Task 1 answers 'three'/'one' (and draws), task 2 asks about parity: for methods that keep
    an earlier task's state while a later one trains."""
    task1 = padded_batch(
        [
            seq.understanding([1, 2, 3], "what digit is this", "three"),
            seq.understanding([4, 5], "what digit is this", "one"),
            seq.generation("draw two", [6, 7, 8]),
        ],
        [False, False, True],
        pad,
    )
    task2 = padded_batch(
        [seq.understanding([1, 2, 3], "is this even", "odd"), seq.understanding([4, 5], "is this even", "even")],
        [False, False],
        pad,
    )
    return task1, task2


def train_steps(method, model, batch, steps: int, lr: float = 1e-2) -> dict:
    """``steps`` AdamW steps of ``method``'s loss on one batch; returns the last step's loss terms."""
    optimizer = torch.optim.AdamW(list(method.trainable_parameters(model)), lr=lr)
    terms = {}
    for _ in range(steps):
        terms = method.loss_terms(model, batch)
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
    return terms
