"""Evaluation on the digits benchmark: answer accuracy, image generation quality, image NLL.

Generation quality is judged by a frozen reference classifier (a one-hidden-layer MLP fitted on
real train-split images, decoded through the same quantiser as generated ones): the share of
generated images classified as the prompted digit, and a Fréchet distance between generated and
real test images in its hidden-layer feature space (our FID).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from trainables.batching import SampleSet, pad
from trainables.benchmarks.digits.data import SequenceBuilder
from trainables.decoding import require_cache_filled
from trainables.losses import (
    answer_labels,
    causal_lm_logits,
    label_space,
    restrict_logits,
    shifted_cross_entropy,
    unwrap,
)
from trainables.metrics import frechet_distance
from trainables.vocab import TokenIds

IMAGE_TOKENS = 64


@dataclass(frozen=True)
class AnswerScores:
    constrained: float  # the most likely of the task's own answers is the reference answer
    open: float  # the most likely text token of the whole vocabulary is the reference answer
    # per sample, in test-set order (token ids): the reference answer and the two predictions
    targets: list[int] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    open_predicted: list[int] = field(default_factory=list)


@torch.no_grad()
def answer_accuracies(
    model: nn.Module, tests: Mapping[str, tuple[list[list[int]], list[int], list[int] | None]], builder: SequenceBuilder
) -> dict[str, AnswerScores]:
    """Greedy scoring of the (one-word) answer at the position after the separator, per task of
    ``tests`` (``task → (sequences, answer starts, answer ids)``), two ways: constrained to the
    task's answer set (chance = 1/|answers|; all text tokens when its answer ids are None) and
    open-vocabulary exact match (argmax over every text token). The tasks' prompts are scored
    together, so that a test image asked about by several tasks is read once
    (:func:`next_token_logits`)."""
    prompts = [s[:a] for sequences, starts, _ in tests.values() for s, a in zip(sequences, starts, strict=True)]
    final = next_token_logits(model, prompts, builder.ids)
    text_vocab = ~builder.ids.codebook_mask()
    scores, offset = {}, 0
    for task, (sequences, starts, answer_ids) in tests.items():
        answer_set = torch.zeros_like(text_vocab)
        answer_set[answer_ids if answer_ids is not None else text_vocab.nonzero().squeeze(-1)] = True
        logits = final[offset : offset + len(sequences)]
        offset += len(sequences)
        targets = [s[a] for s, a in zip(sequences, starts, strict=True)]
        predicted = _argmax_within(logits, answer_set).tolist()
        open_predicted = _argmax_within(logits, text_vocab).tolist()
        constrained = sum(p == t for p, t in zip(predicted, targets, strict=True))
        open_vocabulary = sum(p == t for p, t in zip(open_predicted, targets, strict=True))
        n = len(sequences)
        scores[task] = AnswerScores(constrained / n, open_vocabulary / n, targets, predicted, open_predicted)
    return scores


def answer_accuracy(
    model: nn.Module,
    sequences: list[list[int]],
    answer_starts: list[int],
    builder: SequenceBuilder,
    answer_ids: list[int] | None = None,
) -> AnswerScores:
    """:func:`answer_accuracies` of one task."""
    return answer_accuracies(model, {"task": (sequences, answer_starts, answer_ids)}, builder)["task"]


# Rows per evaluation forward. On CPU the activations of a few dozen rows stay in cache: the image
# NLL of the 397 test sequences (71 tokens) took 0.94–1.07 s on one thread at 16–64 rows and
# 1.30–1.38 s at 256; packed answer scoring is flat from 16 to 64 and slower above.
ROWS_PER_FORWARD = 64

# Attention implementations that take a custom 4D mask (sdpa: bool, True = attend; eager: added to
# the scores). Others (flash-attention, flex) get one prompt per row and a padding mask.
_PACKING_ATTENTION = ("sdpa", "eager")


@torch.no_grad()
def next_token_logits(
    model: nn.Module, prompts: list[list[int]], ids: TokenIds, rows: int = ROWS_PER_FORWARD
) -> torch.Tensor:
    """The model's next-token logits after each prompt, ``[N, V]`` fp32, as if each prompt were
    run alone, up to float rounding.

    Prompts that share their tokens up to and including the first end-image token (the same test
    image, asked about by several tasks) are packed into one row: the shared prefix once, then each
    prompt's remaining tokens as a block of its own. A block-causal attention mask lets every
    block attend to the prefix and to its own earlier tokens only, and its positions continue from
    the prefix's, so it sees exactly what its prompt alone would. The image spans, most of every
    prompt, are then computed once per image instead of once per question. A prompt is a row of its
    own when it has no image, ends at the image, or has an image token after it (MoDE routes a
    row's tokens by the image spans opened before them, across blocks). ``rows`` packed rows go
    through the model at a time. Which prompts share a row changes the float rounding of their
    logits, not what they attend to.
    """
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("next_token_logits: every prompt needs at least one token")
    lm = unwrap(model)
    attention = getattr(getattr(lm, "config", None), "_attn_implementation", None)
    pack = attention in _PACKING_ATTENTION
    groups: dict[tuple[int, ...] | int, list[int]] = {}  # shared prefix, or the prompt's index: alone
    for index, prompt in enumerate(prompts):
        shared = _shared_prefix_length(prompt, ids) if pack else 0
        groups.setdefault(tuple(prompt[:shared]) if shared else index, []).append(index)
    packed = [(key if isinstance(key, tuple) else (), members) for key, members in groups.items()]
    device = _device(model)
    final: torch.Tensor | None = None
    for start in range(0, len(packed), rows):
        chunk = packed[start : start + rows]
        tokens, positions, blocks, ends = [], [], [], []  # per row; ends: (prompt, row, column)
        for prefix, members in chunk:
            row, position, block = list(prefix), list(range(len(prefix))), [0] * len(prefix)
            for number, index in enumerate(members, start=1):
                suffix = prompts[index][len(prefix) :]
                row += suffix
                position += range(len(prefix), len(prefix) + len(suffix))
                block += [number] * len(suffix)
                ends.append((index, len(tokens), len(row) - 1))
            tokens.append(row)
            positions.append(position)
            blocks.append(block)
        input_ids, padding = pad(tokens, ids.pad)
        if pack:
            inputs = {"attention_mask": _block_causal_mask(pad(blocks, -1)[0], attention, lm)}
            inputs["position_ids"] = pad(positions, 0)[0]
        else:
            inputs = {"attention_mask": padding}  # one prompt per row
        hidden = lm.model(
            input_ids=input_ids.to(device), **{k: v.to(device) for k, v in inputs.items()}, use_cache=False
        ).last_hidden_state
        index, row, column = (torch.tensor(values) for values in zip(*ends, strict=True))
        logits = lm.lm_head(hidden[row.to(device), column.to(device)]).float().cpu()
        if final is None:
            final = torch.empty(len(prompts), logits.shape[-1])
        final[index] = logits
    return final if final is not None else torch.empty(0, 0)


def _shared_prefix_length(prompt: list[int], ids: TokenIds) -> int:
    """How many leading tokens ``prompt`` may share with others: through its first end-image token,
    if it goes on after it with text only; else 0."""
    if ids.end_image not in prompt:
        return 0
    length = prompt.index(ids.end_image) + 1
    rest = prompt[length:]
    if not rest or ids.begin_image in rest or ids.end_image in rest:
        return 0
    return length


def _block_causal_mask(block_ids: torch.Tensor, attention: str, lm: nn.Module) -> torch.Tensor:
    """``[rows, 1, S, S]``: a query attends to earlier keys of its own block and to the shared prefix
    (block 0). Padding (block -1) attends to the prefix and to earlier padding: never read, never
    NaN. Bool for sdpa; for eager, 0 where allowed and the dtype's minimum elsewhere (added to the
    scores)."""
    width = block_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_block = block_ids.unsqueeze(2) == block_ids.unsqueeze(1)  # [rows, query, key]
    allowed = (causal & (same_block | (block_ids == 0).unsqueeze(1))).unsqueeze(1)
    if attention == "sdpa":
        return allowed
    dtype = next(lm.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _argmax_within(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~allowed.to(logits.device), torch.finfo(logits.dtype).min).argmax(-1)


@torch.no_grad()
def image_nll(model: nn.Module, samples: SampleSet, builder: SequenceBuilder) -> float:
    """Mean image-token NLL of real generation sequences (prompt → image span)."""
    total, count = 0.0, 0
    for start in range(0, len(samples), ROWS_PER_FORWARD):
        batch = samples.batch(range(start, min(start + ROWS_PER_FORWARD, len(samples))))
        device = _device(model)
        input_ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
        space = label_space(builder.ids, batch.is_generation.to(device))
        logits = restrict_logits(causal_lm_logits(model, input_ids, attention), space)
        labels = answer_labels(input_ids, attention, builder.ids.separator)
        n = int((labels[:, 1:] != -100).sum())
        total += shifted_cross_entropy(logits, labels).item() * n
        count += n
    return total / count


@torch.no_grad()
def generate_images(
    model: nn.Module, builder: SequenceBuilder, digits: list[int], temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """Sample 64 image tokens after ``draw a <digit> <sep> <begin-image>`` for each digit, with a KV
    cache, from the image codebook only. Returns token ids ``[N, 64]``."""
    device = _device(model)
    prompts = torch.tensor([[*builder.generation_prompt(d), builder.ids.begin_image] for d in digits], device=device)
    codes = torch.tensor(builder.ids.image_codes, device=device)
    lm = unwrap(model)
    cache = DynamicCache(config=lm.config)
    hidden = lm.model(input_ids=prompts, cache=cache, use_cache=True).last_hidden_state
    require_cache_filled(cache, prompts.shape[1])
    tokens = []
    for _ in range(IMAGE_TOKENS):
        logits = lm.lm_head(hidden[:, -1]).float()[:, codes]
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()  # sampled on CPU: seeded generator
            choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)
        else:
            choice = logits.argmax(-1)
        token = codes[choice]
        tokens.append(token)
        hidden = lm.model(input_ids=token[:, None], cache=cache, use_cache=True).last_hidden_state
    return torch.stack(tokens, dim=1).cpu()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class ReferenceClassifier:
    """Frozen digit classifier for judging generated images (an MLP fitted on real train images).

    Fitting takes about a second, and every trial of a sweep needs the same one, so the fitted
    weights are kept next to the task file (plain ``.npz``, read without pickle). Predictions
    and features are computed from those weights, so a fitted and a loaded classifier agree bit for bit.
    """

    scale = 16.0

    def __init__(self, coefs: list[np.ndarray], intercepts: list[np.ndarray], classes: np.ndarray) -> None:
        self.coefs, self.intercepts, self.classes = coefs, intercepts, classes

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> ReferenceClassifier:
        from sklearn.neural_network import MLPClassifier

        model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed)
        with single_threaded_blas():
            model.fit(images / cls.scale, labels)
        return cls(model.coefs_, model.intercepts_, model.classes_)

    @classmethod
    def cached(cls, images: np.ndarray, labels: np.ndarray, directory: Path, seed: int = 0) -> ReferenceClassifier:
        """Fitted once per (data, seed, scikit-learn version) and stored in ``directory``."""
        import sklearn

        path = Path(directory) / f"reference_classifier_seed{seed}_sklearn{sklearn.__version__}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as stored:
                return cls([stored["w0"], stored["w1"]], [stored["b0"], stored["b1"]], stored["classes"])
        fitted = cls.fit(images, labels, seed)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial.npz")
        np.savez(partial, w0=fitted.coefs[0], w1=fitted.coefs[1], b0=fitted.intercepts[0], b1=fitted.intercepts[1],
                 classes=fitted.classes)  # fmt: skip
        partial.replace(path)
        return fitted

    def features(self, images: np.ndarray) -> np.ndarray:
        hidden = images / self.scale @ self.coefs[0] + self.intercepts[0]
        return np.maximum(hidden, 0.0)

    def predict(self, images: np.ndarray) -> np.ndarray:
        logits = self.features(images) @ self.coefs[1] + self.intercepts[1]
        return self.classes[np.argmax(logits, axis=1)]

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(images) == labels).mean())


@dataclass
class GenerationScores:
    accuracy: float  # reference classifier agrees with the prompted digit
    frechet: float  # Fréchet distance to real test images in classifier feature space
    nll: float  # image-token NLL of real test images
    prompted: list[int] = field(default_factory=list)  # per generated image: the digit asked for
    recognized: list[int] = field(default_factory=list)  # and the reference classifier's reading


def generation_scores(
    model: nn.Module,
    builder: SequenceBuilder,
    reference: ReferenceClassifier,
    real_test_images: np.ndarray,
    test_generation: SampleSet,
    samples_per_digit: int,
    temperature: float,
    seed: int,
) -> GenerationScores:
    digits = [d for d in range(10) for _ in range(samples_per_digit)]
    generator = torch.Generator().manual_seed(seed)
    tokens = generate_images(model, builder, digits, temperature, generator)
    pixels = builder.image_codes_to_pixels(tokens.numpy())
    real = builder.image_codes_to_pixels(
        np.asarray([builder.image_span(img)[1:-1] for img in real_test_images], dtype=np.int64)
    )
    with single_threaded_blas():
        recognized = reference.predict(pixels)
        frechet = frechet_distance(reference.features(pixels), reference.features(real))
    accuracy = float((recognized == np.asarray(digits)).mean())
    nll = image_nll(model, test_generation, builder)
    return GenerationScores(accuracy, frechet, nll, digits, [int(d) for d in recognized])


def single_threaded_blas():
    """NumPy/SciPy results differ in the last bits with the BLAS thread count, which Ray workers
    and the CLI set differently; evaluation is tiny, so pin it to one thread everywhere."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")
