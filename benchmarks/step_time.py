"""Train-step time of the MoDE layer against peft LoRA at equal total trainable rank,
interleaved so that a noisy machine slows both alike.

    python benchmarks/step_time.py [--repeats 7] [--steps 10] [--threads 2]

Same tiny Chameleon (the digits base architecture), same batch (32 understanding sequences of 75
tokens with a 66-token image span), same optimizer. Variants:

- MoDE, no distillation: 4 experts of rank 8 + a rank-8 V-Adapter (total rank 40);
- peft LoRA rank 40 on the same MLP projections;
- the same MoDE with ``torch.nn.Dropout`` (what peft's LoRA uses) in place of MoDE's own input
  dropout, whose mask is drawn with ``torch.rand`` (same distribution, a faster kernel on CPU): how
  much of the ratio is the dropout kernel and how much the adapter math;
- MoDE with distillation from the cached teacher (λ 0.3, a 32-sample stream batch per step, teacher
  logits read from a teacher cache built before timing, as the engine does).

All models are built first; then each repetition times ``--steps`` steps of every variant, one
after the other, in an order that alternates (A B C, C B A, …), and takes each variant's median
step. The ratio MoDE / LoRA is formed per repetition (both measured within seconds of each other)
and its median and spread (interquartile range, min–max) over the repetitions are printed. The
target (performance issue) is a median ratio ≤ 1.0 without distillation.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from trainables.batching import SampleSet
from trainables.benchmarks.digits.data import DigitsConfig, vocabulary
from trainables.benchmarks.digits.tiny import TINY_SHAPE, build_tiny_chameleon
from trainables.engine import fused_adamw
from trainables.methods import Batch, MethodConfig, build_method
from trainables.mode import mode_layers
from trainables.mode.reference import official_style
from trainables.model_shape import ChameleonShape
from trainables.teacher_cache import load_or_build, model_fingerprint
from trainables.vocab import TokenIds

STREAM_BATCH = 32  # distillation sequences a Variant adds to each step


def make_batch(ids: TokenIds, vocab: dict[str, int], size: int = 32) -> Batch:
    generator = torch.Generator().manual_seed(0)
    codes = torch.tensor(ids.image_codes)
    words = [vocab[w] for w in ("what", "digit", "is", "this")]  # the caption prompt
    rows = []
    for _ in range(size):
        image = codes[torch.randint(len(codes), (64,), generator=generator)].tolist()
        answer = vocab["three"]
        rows.append([ids.bos, ids.begin_image, *image, ids.end_image, *words, ids.separator, answer, ids.eos])
    input_ids = torch.tensor(rows)
    return Batch(input_ids, torch.ones_like(input_ids), torch.zeros(size, dtype=torch.bool))


def make_stream(ids: TokenIds, size: int = 256) -> SampleSet:
    """Image-token spans standing in for the distillation stream."""
    generator = torch.Generator().manual_seed(1)
    codes = torch.tensor(ids.image_codes)
    spans = [
        [ids.begin_image, *codes[torch.randint(len(codes), (64,), generator=generator)].tolist(), ids.end_image]
        for _ in range(size)
    ]
    return SampleSet(spans, [True] * size, ids.pad)


class Variant:
    """One method on its own copy of the model, with its optimizer; ``step()`` is one train step.

    With a ``stream``, each step adds a 32-sample distillation batch, its teacher logits read from
    a cache (``cached``) or computed live; ``official`` computes the MoDE layers and routing the
    official code's way (:func:`trainables.mode.reference.official_style`)."""

    def __init__(
        self,
        name: str,
        config: MethodConfig,
        vocab,
        ids,
        batch: Batch,
        stream: SampleSet | None,
        cached: bool = True,
        official: bool = False,
        shape: ChameleonShape = TINY_SHAPE,
        torch_dropout: bool = False,
    ) -> None:
        torch.manual_seed(0)
        self.name, self.batch, self.stream, self.official = name, batch, stream, official
        self.method = build_method(config, ids)
        base = build_tiny_chameleon(vocab, shape)
        fingerprint = model_fingerprint(base)
        self.model = self.method.attach(base).train()
        if torch_dropout:
            for _, layer in mode_layers(self.model):
                layer.dropout = torch.nn.Dropout(config.dropout)
        self.cache = None
        if stream is not None and cached:
            with tempfile.TemporaryDirectory() as root:  # built before timing, as the engine does in setup
                self.cache = load_or_build(
                    Path(root),
                    fingerprint,
                    stream,
                    int(ids.image_vocab_mask().sum()),
                    None,
                    lambda i, m: self.method.teacher_logits(self.model, i, m),
                    torch.device("cpu"),
                    log=lambda _: None,
                )
        params = list(self.method.trainable_parameters(self.model))
        self.optimizer = torch.optim.AdamW(params, lr=1e-3, fused=fused_adamw(params))  # as the engine
        self.generator = torch.Generator().manual_seed(2)
        self.trainable = sum(p.numel() for p in self.method.trainable_parameters(self.model))

    def step(self) -> None:
        extra = {}
        if self.stream is not None:
            picks = torch.randint(len(self.stream), (STREAM_BATCH,), generator=self.generator).tolist()
            stream_batch = self.stream.stream_batch_of(picks)
            if self.cache is not None:
                stream_batch.teacher_logits, stream_batch.teacher_index = self.cache.batch(
                    picks, stream_batch.input_ids.shape[1]
                )
            extra["stream"] = stream_batch
        with official_style(self.model) if self.official else contextlib.nullcontext():
            loss = sum(self.method.loss_terms(self.model, self.batch, **extra).values())
            self.optimizer.zero_grad()
            loss.backward()
        self.optimizer.step()


