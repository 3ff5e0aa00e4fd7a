"""``MoDEConfig``: the shape of the MoDE adapters. Defaults are the paper's (r 8, α 16, 4 experts)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class MoDEConfig:
    """Configuration of the modality-decoupled adapters attached to each target linear.

    Args:
        r: rank of every LoRA expert and of the V-Adapter.
        num_experts: LoRA experts in the text mixture (T-MoE), mixed by a dense softmax router.
        alpha: LoRA scaling numerator; each adapter output is multiplied by ``alpha / r``.
        dropout: dropout on the adapter input (the router sees the un-dropped input).
        target_modules: names of the linear layers to adapt (last component of the module path).
        image_adapter: give image tokens their own LoRA (the V-Adapter). False leaves image tokens
            on the frozen base weights (the ``tmoe_only`` ablation) unless ``experts_on_image_tokens``.
        experts_on_image_tokens: route image tokens through the T-MoE too (the ``moelora`` baseline).
            Cannot be combined with ``image_adapter``.
    """

    r: int = 8
    num_experts: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=("gate_proj", "up_proj", "down_proj"))
    image_adapter: bool = True
    experts_on_image_tokens: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"MoDEConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts <= 0:
            raise ValueError(f"MoDEConfig.num_experts must be a positive integer, got {self.num_experts!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"MoDEConfig.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoDEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError("MoDEConfig.target_modules must be a non-empty list of module names, e.g. ['up_proj']")
        if self.image_adapter and self.experts_on_image_tokens:
            raise ValueError(
                "MoDEConfig: image_adapter and experts_on_image_tokens are exclusive "
                "(image tokens go either to the V-Adapter or to the experts); set one to false"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoDEConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MoDEConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)
