"""Train-step time of the fused MoDE layer against peft LoRA at equal total trainable rank.

    python benchmarks/step_time.py [--steps 30] [--threads 2]

Same tiny Chameleon (the digits base architecture), same batch (32 understanding sequences of 75
tokens with a 66-token image span), same optimizer. MoDE: 4 experts of rank 8 + a rank-8 V-Adapter
(total rank 40); LoRA: peft rank 40 on the same MLP projections. Prints the median step time of
each and their ratio (the performance issue's target is ≤ 1.15). Distillation is off for both, so
the ratio measures the layer, not the extra teacher/student passes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from trainables.benchmarks.digits.data import DigitsConfig, vocabulary
from trainables.benchmarks.digits.tiny import build_tiny_chameleon
from trainables.methods import Batch, MethodConfig, build_method
from trainables.vocab import TokenIds


def make_batch(ids: TokenIds, vocab: dict[str, int], size: int = 32) -> Batch:
    generator = torch.Generator().manual_seed(0)
    codes = torch.tensor(ids.image_codes)
    words = [vocab[w] for w in ("what", "is", "the", "next", "digit")]
    rows = []
    for _ in range(size):
        image = codes[torch.randint(len(codes), (64,), generator=generator)].tolist()
        answer = vocab["three"]
        rows.append([ids.bos, ids.begin_image, *image, ids.end_image, *words, ids.separator, answer, ids.eos])
    input_ids = torch.tensor(rows)
    return Batch(input_ids, torch.ones_like(input_ids), torch.zeros(size, dtype=torch.bool))


def time_steps(name: str, config: MethodConfig, steps: int, batch: Batch, vocab, ids) -> float:
    torch.manual_seed(0)
    method = build_method(config, ids)
    model = method.attach(
        build_tiny_chameleon(
            vocab,
        )
    ).train()
    optimizer = torch.optim.AdamW(list(method.trainable_parameters(model)), lr=1e-3)
    durations = []
    for step in range(steps + 5):
        started = time.perf_counter()
        loss = sum(method.loss_terms(model, batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 5:  # warm-up steps excluded
            durations.append(time.perf_counter() - started)
    trainable = sum(p.numel() for p in method.trainable_parameters(model))
    median = statistics.median(durations)
    print(f"{name:<28} median step {median * 1000:7.1f} ms   trainable params {trainable:,}")
    return median


def main() -> None:
    # peft 0.21 reads a transformers property deprecated in 5.x (not actionable here).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab = vocabulary(DigitsConfig())
    ids = TokenIds.from_vocabulary_map(vocab)
    batch = make_batch(ids, vocab)
    common = {"r": 8, "num_experts": 4, "dropout": 0.05}
    mode = time_steps(
        "MoDE (4×r8 + V r8, fused)", MethodConfig(name="mode_no_kd", **common), args.steps, batch, vocab, ids
    )
    lora = time_steps(
        "peft LoRA r40", MethodConfig(name="seq_lora", lora_r=40, **common), args.steps, batch, vocab, ids
    )
    print(f"MoDE / LoRA step time: {mode / lora:.2f}  (target ≤ 1.15; {args.threads} threads, {torch.__version__})")


if __name__ == "__main__":
    main()
