"""Save and load adapter tensors as safetensors plus a JSON config, atomically and strictly.

The directory holds ``adapter.safetensors`` and ``adapter_config.json``. Each file is written under
a temporary name and renamed into place, so neither is ever half-written (a crash between the two
renames can pair a new weights file with the old config; checkpoints add a manifest for that). Loading
checks the config and every key and shape before touching the model: a mismatch raises
:class:`AdapterMismatchError` naming what differs, never a silent partial load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trainables import __version__

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"


class AdapterMismatchError(ValueError):
    """The stored adapter does not fit the model it is being loaded into."""


def save_adapter(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": 1, "mode_cl_version": __version__, **config}
    weights_tmp = directory / f".{WEIGHTS_NAME}.tmp"
    config_tmp = directory / f".{CONFIG_NAME}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(weights_tmp))
    config_tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(weights_tmp, directory / WEIGHTS_NAME)
    os.replace(config_tmp, directory / CONFIG_NAME)
    return directory


def read_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    weights, config = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not weights.is_file() or not config.is_file():
        raise FileNotFoundError(f"no adapter in {directory}: expected {WEIGHTS_NAME} and {CONFIG_NAME}")
    return load_file(str(weights)), json.loads(config.read_text())


def compare_configs(stored: dict[str, Any], expected: dict[str, Any], fields: list[str]) -> None:
    differences = [
        f"{f}: stored {stored.get(f)!r} vs model {expected.get(f)!r}"
        for f in fields
        if stored.get(f) != expected.get(f)
    ]
    if differences:
        raise AdapterMismatchError("adapter config does not match the model's adapters: " + "; ".join(differences))


def assign_strict(parameters: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``parameters`` after checking that keys and shapes match one to one."""
    missing = sorted(set(parameters) - set(tensors))
    unexpected = sorted(set(tensors) - set(parameters))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"adapter keys do not match: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    wrong = [
        f"{k}: stored {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
        for k, p in parameters.items()
        if tuple(tensors[k].shape) != tuple(p.shape)
    ]
    if wrong:
        raise AdapterMismatchError(f"adapter shapes do not match ({len(wrong)} tensors), e.g. {wrong[0]}")
    with torch.no_grad():
        for key, parameter in parameters.items():
            parameter.copy_(tensors[key].to(dtype=parameter.dtype, device=parameter.device))
