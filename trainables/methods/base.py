"""What every continual-learning method provides, and the shared MoDE-family implementation.

A method is a small unit selected by name. Call order used by the engine:
    ``attach(model)`` once → per step ``loss_terms(model, batch, stream)`` (the engine sums the
    returned terms and back-propagates) → ``save(model, dir)`` / ``load(model, dir)`` at checkpoints.
``teacher(model)`` is a context in which the model computes the frozen base model's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from trainables.losses import causal_lm_logits, kd_loss, task_loss
from trainables.mode import MoDEConfig, attach_mode, load_mode, route_as, save_mode, teacher_mode
from trainables.vocab import TokenIds


@dataclass(frozen=True)
class MethodConfig:
    """Hyper-parameters shared by all methods (each method reads the ones it uses).

    Args:
        name: method name (see ``trainables.methods.METHODS``).
        r / num_experts / alpha / dropout / target_modules: adapter shape (MoDEConfig fields).
        kd_weight: λ, weight of the distillation loss (``mode`` only).
        kd_temperature: β, applied once to both logits; the loss is scaled by β².
        kd_top_k: restrict the KL to the teacher's top-K ids per position (None = full image vocabulary).
        kd_teacher: ``cached`` reads the frozen teacher's logits from the teacher cache (computed once
            per base model, stream and K, shared by every task and trial); ``live`` runs the teacher
            forward every step. Both give the same loss up to float rounding.
        lora_r: rank of ``seq_lora``'s single LoRA; default r·num_experts (same total rank as the T-MoE).
    """

    name: str = "mode"
    r: int = 8
    num_experts: int = 4
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=("gate_proj", "up_proj", "down_proj"))
    kd_weight: float = 0.3
    kd_temperature: float = 2.0
    kd_top_k: int | None = None
    kd_teacher: str = "cached"
    lora_r: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not math.isfinite(self.kd_weight) or self.kd_weight < 0:
            raise ValueError(f"kd_weight (λ) must be a finite number ≥ 0, got {self.kd_weight!r}")
        if not math.isfinite(self.kd_temperature) or self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be a positive number, got {self.kd_temperature!r}")
        if self.kd_top_k is not None and self.kd_top_k <= 0:
            raise ValueError(f"kd_top_k must be a positive integer or null, got {self.kd_top_k!r}")
        if self.kd_teacher not in ("cached", "live"):
            raise ValueError(f"kd_teacher must be 'cached' or 'live', got {self.kd_teacher!r}")
        if self.lora_r is not None and self.lora_r <= 0:
            raise ValueError(f"lora_r must be a positive integer or null, got {self.lora_r!r}")
        self.mode_config()  # validates r, num_experts, alpha, dropout, target_modules

    def mode_config(self, **flags: bool) -> MoDEConfig:
        return MoDEConfig(
            r=self.r,
            num_experts=self.num_experts,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.target_modules,
            **flags,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


@dataclass
class Batch:
    """A padded batch of task samples. ``is_generation[b]``: sample b's answer is an image."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    is_generation: torch.Tensor  # [B] bool


@dataclass
class StreamBatch:
    """A batch of the image-generation distillation stream (image spans only).

    ``teacher_logits`` (optional, from :mod:`trainables.teacher_cache`) are the frozen base model's
    image-vocabulary logits for these positions; ``teacher_index`` says which image-vocabulary
    entries they are when the cache holds only the teacher's top-K. Without them the teacher runs live.
    """

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    teacher_logits: torch.Tensor | None = None  # [B, S, K] fp32
    teacher_index: torch.Tensor | None = None  # [B, S, K] positions in the image vocabulary


class Method:
    """Base class: subclasses set ``NAME`` and ``USES_KD`` and implement ``attach``/``teacher``/``save``/``load``."""

    NAME: ClassVar[str]
    USES_KD: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, token_ids: TokenIds) -> None:
        self.config = config
        self.token_ids = token_ids

    def attach(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def teacher(self, model: nn.Module) -> AbstractContextManager:
        raise NotImplementedError

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        raise NotImplementedError

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        return (p for p in model.parameters() if p.requires_grad)

    def loss_terms(self, model: nn.Module, batch: Batch, stream: StreamBatch | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one step, already weighted; the engine back-propagates their sum."""
        terms = {"task": task_loss(model, batch.input_ids, batch.attention_mask, batch.is_generation, self.token_ids)}
        if self.USES_KD and stream is not None and self.config.kd_weight > 0:
            terms["kd"] = self.config.kd_weight * self.distillation(model, stream)
        return terms

    def distillation(self, model: nn.Module, stream: StreamBatch) -> torch.Tensor:
        raise NotImplementedError(f"{self.NAME} does not distil")


class MoDEFamily(Method):
    """Methods built from MoDE layers; subclasses choose the routing flags and whether to distil."""

    IMAGE_ADAPTER: ClassVar[bool] = True
    EXPERTS_ON_IMAGE_TOKENS: ClassVar[bool] = False

    def attach(self, model: nn.Module) -> nn.Module:
        flags = {"image_adapter": self.IMAGE_ADAPTER, "experts_on_image_tokens": self.EXPERTS_ON_IMAGE_TOKENS}
        return attach_mode(model, self.config.mode_config(**flags), self.token_ids)

    def teacher(self, model: nn.Module) -> AbstractContextManager:
        return teacher_mode(model)

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        return save_mode(model, directory)

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        return load_mode(model, directory)

    def distillation(self, model: nn.Module, stream: StreamBatch) -> torch.Tensor:
        """KL(frozen base ‖ student) on the image stream, every student token routed to the V-Adapter,
        over the image vocabulary (codebook + begin/end-image), so only ``mode_image`` gets gradient."""
        image_vocab = self.token_ids.image_vocab_mask(stream.input_ids.device).nonzero().squeeze(-1)
        if stream.teacher_logits is None:
            teacher_logits = self.teacher_logits(model, stream.input_ids, stream.attention_mask)
        else:
            teacher_logits = stream.teacher_logits
        with route_as(model, "image"):
            student_logits = causal_lm_logits(model, stream.input_ids, stream.attention_mask)[..., image_vocab]
        return kd_loss(
            teacher_logits,
            student_logits,
            temperature=self.config.kd_temperature,
            top_k=self.config.kd_top_k,
            mask=stream.attention_mask.bool(),
            teacher_index=stream.teacher_index,
        )

    def teacher_logits(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen base model's logits over the image vocabulary ``[B, S, |image vocab|]``."""
        image_vocab = self.token_ids.image_vocab_mask(input_ids.device).nonzero().squeeze(-1)
        with torch.no_grad(), self.teacher(model):
            return causal_lm_logits(model, input_ids, attention_mask)[..., image_vocab]
