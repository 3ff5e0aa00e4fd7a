"""How close a MoDE train step comes to this CPU's matmul speed: tokens/s and achieved FLOP/s as a
fraction of what ``torch.matmul`` reaches at the model's own layer shapes.

    python benchmarks/cpu_fraction.py [--threads 2] [--steps 10] [--batch 16]

Two shapes of the digits Chameleon (its vocabulary, 75-token understanding sequences with a
66-token image span): the tiny model the benchmark trains (hidden 128, intermediate 344, 4 layers)
and a medium CPU one (hidden 512, intermediate 1376, 8 layers). For each, MoDE without
distillation (the layer's own cost) and with distillation (cached teacher, as the engine trains)
run ``--steps`` timed steps after 3 warm-up steps; the median step is reported. Tokens/s counts
every token a step trains on: the task batch, and with distillation the stream batch of
``benchmarks/step_time.py``'s ``Variant`` (``STREAM_BATCH``, 32 sequences).

Model FLOPs per step are counted as ``benchmarks/gpu_check.py`` counts them (frozen base: forward
2·N, backward 2·N for the matmul parameters N of the decoder and lm_head, plus attention; with KD a
teacher forward and a student forward + backward on the stream batch). The reference is
``torch.matmul`` in fp32 on the same threads at the shapes one task batch puts through the model
([tokens, hidden] × [hidden, intermediate], [tokens, intermediate] × [intermediate, hidden],
[tokens, hidden] × [hidden, hidden], [tokens, hidden] × [hidden, vocabulary]), each timed alone,
combined as total FLOPs / total time in the proportions one forward uses them. The fraction says
how much of the step is matmul work at the speed the BLAS gives for those shapes; the rest is
everything else (elementwise ops, dropout masks, softmax, optimizer, Python and dispatch).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
from gpu_check import matmul_params, step_flops
from step_time import STREAM_BATCH, Variant, make_batch, make_stream, median_step

from trainables.benchmarks.digits.data import DigitsConfig, vocabulary
from trainables.benchmarks.digits.tiny import TINY_SHAPE
from trainables.methods import MethodConfig
from trainables.model_shape import ChameleonShape
from trainables.vocab import TokenIds

MEDIUM_CPU = ChameleonShape(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=256
)


def matmul_rate(shapes: list[tuple[int, int, int, int]], repeats: int = 20) -> float:
    """FLOP/s of ``torch.matmul`` over ``(m, k, n, count)`` shapes weighted by ``count``: total
    FLOPs / total time, each shape timed as the median of ``repeats`` products."""
    flops = seconds = 0.0
    for m, k, n, count in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.matmul(a, b)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - started)
        flops += count * 2.0 * m * k * n
        seconds += count * statistics.median(times)
    return flops / seconds


def layer_shapes(shape: ChameleonShape, tokens: int, vocab_size: int) -> list[tuple[int, int, int, int]]:
    h, i, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    return [
        (tokens, h, i, 2 * layers),  # gate and up projections
        (tokens, i, h, layers),  # down projection
        (tokens, h, h, 4 * layers),  # q, k, v, o
        (tokens, h, vocab_size, 1),  # lm_head
    ]


def main() -> None:
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="understanding sequences per step (digits default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab = vocabulary(DigitsConfig())
    ids = TokenIds.from_vocabulary_map(vocab)
    batch, stream = make_batch(ids, vocab, size=args.batch), make_stream(ids)
    seq_len = batch.input_ids.shape[1]
    tokens = args.batch * seq_len
    stream_len = stream.stream_batch_of([0]).input_ids.shape[1]
    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32; "
        f"batch {args.batch} × {seq_len} tokens; KD stream batch {STREAM_BATCH} × {stream_len}; "
        f"median of {args.steps} steps after 3 warm-up"
    )
    columns = "model | method | tokens/s | step ms | model GFLOP/step | achieved GFLOP/s | matmul GFLOP/s | fraction"
    print(f"| {columns} |")
    print("|---|---|---|---|---|---|---|---|")
    common = {"r": 8, "num_experts": 4, "dropout": 0.05}
    for label, shape in (("tiny (128×344, 4 layers)", TINY_SHAPE), ("medium (512×1376, 8 layers)", MEDIUM_CPU)):
        reference = matmul_rate(layer_shapes(shape, tokens, len(vocab)))
        for method, config in (
            ("mode, no KD", MethodConfig(name="mode_no_kd", **common)),
            ("mode, KD (cached teacher)", MethodConfig(name="mode", kd_weight=0.3, **common)),
        ):
            uses_kd = config.name == "mode"
            variant = Variant(method, config, vocab, ids, batch, stream if uses_kd else None, shape=shape)
            seconds = median_step(variant.step, args.steps, warmup=3)
            params = matmul_params(variant.model)
            flops = step_flops(params, shape.num_hidden_layers, shape.hidden_size, args.batch, seq_len, False)
            if uses_kd:
                # the stream batch: the teacher's logits come from the cache (no forward), the
                # student runs a forward and a backward
                flops += step_flops(params, shape.num_hidden_layers, shape.hidden_size, STREAM_BATCH, stream_len, False)
            step_tokens = tokens + (STREAM_BATCH * stream_len if uses_kd else 0)
            achieved = flops / seconds
            print(
                f"| {label} | {method} | {step_tokens / seconds:,.0f} | {1e3 * seconds:.1f} | {flops / 1e9:.2f} | "
                f"{achieved / 1e9:.1f} | {reference / 1e9:.1f} | {achieved / reference:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
