"""Sequential LoRA baseline: one peft LoRA on all tokens, same target modules, carried across tasks."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from torch import nn

from trainables.adapter_io import assign_strict, compare_configs, read_adapter, save_adapter
from trainables.methods.base import Method, MethodConfig
from trainables.methods.registry import register_method


@register_method
class SeqLoRA(Method):
    """One peft LoRA on all tokens (rank r·num_experts unless lora_r is set), carried across tasks."""

    NAME = "seq_lora"

    @property
    def rank(self) -> int:
        return self.config.lora_r or self.config.r * self.config.num_experts

    @classmethod
    def adapter_factors(cls, config: MethodConfig) -> list[tuple[str, int]]:
        # The one rank is lora_r (default r·num_experts): a too-large one is fixed by setting lora_r.
        return [("method.lora_r", config.lora_r or config.r * config.num_experts)]

    def _adapter_config(self) -> dict:
        return {
            "adapter_type": self.NAME,
            "r": self.rank,
            # Same scaling α/r as the MoDE adapters, so the methods differ in structure, not step size.
            "alpha": self.config.alpha / self.config.r * self.rank,
            "dropout": self.config.dropout,
            "target_modules": list(self.config.target_modules),
        }

    def attach(self, model: nn.Module) -> nn.Module:
        c = self._adapter_config()
        from peft import LoraConfig, get_peft_model  # imported here: peft pulls in transformers (seconds)

        lora = LoraConfig(
            r=c["r"], lora_alpha=c["alpha"], lora_dropout=c["dropout"], target_modules=c["target_modules"]
        )
        return get_peft_model(model, lora)

    def teacher(self, model: nn.Module) -> AbstractContextManager:
        return model.disable_adapter()

    def _state(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if "lora_" in name}

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        return save_adapter(directory, self._state(model), self._adapter_config())

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        tensors, stored = read_adapter(directory)
        expected = self._adapter_config()
        compare_configs(stored, expected, list(expected))
        assign_strict(self._state(model), tensors)
        return model