def interleaved(variants: list[Variant], repeats: int, steps: int) -> dict[str, list[float]]:
    """Each variant's median step time (s) per repetition; within a repetition the variants run one
    after the other, in an order that alternates between repetitions."""
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for repeat in range(repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            times[variant.name].append(median_step(variant.step, steps))
    return times


def print_times(variants: list[Variant], times: dict[str, list[float]]) -> None:
    for variant in variants:
        ms = [t * 1000 for t in times[variant.name]]
        print(
            f"{variant.name:<40} step ms: median {statistics.median(ms):6.1f} (min–max {min(ms):.1f}–{max(ms):.1f})"
            f"   trainable params {variant.trainable:,}"
        )


def median_step(step: Callable[[], None], steps: int, warmup: int = 2) -> float:
    durations = []
    for index in range(warmup + steps):
        started = time.perf_counter()
        step()
        if index >= warmup:
            durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def spread(values: list[float]) -> str:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return f"median {median:.2f}  IQR {q1:.2f}–{q3:.2f}  min–max {min(values):.2f}–{max(values):.2f}"


def main() -> None:
    # peft 0.21 reads a transformers property deprecated in 5.x (not actionable here).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (≥ 5)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per repetition")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats: at least 5, so that the spread means something")
    torch.set_num_threads(args.threads)
    vocab = vocabulary(DigitsConfig())
    ids = TokenIds.from_vocabulary_map(vocab)
    batch, stream = make_batch(ids, vocab), make_stream(ids)
    common = {"r": 8, "num_experts": 4, "dropout": 0.05}
    variants = [
        Variant("MoDE (4×r8 + V r8)", MethodConfig(name="mode_no_kd", **common), vocab, ids, batch, None),
        Variant("peft LoRA r40", MethodConfig(name="seq_lora", lora_r=40, **common), vocab, ids, batch, None),
        Variant(
            "MoDE, torch.nn.Dropout masks",
            MethodConfig(name="mode_no_kd", **common),
            vocab,
            ids,
            batch,
            None,
            torch_dropout=True,
        ),
        Variant(
            "MoDE + KD (cached teacher)", MethodConfig(name="mode", kd_weight=0.3, **common), vocab, ids, batch, stream
        ),
    ]
    times = interleaved(variants, args.repeats, args.steps)
    print_times(variants, times)
    mode, lora, torch_dropout, kd = (times[v.name] for v in variants)
    ratio = spread([m / b for m, b in zip(mode, lora, strict=True)])
    ratio_torch_dropout = spread([m / b for m, b in zip(torch_dropout, lora, strict=True)])
    ratio_kd = spread([m / b for m, b in zip(kd, lora, strict=True)])
    setting = f"{args.repeats} interleaved repetitions × {args.steps} steps, {args.threads} threads"
    print(f"MoDE / LoRA step time: {ratio}  (target ≤ 1.0; {setting}, torch {torch.__version__})")
    print(f"MoDE with nn.Dropout / LoRA step time: {ratio_torch_dropout}  (no target; the same dropout kernel as peft)")
    print(f"MoDE+KD / LoRA step time: {ratio_kd}  (no target; distillation on, cached teacher)")


if __name__ == "__main__":
    main()
