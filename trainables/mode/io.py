"""``save_mode`` / ``load_mode``: every MoDE tensor (experts, routers, V-Adapter) plus the config."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from trainables.adapter_io import assign_strict, compare_configs, read_adapter, save_adapter
from trainables.mode.model import mode_layers

ADAPTER_TYPE = "mode"


def mode_state_dict(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{module_path.param_name: parameter}`` for every adapter parameter of every MoDE layer."""
    state: dict[str, nn.Parameter] = {}
    for name, layer in mode_layers(model):
        for param_name in layer.adapter_parameter_names:
            if hasattr(layer, param_name):
                state[f"{name}.{param_name}"] = getattr(layer, param_name)
    return state


def save_mode(model: nn.Module, directory: str | Path) -> Path:
    """Write all MoDE adapter tensors and the MoDEConfig to ``directory`` (safetensors + JSON)."""
    if not mode_layers(model):
        raise ValueError("save_mode: no MoDE adapters on this model; call attach_mode first")
    config = {"adapter_type": ADAPTER_TYPE, "mode_config": model.mode_config.to_dict()}
    return save_adapter(directory, mode_state_dict(model), config)


def load_mode(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapters saved by :func:`save_mode` into a model attached with the same MoDEConfig."""
    if not mode_layers(model):
        raise ValueError("load_mode: attach MoDE adapters first (attach_mode(model, config)), then load")
    tensors, stored = read_adapter(directory)
    expected = {"adapter_type": ADAPTER_TYPE, **model.mode_config.to_dict()}
    compare_configs(
        {"adapter_type": stored.get("adapter_type"), **stored.get("mode_config", {})}, expected, list(expected)
    )
    assign_strict(mode_state_dict(model), tensors)
    return model
