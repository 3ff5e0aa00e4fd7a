"""Sequential LoRA baseline: one peft LoRA on all tokens, same target modules, carried across tasks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from torch import nn

from trainables.adapter_io import assign_strict, compare_configs, read_adapter, save_adapter
from trainables.methods.base import Method, MethodConfig
from trainables.methods.registry import register_method
from trainables.vocab import TokenIds


def mode_matched_rank(config: MethodConfig, linears: Iterable[tuple[int, int]]) -> int:
    """The LoRA rank whose trainable parameters come closest to MoDE's on the same layers.

    MoDE puts on each targeted linear (in, out) E experts of rank r, their router and a rank-r
    V-Adapter: (E + 1)·r·(in + out) + E·in parameters; a rank-R LoRA has R·(in + out). So

        R = round( Σ_l [(E + 1)·r·(in_l + out_l) + E·in_l] / Σ_l (in_l + out_l) ),

    within ½·Σ(in + out) parameters of MoDE's count (0.7 % on the default tiny model: R = 42), and
    at most the narrowest layer's min(in, out): a larger rank adds parameters, not capacity (then the
    counts no longer match; only on models narrower than MoDE's summed ranks).
    """
    linears = list(linears)
    if not linears:
        raise ValueError(f"no linear layer named {list(config.target_modules)} to attach LoRA to")
    experts, r = config.num_experts, config.r
    mode = sum((experts + 1) * r * (n_in + n_out) + experts * n_in for n_in, n_out in linears)
    matched = round(mode / sum(n_in + n_out for n_in, n_out in linears))
    return max(1, min(matched, *(min(n_in, n_out) for n_in, n_out in linears)))


def targeted_linears(model: nn.Module, target_modules: Iterable[str]) -> list[tuple[int, int]]:
    """(in, out) features of every ``nn.Linear`` whose name ends in one of ``target_modules``."""
    targets = tuple(target_modules)
    return [
        (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]


@contextmanager
def merged_for_evaluation(model: nn.Module) -> Iterator[None]:
    """peft's LoRA merged into the frozen weights while a stage is evaluated: ``W + (α/r)·B·A``, one
    product per layer instead of three (about a third less evaluation time on the digits model).
    On exit the adapters are unmerged and the base weights put back bit for bit from a copy kept in
    host memory, since ``W + Δ − Δ`` rounds. Nothing is merged where that would change what is
    computed: a base that is not a plain fp32 ``nn.Linear`` (bf16 would round the adapter away), a
    weight shared with another module (tied embeddings), or the output head, which a benchmark may
    read directly."""
    from peft.tuners.lora import LoraLayer

    named = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    layers = [layer for _, layer in named]
    bases = [layer.get_base_layer() for layer in layers]
    uses = Counter(p.data_ptr() for module in model.modules() for p in module.parameters(recurse=False))
    mergeable = (
        layers
        and not any(layer.merged for layer in layers)
        and all(type(base) is nn.Linear and base.weight.dtype == torch.float32 for base in bases)
        and all(uses[base.weight.data_ptr()] == 1 for base in bases)
        and not any(name.rsplit(".", 1)[-1] == "lm_head" for name, _ in named)
    )
    if not mergeable:
        yield
        return
    saved = [base.weight.detach().to("cpu", copy=True) for base in bases]
    try:
        with torch.no_grad():
            for layer in layers:
                layer.merge()
        yield
    finally:
        with torch.no_grad():
            for layer, base, weight in zip(layers, bases, saved, strict=True):
                if layer.merged:
                    layer.unmerge()
                base.weight.copy_(weight)


@register_method
class SeqLoRA(Method):
    """One peft LoRA on all tokens, carried across tasks. Its rank is ``lora_r`` when set, otherwise
    the rank whose parameter count matches MoDE's on the model it is attached to
    (:func:`mode_matched_rank`), so the baseline is compared at equal trainable parameters."""

    NAME = "seq_lora"

    def __init__(self, config: MethodConfig, token_ids: TokenIds) -> None:
        super().__init__(config, token_ids)
        self._matched_rank: int | None = None

    @property
    def rank(self) -> int:
        if self.config.lora_r is not None:
            return self.config.lora_r
        if self._matched_rank is None:
            raise RuntimeError("the parameter-matched rank is known once the method is attached to a model")
        return self._matched_rank

    @classmethod
    def adapter_factors(cls, config: MethodConfig) -> list[tuple[str, int]]:
        if config.lora_r is not None:
            return [("method.lora_r", config.lora_r)]
        # Matched to MoDE: checked as MoDE's own factors (same parameter count for the memory
        # estimate; the rank itself is capped at the layer widths when it is computed).
        return [("method.r", config.r)] * (config.num_experts + 1)

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
        if self.config.lora_r is None:
            self._matched_rank = mode_matched_rank(self.config, targeted_linears(model, self.config.target_modules))
        c = self._adapter_config()
        from peft import LoraConfig, get_peft_model  # imported here: peft pulls in transformers (seconds)

        lora = LoraConfig(
            r=c["r"], lora_alpha=c["alpha"], lora_dropout=c["dropout"], target_modules=c["target_modules"]
        )
        return get_peft_model(model, lora)

    def teacher(self, model: nn.Module) -> AbstractContextManager:
        return model.disable_adapter()

    def evaluation(self, model: nn.Module) -> AbstractContextManager:
        return merged_for_evaluation(model)

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
