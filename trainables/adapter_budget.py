"""An adapter's settings checked against the model it will be attached to, before any weights load,
and the training-memory estimate shared with ``mode-cl run --dry-run`` (:mod:`trainables.plan`).

Two checks, both one-line :class:`ConfigError` naming the field to change:

- a rank above the narrowest targeted layer's width (``min(in, out)``) adds no capacity, only
  parameters; it is refused with the largest rank that makes sense;
- one worker's training memory (:func:`memory_estimate`, from parameter counts computed from the
  model's shape: :func:`base_parameters`, :func:`adapter_parameters`) is refused above the memory it
  runs in, with the estimate: the smallest GPU's memory (read by ``nvidia-smi``) when
  ``resources.use_gpu``, else this machine's physical memory. Where that cannot be told (no
  ``nvidia-smi`` on a driver that sends GPU work to a cluster) nothing is compared.

The factors come from the method (:meth:`trainables.methods.base.Method.adapter_factors`): one
``(field, rank)`` per low-rank pair it attaches to every targeted layer.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainables.config_rules import ConfigError

if TYPE_CHECKING:
    from trainables.methods.base import MethodConfig

GIB = 1024**3
BYTES_PER_TRAINABLE_PARAMETER = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    image_vocab: int  # codebook + begin/end-image: the KD logits' width


@dataclass(frozen=True)
class TrainingShape:
    """What one worker's training memory depends on besides the adapter.

    Args:
        model: the decoder's shape.
        dtype_bytes: bytes per frozen weight (4: fp32, 2: bf16).
        micro_batch / seq_len: one worker's batch (sequences x tokens per sequence).
        stream_len: tokens of a distillation-stream sequence (an image span).
        checkpointing: decoder layers recomputed in backward (only their inputs kept).
        use_gpu: compare with GPU memory rather than the machine's.
        weights_field / weights_fix: the field to change when the frozen weights dominate, and how.
        activations_fix: how to shrink activations and logits (``train.batch_size`` is named).
    """

    model: ModelShape
    dtype_bytes: int
    micro_batch: int
    seq_len: int
    stream_len: int
    checkpointing: bool = False
    use_gpu: bool = False
    weights_field: str = "base.hidden_size"
    weights_fix: str = "use a smaller base model (base.hidden_size, base.num_hidden_layers)"
    activations_fix: str = "lower train.batch_size or use more workers"


def memory_estimate(
    shape: ModelShape,
    base_params: int,
    adapter_params: int,
    dtype_bytes: int,
    micro_batch: int,
    seq_len: int,
    stream_len: int,
    checkpointing: bool,
    uses_kd: bool,
) -> dict[str, float]:
    """GiB per worker, by component (an estimate):

    * weights: every base parameter in the load dtype (frozen, no gradients or optimizer state);
    * adapters: fp32 weights + fp32 gradients + AdamW's two fp32 moments = 16 bytes per parameter;
    * activations: without checkpointing ≈ 34·b·s·h bytes per layer (the usual transformer estimate
      for 16-bit activations with fused attention); with checkpointing, the 2·b·s·h-byte input of each
      layer plus one layer's full activations during its recompute;
    * logits: fp32 ``[b, s, V]`` three times (logits, masked copy, softmax gradient) for the task CE;
    * kd: teacher + student logits over the image vocabulary, fp32, three copies each.
    """
    b, s, h = micro_batch, seq_len, shape.hidden_size
    per_layer = 34 * b * s * h
    if checkpointing:
        activations = shape.num_hidden_layers * 2 * b * s * h + per_layer
    else:
        activations = shape.num_hidden_layers * per_layer
    parts = {
        "weights": base_params * dtype_bytes,
        "adapters": adapter_params * BYTES_PER_TRAINABLE_PARAMETER,
        "activations": activations,
        "logits": 3 * b * s * shape.vocab_size * 4,
        "kd": (2 * 3 * b * stream_len * shape.image_vocab * 4) if uses_kd else 0,
    }
    estimate = {name: value / GIB for name, value in parts.items()}
    estimate["total"] = sum(estimate.values())
    return estimate


def layer_widths(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of the target modules a Llama/Chameleon decoder layer has."""
    square = (hidden, hidden)
    return {
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
        "q_proj": square,
        "k_proj": square,
        "v_proj": square,
        "o_proj": square,
    }


