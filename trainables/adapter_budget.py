"""An adapter's settings checked against the model it will be attached to, before any weights load.

Two checks, both one-line :class:`ConfigError` naming the field:

- a rank above the narrowest targeted layer's width (``min(in, out)``) adds no capacity, only
  parameters; it is refused with the largest rank that makes sense;
- the adapter's training memory, estimated as trainable parameters x 16 bytes (fp32 weight,
  gradient and AdamW's two moments), is refused above this machine's physical memory, with the
  estimate.

The factors come from the method (:meth:`trainables.methods.base.Method.adapter_factors`): one
``(field, rank)`` per low-rank pair it attaches to every targeted layer.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from trainables.config_rules import ConfigError

if TYPE_CHECKING:
    from trainables.methods.base import MethodConfig

BYTES_PER_TRAINABLE_PARAMETER = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq


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


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no estimate to compare with
        return None


def adapter_parameters(method: MethodConfig, widths: dict[str, tuple[int, int]], layers: int) -> int:
    """Trainable low-rank parameters: layers x sum over targeted modules and factors of r x (in + out)
    (routers and biases are negligible next to these)."""
    from trainables.methods.registry import METHODS

    factors = METHODS[method.name].adapter_factors(method)
    per_layer = sum(
        rank * sum(widths[module]) for module in method.target_modules if module in widths for _, rank in factors
    )
    return layers * per_layer


def check_adapter_fits(
    method: MethodConfig, hidden: int, intermediate: int, layers: int, memory_bytes: int | None = None
) -> None:
    """Raise :class:`ConfigError` if the method's adapter does not fit a model of this shape (see the
    module docstring). ``memory_bytes`` defaults to this machine's physical memory."""
    from trainables.methods.registry import METHODS

    widths = layer_widths(hidden, intermediate)
    targeted = {m: widths[m] for m in method.target_modules if m in widths}
    if targeted:
        module, (n_in, n_out) = min(targeted.items(), key=lambda item: min(item[1]))
        narrowest = min(n_in, n_out)
        for field, rank in METHODS[method.name].adapter_factors(method):
            if rank > narrowest:
                raise ConfigError(
                    field,
                    f"adapter rank {rank} is above the width of {module} ({n_in}→{n_out}); use at most {narrowest}",
                )
    memory = physical_memory_bytes() if memory_bytes is None else memory_bytes
    need = adapter_parameters(method, widths, layers) * BYTES_PER_TRAINABLE_PARAMETER
    if memory is not None and need > memory:
        raise ConfigError(
            "method.r",
            f"training this adapter needs about {need / 2**30:,.1f} GiB (parameters x 16 bytes), more than this "
            f"machine's {memory / 2**30:,.1f} GiB; lower the rank or the number of experts",
        )
