"""The official implementation's way of computing MoDE, kept as a correctness reference and a
benchmark baseline (same parameters, different computation).

The official code (digest §8.4–8.5) runs each expert on every token in a Python loop over experts,
masks the outputs by modality afterwards, and builds the modality ids with a Python loop over
tokens. :func:`official_style` switches an attached model to that computation so tests can check
the fused :class:`~trainables.mode.layer.MoDELinear` against it and ``benchmarks/`` can time it.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from trainables.mode.layer import MoDELinear
from trainables.mode.model import mode_layers, routing_state
from trainables.mode.routing import image_token_mask


def loop_image_mask(
    input_ids: torch.Tensor, begin_image: int, end_image: int, inside_at_start: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`~trainables.mode.routing.image_token_mask`, one token at a time."""
    masks, open_after = [], []
    starts = [False] * input_ids.shape[0] if inside_at_start is None else inside_at_start.tolist()
    for row, inside in zip(input_ids.tolist(), starts, strict=True):
        marks = []
        for token in row:
            if token == begin_image:
                inside = True
                marks.append(True)
            elif token == end_image and inside:
                marks.append(True)
                inside = False
            else:
                marks.append(inside)
        masks.append(marks)
        open_after.append(inside)
    device = input_ids.device
    return torch.tensor(masks, dtype=torch.bool, device=device), torch.tensor(open_after, device=device)


def reference_forward(layer: MoDELinear, x: torch.Tensor) -> torch.Tensor:
    """One expert at a time on all tokens, outputs masked by modality afterwards."""
    result = layer.base_layer(x)
    state = layer.routing
    if state.teacher:
        return result
    config, r = layer.config, layer.config.r
    image = state.image_mask.unsqueeze(-1).to(torch.float32)
    text = torch.ones_like(image) if config.experts_on_image_tokens else 1.0 - image
    dropped = layer.dropout(x)
    gates = layer.router_gates(x)
    mixture = torch.zeros_like(result, dtype=torch.float32)
    for expert in range(config.num_experts):
        a = layer.mode_text_A[expert * r : (expert + 1) * r]
        b = layer.mode_text_B[:, expert * r : (expert + 1) * r]
        mixture = mixture + gates[..., expert : expert + 1] * F.linear(F.linear(dropped.to(a.dtype), a), b)
    delta = mixture * config.scaling * text
    if config.image_adapter:
        adapter = F.linear(F.linear(dropped.to(layer.mode_image_A.dtype), layer.mode_image_A), layer.mode_image_B)
        delta = delta + adapter * config.scaling * image
    return result + delta.to(result.dtype)


@contextmanager
def official_style(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context, ``model``'s MoDE layers and routing compute the official way."""
    state = routing_state(model)
    layers = [layer for _, layer in mode_layers(model)]
    state.mask_function = loop_image_mask
    for layer in layers:
        layer.forward = types.MethodType(reference_forward, layer)
    try:
        yield model
    finally:
        state.mask_function = image_token_mask
        for layer in layers:
            del layer.forward
