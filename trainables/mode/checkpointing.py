"""Activation (gradient) checkpointing that keeps MoDE's routing correct.

HF checkpointing recomputes a decoder layer's forward during backward. MoDE layers read the
routing mask (and the teacher flag) from the model's shared :class:`RoutingState`, which the
decoder's forward pre-hook overwrites on every forward — so by the time a layer of the task
forward is recomputed, the distillation passes that ran after it have replaced the mask, and the
recompute would route tokens by another batch's mask (or fail on a shape mismatch). torch's
non-reentrant checkpoint takes a ``context_fn``: we snapshot the routing state when the layer
first runs and reinstate that snapshot around its recomputation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from torch import nn

from trainables.mode.model import mode_layers
from trainables.mode.routing import RoutingState


@contextmanager
def _replay(state: RoutingState, image_mask, teacher: bool, uniform: str | None) -> Iterator[None]:
    saved = (state.image_mask, state.teacher, state.uniform, state.recorder)
    # The recorder is off during the replay: the original forward already recorded this call.
    state.image_mask, state.teacher, state.uniform, state.recorder = image_mask, teacher, uniform, None
    try:
        yield
    finally:
        state.image_mask, state.teacher, state.uniform, state.recorder = saved


def routing_context_fn(state: RoutingState):
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint``: (nothing at forward, replay of the
    forward-time routing at recompute)."""

    def context_fn():
        return nullcontext(), _replay(state, state.image_mask, state.teacher, state.uniform)

    return context_fn


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on HF activation checkpointing for every decoder layer of ``model`` (MoDE-attached,
    peft-wrapped or plain); with MoDE layers, recomputation replays the original routing."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs: dict = {"use_reentrant": False}
    layers = mode_layers(model)
    if layers:
        kwargs["context_fn"] = routing_context_fn(layers[0][1].routing)
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    return model
