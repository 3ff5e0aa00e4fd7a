"""Model surgery for MoDE: wrap target linears, install routing, and switch teacher/override modes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from trainables.mode.config import MoDEConfig
from trainables.mode.layer import MoDELinear
from trainables.mode.routing import RoutingState
from trainables.vocab import ImageTokenIds


def find_decoder(model: nn.Module) -> nn.Module:
    """The module that owns the token embeddings and the decoder layers (``ChameleonModel``)."""
    for module in model.modules():
        if hasattr(module, "embed_tokens") and hasattr(module, "layers"):
            return module
    raise ValueError(
        f"{type(model).__name__} has no decoder with embed_tokens and layers; MoDE needs a Chameleon-style model"
    )


def attach_mode(
    model: nn.Module, config: MoDEConfig | None = None, token_ids: ImageTokenIds | None = None
) -> nn.Module:
    """Freeze ``model`` and wrap every target linear with a :class:`MoDELinear`; returns ``model``.

    Routing is derived on every forward from ``input_ids`` (ids from ``config.vocabulary_map``).
    The attached model's outputs equal the base model's exactly until the adapters are trained.
    """
    config = config or MoDEConfig()
    if mode_layers(model):
        raise ValueError("MoDE adapters are already attached to this model; attach to a fresh base model")
    token_ids = token_ids or ImageTokenIds.from_model(model)
    decoder = find_decoder(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    state = RoutingState(token_ids=token_ids)

    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in config.target_modules and isinstance(module, nn.Linear)
    ]
    if not targets:
        raise ValueError(
            f"MoDEConfig.target_modules {list(config.target_modules)} matched no nn.Linear in "
            f"{type(model).__name__}; Chameleon's MLP linears are gate_proj, up_proj, down_proj"
        )
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoDELinear(module, config, state))

    def route_from_input_ids(module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            raise ValueError("MoDE: the model was called without input_ids or inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past_length = int(cache.get_seq_length()) if cache is not None else 0
        state.update(input_ids, tuple(reference.shape[:2]), past_length, reference.device)

    decoder.register_forward_pre_hook(route_from_input_ids, with_kwargs=True)
    model.mode_config = config
    return model


def mode_layers(model: nn.Module) -> list[tuple[str, MoDELinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoDELinear)]


def routing_state(model: nn.Module) -> RoutingState:
    layers = mode_layers(model)
    if not layers:
        raise ValueError("no MoDE adapters on this model; call trainables.mode.attach_mode first")
    return layers[0][1].routing


@contextmanager
def teacher_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the same weights with every MoDE adapter bypassed: the frozen base model, no second copy."""
    state = routing_state(model)
    previous, state.teacher = state.teacher, True
    try:
        yield model
    finally:
        state.teacher = previous


@contextmanager
def route_as(model: nn.Module, route: str | torch.Tensor) -> Iterator[nn.Module]:
    """Override routing: ``"image"`` (every token through the V-Adapter, e.g. the distillation
    stream), ``"text"``, or an explicit bool image mask ``[B, S]`` for the next forwards."""
    if isinstance(route, str) and route not in ("image", "text"):
        raise ValueError(f"route_as: route must be 'image', 'text' or a bool mask tensor, got {route!r}")
    state = routing_state(model)
    previous, state.override = state.override, route
    try:
        yield model
    finally:
        state.override = previous


@contextmanager
def record_routing(model: nn.Module) -> Iterator[list[dict]]:
    """Collect, per adapted layer call, the image mask and router gates (for tests and analysis)."""
    state = routing_state(model)
    records: list[dict] = []
    previous, state.recorder = state.recorder, records
    try:
        yield records
    finally:
        state.recorder = previous
