"""Train-step time of an official-style MoDE step against ours, on the same model and batches,
interleaved so that a noisy machine slows both alike.

    python benchmarks/official_step.py [--repeats 5] [--steps 5] [--threads 2]

Official style (digest §8.4–8.9): every expert computed on every token in a Python loop and the
outputs masked by modality, modality ids built by a Python loop over tokens, and the frozen teacher
run live on the distillation stream at every step (task pass + teacher pass + student pass).
Ours: our layer (on CPU, experts on the text rows only), vectorised routing, teacher logits read
from the teacher cache (task pass + student pass). Same tiny Chameleon (digits base architecture),
same task batch (32 understanding sequences of 75 tokens) and stream batch (32 image spans of 66
tokens), MoDE r8 × 4 experts, λ 0.3, β 2. The two mixed variants are timed too, to show where the
time goes. Each repetition
times every variant (alternating order, as in ``step_time.py``); the ratio official / ours is
formed per repetition and printed as median and spread. The performance issue's target is ≥ 1.5.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from step_time import Variant, interleaved, make_batch, make_stream, print_times, spread

from trainables.benchmarks.digits.data import DigitsConfig, vocabulary
from trainables.methods import MethodConfig
from trainables.vocab import TokenIds


def main() -> None:
    # peft 0.21 reads a transformers property deprecated in 5.x (not actionable here).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions (≥ 5)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per repetition")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats: at least 5, so that the spread means something")
    torch.set_num_threads(args.threads)
    vocab = vocabulary(DigitsConfig())
    ids = TokenIds.from_vocabulary_map(vocab)
    batch, stream = make_batch(ids, vocab), make_stream(ids)
    config = MethodConfig(name="mode", r=8, num_experts=4, kd_weight=0.3, kd_temperature=2.0)
    variants = [
        Variant("official style (loops + live teacher)", config, vocab, ids, batch, stream, False, True),
        Variant("official layer + cached teacher", config, vocab, ids, batch, stream, True, True),
        Variant("our layer + live teacher", config, vocab, ids, batch, stream, False, False),
        Variant("ours (our layer + cached teacher)", config, vocab, ids, batch, stream, True, False),
    ]
    times = interleaved(variants, args.repeats, args.steps)
    print_times(variants, times)
    official, ours = times[variants[0].name], times[variants[-1].name]
    ratio = spread([o / u for o, u in zip(official, ours, strict=True)])
    setting = f"{args.repeats} × {args.steps} steps, {args.threads} threads"
    print(f"official-style / ours step time: {ratio}  (target ≥ 1.5; {setting})")


if __name__ == "__main__":
    main()
