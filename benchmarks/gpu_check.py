"""One-GPU check of the real-scale path, without Ray: MoDE vs peft LoRA on a medium Chameleon.

    python benchmarks/gpu_check.py [--out DIR] [--steps 8] [--seq-len 1024] [--batch 4]
    python benchmarks/gpu_check.py --tiny      # CPU smoke run in seconds (what the tests run)

Builds a random-init Chameleon with the real checkpoint's vocabulary (65,536 ids; codebook 4..8195,
end-image 8196, begin-image 8197; read back from its ``vocabulary_map``) — ≈0.66 B parameters by
default — in bf16, and trains each method for a few steps on the same synthetic understanding batches
(``<s>`` text, an image span, question, ``<sep>``, answer, ``</s>``):

* ``mode``: 4 experts × r 8 + V-Adapter r 8, with λ·KD on an image-only stream batch of equal size;
* ``mode_no_kd``: the same layers without the distillation passes (the layer's own cost);
* ``seq_lora``: one peft LoRA on the same MLP projections, at the rank whose trainable parameters
  match MoDE's (its default, ``mode_matched_rank``).

Reports per method: tokens/s (task tokens only; the KD stream's tokens are extra work, not counted),
peak GPU memory, and MFU = model FLOPs / (step time × the GPU's peak dense bf16 FLOP/s). Model FLOPs
per token with a frozen base: forward 2·N + backward 2·N (activation gradients only) for the matmul
parameters N (decoder + lm_head), plus attention 8·L·s·h (forward and backward, causal mask not
discounted); KD adds a teacher forward and a student forward + backward on the stream. Peak FLOP/s
come from a small table of GPU names (unknown GPU → MFU null). Writes ``gpu_check.json`` and
``gpu_check.md`` under ``--out`` (default ``$OUT`` if set, else ``./gpu_check_out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from trainables.batching import SampleSet
from trainables.benchmarks.coin.chameleon import build_real_layout_chameleon
from trainables.methods import build_method
from trainables.model_shape import ChameleonShape
from trainables.vocab import TokenIds

SEPARATOR = "<reserved08706>"
PEAK_BF16_FLOPS = {  # dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.1e12,
    "A10G": 70.0e12,
}
MEDIUM = ChameleonShape(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12)
TINY = ChameleonShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
METHODS = ("mode", "mode_no_kd", "seq_lora")


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def synthetic_batches(ids: TokenIds, batch: int, seq_len: int, image_tokens: int, seed: int = 0):
    """(understanding SampleSet, image-only stream SampleSet), every special id from the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.tensor(ids.image_codes)
    text_ids = torch.arange(ids.image_placeholder + 1, ids.vocab_size)
    text_len = seq_len - image_tokens - 2 - 4
    if text_len < 2:
        raise ValueError(f"--seq-len {seq_len} leaves no room for text around a {image_tokens}-token image")
    rows, stream = [], []
    for _ in range(batch):
        image = codes[torch.randint(len(codes), (image_tokens,), generator=generator)].tolist()
        words = text_ids[torch.randint(len(text_ids), (text_len,), generator=generator)].tolist()
        answer = text_ids[torch.randint(len(text_ids), (1,), generator=generator)].tolist()
        rows.append([ids.bos, ids.begin_image, *image, ids.end_image, *words, ids.separator, *answer, ids.eos])
        stream_codes = codes[torch.randint(len(codes), (seq_len - 2,), generator=generator)].tolist()
        stream.append([ids.begin_image, *stream_codes, ids.end_image])
    return SampleSet(rows, [False] * batch, ids.pad), SampleSet(stream, [True] * batch, ids.pad)


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls per token: decoder layers and lm_head (not the embedding
    lookup, not the VQ-VAE)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = sum(p.numel() for p in inner.model.layers.parameters())
    return decoder + inner.lm_head.weight.numel()


def step_flops(n_matmul: int, layers: int, hidden: int, batch: int, seq_len: int, kd: bool) -> float:
    tokens = batch * seq_len
    train = tokens * (4 * n_matmul + 8 * layers * seq_len * hidden)
    if not kd:
        return float(train)
    teacher = tokens * (2 * n_matmul + 4 * layers * seq_len * hidden)
    return float(2 * train + teacher)