def base_parameters(shape: ModelShape) -> int:
    """The decoder's parameters from its shape: embeddings and LM head (``2 x V x h``) and each
    layer's seven projections; norms and the VQ-VAE are left out (a slight undercount)."""
    widths = layer_widths(shape.hidden_size, shape.intermediate_size).values()
    return 2 * shape.vocab_size * shape.hidden_size + shape.num_hidden_layers * sum(i * o for i, o in widths)


def adapter_parameters(method: MethodConfig, widths: dict[str, tuple[int, int]], layers: int) -> int:
    """Trainable low-rank parameters: layers x sum over targeted modules and factors of r x (in + out)
    (routers and biases are negligible next to these)."""
    from trainables.methods.registry import METHODS

    factors = METHODS[method.name].adapter_factors(method)
    per_layer = sum(
        rank * sum(widths[module]) for module in method.target_modules if module in widths for _, rank in factors
    )
    return layers * per_layer


def training_memory(method: MethodConfig, shape: TrainingShape) -> dict[str, float]:
    """:func:`memory_estimate` (GiB per worker) of ``method`` on a model of ``shape``, with the
    parameters counted from the shape."""
    from trainables.methods.registry import METHODS

    model = shape.model
    widths = layer_widths(model.hidden_size, model.intermediate_size)
    return memory_estimate(
        model,
        base_parameters(model),
        adapter_parameters(method, widths, model.num_hidden_layers),
        shape.dtype_bytes,
        shape.micro_batch,
        shape.seq_len,
        shape.stream_len,
        shape.checkpointing,
        METHODS[method.name].USES_KD and method.kd_weight > 0,
    )


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no estimate to compare with
        return None


@functools.lru_cache(maxsize=1)
def gpu_memory_bytes() -> int | None:
    """The smallest visible GPU's memory, read by ``nvidia-smi`` (no CUDA context is created in this
    process); None without nvidia-smi or when it fails."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        output = subprocess.run(
            [executable, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        mebibytes = [int(line.strip()) for line in output.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(mebibytes) * 2**20 if mebibytes else None


def check_adapter_fits(method: MethodConfig, shape: TrainingShape, memory_bytes: int | None = None) -> None:
    """Raise :class:`ConfigError` if the method's adapter does not fit a model of this shape, or
    training does not fit in memory (see the module docstring). ``memory_bytes`` defaults to the GPU's
    memory with ``shape.use_gpu``, else this machine's physical memory."""
    from trainables.methods.registry import METHODS

    widths = layer_widths(shape.model.hidden_size, shape.model.intermediate_size)
    targeted = {m: widths[m] for m in method.target_modules if m in widths}
    factors = METHODS[method.name].adapter_factors(method)
    if targeted:
        module, (n_in, n_out) = min(targeted.items(), key=lambda item: min(item[1]))
        narrowest = min(n_in, n_out)
        for field, rank in factors:
            if rank > narrowest:
                raise ConfigError(
                    field,
                    f"adapter rank {rank} is above the width of {module} ({n_in}→{n_out}); use at most {narrowest}",
                )
    if memory_bytes is not None:
        memory: int | None = memory_bytes
    else:
        memory = gpu_memory_bytes() if shape.use_gpu else physical_memory_bytes()
    estimate = training_memory(method, shape)
    if memory is None or estimate["total"] * GIB <= memory:
        return
    parts = {
        "weights": estimate["weights"],
        "adapters": estimate["adapters"],
        "activations": estimate["activations"] + estimate["logits"] + estimate["kd"],
    }
    field, fix = {
        "weights": (shape.weights_field, shape.weights_fix),
        "adapters": (factors[0][0] if factors else "method.r", "lower the rank or the number of experts"),
        "activations": ("train.batch_size", shape.activations_fix),
    }[max(parts, key=parts.__getitem__)]
    size = {name: _size(value * GIB) for name, value in parts.items()}
    raise ConfigError(
        field,
        f"training needs about {_size(estimate['total'] * GIB)} per worker (frozen weights {size['weights']} + "
        f"adapters with gradients and AdamW state {size['adapters']} + activations and logits "
        f"{size['activations']}; the estimate of `mode-cl run --dry-run`), more than the {_size(memory)} of "
        f"{'GPU memory' if shape.use_gpu else 'memory'} here; {fix}",
    )


def _size(count: float) -> str:
    return f"{count / GIB:,.1f} GiB" if count >= GIB else f"{count / 2**20:,.1f} MiB"
