"""Train-step time of an official-style MoDE step against ours, on the same model and batches.

    python benchmarks/official_step.py [--steps 20] [--threads 2]

Official style (digest §8.4–8.9): every expert computed on every token in a Python loop and the
outputs masked by modality, modality ids built by a Python loop over tokens, and the frozen teacher
run live on the distillation stream at every step (task pass + teacher pass + student pass).
Ours: the fused layer, vectorised routing, teacher logits read from the teacher cache (task pass +
student pass). Same tiny Chameleon (digits base architecture), same task batch (32 understanding
sequences of 75 tokens) and stream batch (32 image spans of 66 tokens), MoDE r8 × 4 experts,
λ 0.3, β 2. The two mixed variants are printed too, to show where the time goes.
The performance issue's target is official / ours ≥ 1.5.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from step_time import make_batch

from trainables.batching import SampleSet
from trainables.benchmarks.digits.data import DigitsConfig, vocabulary
from trainables.benchmarks.digits.tiny import build_tiny_chameleon
from trainables.methods import MethodConfig, build_method
from trainables.mode.reference import official_style
from trainables.teacher_cache import load_or_build, model_fingerprint
from trainables.vocab import TokenIds


def make_stream(ids: TokenIds, size: int = 256) -> SampleSet:
    generator = torch.Generator().manual_seed(1)
    codes = torch.tensor(ids.image_codes)
    spans = [
        [ids.begin_image, *codes[torch.randint(len(codes), (64,), generator=generator)].tolist(), ids.end_image]
        for _ in range(size)
    ]
    return SampleSet(spans, [True] * size, ids.pad)


def time_variant(name: str, official: bool, cached: bool, args, vocab, ids, batch, stream) -> float:
    torch.manual_seed(0)
    method = build_method(MethodConfig(name="mode", r=8, num_experts=4, kd_weight=0.3, kd_temperature=2.0), ids)
    base = build_tiny_chameleon(
        vocab,
    )
    fingerprint = model_fingerprint(base)
    model = method.attach(base).train()
    cache = None
    if cached:
        with tempfile.TemporaryDirectory() as root:  # built outside the timed steps, as the engine does
            image_vocab = int(ids.image_vocab_mask().sum())
            cache = load_or_build(
                Path(root),
                fingerprint,
                stream,
                image_vocab,
                None,
                lambda i, m: method.teacher_logits(model, i, m),
                torch.device("cpu"),
                log=lambda _: None,
            )
    optimizer = torch.optim.AdamW(list(method.trainable_parameters(model)), lr=1e-3)
    generator = torch.Generator().manual_seed(2)
    durations = []
    context = official_style(model) if official else contextlib.nullcontext()
    with context:
        for step in range(args.steps + 3):
            started = time.perf_counter()
            picks = torch.randint(len(stream), (32,), generator=generator).tolist()
            stream_batch = stream.stream_batch_of(picks)
            if cache is not None:
                stream_batch.teacher_logits, stream_batch.teacher_index = cache.batch(
                    picks, stream_batch.input_ids.shape[1]
                )
            loss = sum(method.loss_terms(model, batch, stream_batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= 3:  # warm-up steps excluded
                durations.append(time.perf_counter() - started)
    median = statistics.median(durations)
    print(f"  {name:<48} median step {median * 1000:7.1f} ms")
    return median


def main() -> None:
    # peft 0.21 reads a transformers property deprecated in 5.x (not actionable here).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab = vocabulary(DigitsConfig())
    ids = TokenIds.from_vocabulary_map(vocab)
    batch, stream = make_batch(ids, vocab), make_stream(ids)
    official = time_variant("official style (loops + live teacher)", True, False, args, vocab, ids, batch, stream)
    time_variant("official layer + cached teacher", True, True, args, vocab, ids, batch, stream)
    time_variant("fused layer + live teacher", False, False, args, vocab, ids, batch, stream)
    ours = time_variant("ours (fused + cached teacher)", False, True, args, vocab, ids, batch, stream)
    print(f"official-style / ours step time: {official / ours:.2f}  (target ≥ 1.5; {args.threads} threads)")


if __name__ == "__main__":
    main()