def run_method(name: str, args, device: torch.device, dtype: torch.dtype, shape: ChameleonShape) -> dict:
    torch.manual_seed(0)
    model, _ = build_real_layout_chameleon(shape, vq_resolution=16, seed=0, dtype=dtype, device=device)
    ids = TokenIds.from_vocabulary_map(model.config.vocabulary_map, model.config.vocab_size, separator=SEPARATOR)
    method = build_method(name, ids, r=args.r, num_experts=args.experts, alpha=2.0 * args.r, dropout=0.05)
    model = method.attach(model).to(device).train()
    params = list(method.trainable_parameters(model))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    samples, stream_set = synthetic_batches(ids, args.batch, args.seq_len, args.image_tokens)
    batch = samples.batch(range(args.batch))
    batch.input_ids, batch.attention_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    batch.is_generation = batch.is_generation.to(device)
    stream = stream_set.stream_batch_of(range(args.batch))
    stream.input_ids, stream.attention_mask = stream.input_ids.to(device), stream.attention_mask.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = sum(method.loss_terms(model, batch, stream=stream if method.USES_KD else None).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / args.steps
    kd = method.USES_KD and method.config.kd_weight > 0
    flops = step_flops(matmul_params(model), shape.num_hidden_layers, shape.hidden_size, args.batch, args.seq_len, kd)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rank = method.rank if name == "seq_lora" else args.r * (args.experts + 1)  # experts + V-Adapter
    result = {
        "method": name,
        "total_rank": rank,
        "trainable_params": sum(p.numel() for p in params),
        "steps": args.steps,
        "step_seconds": seconds,
        "tokens_per_s": args.batch * args.seq_len / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None,
        "model_tflops_per_step": flops / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "final_loss": losses[-1],
    }
    return result


def markdown(report: dict) -> str:
    model = report["model"]
    lines = [
        f"# GPU check — {report['device']}",
        "",
        f"Random-init Chameleon: {model['params'] / 1e9:.3f} B parameters (hidden {model['hidden_size']}, "
        f"{model['layers']} layers, vocabulary {model['vocab_size']:,}, codebook ids "
        f"{model['image_codes'][0]}..{model['image_codes'][1]}), {report['dtype']}; batch {report['batch']} × "
        f"{report['seq_len']} tokens; {report['steps']} timed steps after {report['warmup']} warm-up.",
        "",
        "| method | total rank | trainable params | tokens/s | step s | peak GPU GiB | MFU | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        memory = f"{run['peak_memory_gib']:.2f}" if run["peak_memory_gib"] is not None else "n/a (CPU)"
        mfu = f"{100 * run['mfu']:.1f} %" if run["mfu"] is not None else "n/a"
        lines.append(
            f"| {run['method']} | {run['total_rank']} | {run['trainable_params']:,} | {run['tokens_per_s']:,.0f} | "
            f"{run['step_seconds']:.3f} | {memory} | {mfu} | {run['final_loss']:.3f} |"
        )
    lines += ["", "tokens/s counts task tokens only; `mode` also runs the KD teacher and student passes."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with a tiny model (seconds)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    parser.add_argument("--steps", type=int, help="timed steps per method (default 8; tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; tiny 1)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 1024; tiny 48)")
    parser.add_argument("--batch", type=int, help="sequences per step (default 4; tiny 2)")
    parser.add_argument("--image-tokens", type=int, help="image span length (default 512; tiny 16)")
    parser.add_argument("--r", type=int, default=8, help="expert rank (default 8)")
    parser.add_argument("--experts", type=int, default=4, help="text experts (default 4)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {"steps": 2, "warmup": 1, "seq_len": 48, "batch": 2, "image_tokens": 16}
    if not tiny:
        defaults = {"steps": 8, "warmup": 2, "seq_len": 1024, "batch": 4, "image_tokens": 512}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.bfloat16
    shape = TINY if tiny else MEDIUM
    probe, _ = build_real_layout_chameleon(shape, vq_resolution=16, seed=0, device="meta")
    ids = TokenIds.from_vocabulary_map(probe.config.vocabulary_map, probe.config.vocab_size, separator=SEPARATOR)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "model": {
            "params": sum(p.numel() for p in probe.parameters()),
            "hidden_size": shape.hidden_size,
            "layers": shape.num_hidden_layers,
            "vocab_size": probe.config.vocab_size,
            "image_codes": [ids.image_codes[0], ids.image_codes[-1]],
            "begin_image": ids.begin_image,
            "end_image": ids.end_image,
        },
        "runs": [],
    }
    started = time.perf_counter()
    for name in METHODS:
        run = run_method(name, args, device, dtype, shape)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous method's model is gone; start its peak from a clean pool
        report["runs"].append(run)
        print(f"{name}: {run['tokens_per_s']:,.0f} tokens/s, step {run['step_seconds']:.3f} s", flush=True)
    report["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
