"""Shared fixtures: a tiny Chameleon with a Chameleon-style vocabulary, and sequences over it."""

from __future__ import annotations

import os

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
