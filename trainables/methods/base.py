"""What every continual-learning method provides, and the shared MoDE-family implementation.

A method is one class, selected by its ``NAME`` (registered with
:func:`trainables.methods.registry.register_method`). The engine calls, in this order:

    ``attach(model)`` once → ``setup(model, run)`` once (before any checkpoint is restored)
    for each task: ``before_task(model, i, run)`` (only when the task starts, not when a run
        resumes inside it) → per step ``extra_batches(model, i, step, run)`` → ``loss_terms(model,
        batch, **extra)`` (the engine sums the returned terms and back-propagates) →
        ``after_task(model, i, run)`` (before the task's evaluation and checkpoint)
    at every checkpoint: ``save(model, dir)`` and ``state_dict()``; on restore ``load(model, dir)``
        and ``load_state_dict(state)``.

``trainable_parameters(model)`` is read at the start of every task (a method may add adapters per
task). ``teacher(model)`` is a context in which the model computes the frozen base model's outputs;
``evaluation(model)`` is a context around each stage's evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from trainables.batching import Batch, StreamBatch, to_device
from trainables.config_rules import ConfigError, check_fields, setting
from trainables.losses import causal_lm_logits, kd_loss, task_loss
from trainables.methods.registry import METHODS
from trainables.mode import MoDEConfig, attach_mode, load_mode, route_as, save_mode, teacher_mode
from trainables.run_context import RunContext
from trainables.teacher_cache import TeacherCache, load_or_build, model_fingerprint
from trainables.vocab import TokenIds


def _target_modules(value: Any, path: str, data: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(path, "expected a non-empty list of module names, e.g. [gate_proj, up_proj]")
    return tuple(value)


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
        lora_r: rank of ``seq_lora``'s single LoRA; default (None): the rank whose trainable
            parameters match MoDE's (experts, router, V-Adapter) on the model it is attached to.
        kd_batch_size: image-stream sequences per distillation step (None: the task batch size).
            The KD loss is a per-token mean, so a smaller batch keeps its expected gradient and
            cuts its cost (it is most of a MoDE step's extra cost over LoRA).
        replay_per_task / replay_policy / replay_ratio: ``replay``'s buffer — ``quota`` keeps
            exactly ``replay_per_task`` samples of every finished task; ``reservoir`` keeps
            ``replay_per_task × (tasks − 1)`` samples by reservoir sampling over everything trained
            on; ``replay_ratio`` is the share of each batch drawn from the buffer (in [0, 1)).
        lwf_weight / lwf_temperature: ``lwf``'s distillation weight and temperature.
        olora_weight / olora_l2: ``olora``'s orthogonality weight λ1 and its L2 weight λ2 on the
            current task's LoRA (the O-LoRA paper's λ1, λ2).
        clmoe_top_k_instance / clmoe_top_k_task: ``cl_moe``'s k for the instance-level router (local
            experts per token) and for the task-level router (global experts per task); capped at
            ``num_experts``.
        clmoe_router_mix: ``cl_moe``'s β in g = β·G^I(x) + (1 − β)·G^T(t), the share of the
            instance-level gate (≤ 1).
        clmoe_beta_shared / clmoe_beta_new / clmoe_beta_old: ``cl_moe``'s momentum β_e after each
            task (θ_e ← β_e·θ_e^old + (1 − β_e)·θ_e^new, each ≤ 1) for experts the task shares with
            earlier tasks, experts only this task selected, and experts this task did not select.
        clmoe_key_samples: training samples of a task whose mean layer inputs are its key (the
            task-level router's input and the task identifier at inference).
    """

    name: str = setting("mode", choices=lambda: METHODS, noun="method")
    r: int = setting(8, gt=0)
    num_experts: int = setting(4, gt=0)
    alpha: float = setting(16.0, gt=0)
    dropout: float = setting(0.05, ge=0)
    target_modules: tuple[str, ...] = setting(("gate_proj", "up_proj", "down_proj"), parse=_target_modules)
    kd_weight: float = setting(0.3, ge=0)
    kd_temperature: float = setting(2.0, gt=0)
    kd_top_k: int | None = setting(None, gt=0)
    kd_teacher: str = setting("cached", choices=("cached", "live"))
    lora_r: int | None = setting(None, gt=0)
    kd_batch_size: int | None = setting(8, gt=0)
    replay_per_task: int = setting(40, gt=0)
    replay_policy: str = setting("quota", choices=("quota", "reservoir"))
    replay_ratio: float = setting(0.25, ge=0)  # < 1: checked below
    lwf_weight: float = setting(1.0, ge=0)
    lwf_temperature: float = setting(2.0, gt=0)
    olora_weight: float = setting(0.5, ge=0)
    olora_l2: float = setting(0.0, ge=0)
    clmoe_top_k_instance: int = setting(2, gt=0)
    clmoe_top_k_task: int = setting(2, gt=0)
    clmoe_router_mix: float = setting(0.5, ge=0)  # ≤ 1: checked below
    clmoe_beta_shared: float = setting(0.5, ge=0)  # the three betas ≤ 1: checked below
    clmoe_beta_new: float = setting(0.3, ge=0)
    clmoe_beta_old: float = setting(0.7, ge=0)
    clmoe_key_samples: int = setting(128, gt=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        check_fields(self)
        if not self.replay_ratio < 1:
            reason = f"must be < 1 (a batch keeps some current-task samples), got {self.replay_ratio}"
            raise ConfigError("method.replay_ratio", reason)
        for name in ("clmoe_router_mix", "clmoe_beta_shared", "clmoe_beta_new", "clmoe_beta_old"):
            if getattr(self, name) > 1:  # shares and momenta: a value above 1 extrapolates
                raise ConfigError(f"method.{name}", f"must be ≤ 1, got {getattr(self, name)!r}")
        self.mode_config()  # what the adapter itself checks beyond the field rules (e.g. dropout < 1)

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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout) for the duration; each module's own flag restored after
    (``model.train()`` afterwards would also switch on modules that were deliberately in eval)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class Method:
    """Base class: subclasses set ``NAME`` (and ``USES_KD`` if they distil from the frozen base) and
    implement ``attach``/``teacher``/``save``/``load``; every other hook has a neutral default."""

    NAME: ClassVar[str]
    USES_KD: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, token_ids: TokenIds) -> None:
        self.config = config
        self.token_ids = token_ids

    def attach(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def adapter_factors(cls, config: MethodConfig) -> list[tuple[str, int]]:
        """One ``(config field, rank)`` per low-rank pair attached to every targeted layer: checked
        against the model's widths and memory before it loads (:mod:`trainables.adapter_budget`)."""
        return [("method.r", config.r)]

    def teacher(self, model: nn.Module) -> AbstractContextManager:
        raise NotImplementedError

    def evaluation(self, model: nn.Module) -> AbstractContextManager:
        """Around each stage's evaluation, stage 0 included, entered with gradients on and the
        model in whatever mode it was left (the benchmark then evaluates in eval mode without
        gradients): the model may be put in a faster form that computes the same function, and
        must be exactly as before on exit, exceptions included."""
        return nullcontext()

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        raise NotImplementedError

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        raise NotImplementedError

    def setup(self, model: nn.Module, run: RunContext) -> None:
        """Once per run, after ``attach``: build what every task shares (e.g. a teacher cache)."""

    def before_task(self, model: nn.Module, task_index: int, run: RunContext) -> None:
        """When task ``task_index`` starts (not when a run resumes inside it: restored state covers that)."""

    def after_task(self, model: nn.Module, task_index: int, run: RunContext) -> None:
        """When task ``task_index``'s last step is done, before its evaluation and checkpoint."""

    def extra_batches(self, model: nn.Module, task_index: int, step: int, run: RunContext) -> dict[str, Any]:
        """Inputs beyond the task batch for optimizer step ``step`` (passed to :meth:`loss_terms` as
        keyword arguments). Draw randomness from ``run.generator(task_index, step, …)`` so a resumed
        run draws the same, and take this rank's share with ``run.dist.shard``."""
        return {}

    def loss_terms(self, model: nn.Module, batch: Batch, **extra: Any) -> dict[str, torch.Tensor]:
        """Loss terms of one step, already weighted; the engine back-propagates their sum."""
        return {"task": task_loss(model, batch.input_ids, batch.attention_mask, batch.is_generation, self.token_ids)}

    def state_dict(self) -> dict[str, Any]:
        """State beyond the adapter weights that a resumed run needs (e.g. a replay buffer): tensors,
        numbers, strings, lists and dicts of them; written with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"method {self.NAME!r} keeps no state, but the checkpoint holds {sorted(state)}")

    def trainable_parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        return (p for p in model.parameters() if p.requires_grad)


class MoDEFamily(Method):
    """Methods built from MoDE layers; subclasses choose the routing flags and whether to distil."""

    IMAGE_ADAPTER: ClassVar[bool] = True
    EXPERTS_ON_IMAGE_TOKENS: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, token_ids: TokenIds) -> None:
        super().__init__(config, token_ids)
        self._teacher_cache: TeacherCache | None = None

    @property
    def uses_teacher_cache(self) -> bool:
        return self.USES_KD and self.config.kd_teacher == "cached" and self.config.kd_weight > 0

    @classmethod
    def adapter_factors(cls, config: MethodConfig) -> list[tuple[str, int]]:
        """r for each of the num_experts LoRA experts, and for the V-Adapter when there is one."""
        return [("method.r", config.r)] * (config.num_experts + int(cls.IMAGE_ADAPTER))

    def attach(self, model: nn.Module) -> nn.Module:
        flags = {"image_adapter": self.IMAGE_ADAPTER, "experts_on_image_tokens": self.EXPERTS_ON_IMAGE_TOKENS}
        return attach_mode(model, self.config.mode_config(**flags), self.token_ids)

    def setup(self, model: nn.Module, run: RunContext) -> None:
        """With a cached teacher: read (or compute once) the frozen base model's logits on the
        benchmark's distillation stream, shared by every task and every trial of this base model."""
        if not self.uses_teacher_cache:
            return
        with run.timer("teacher_cache"):
            # Keyed by the frozen base model alone: its weights under their names before attach.
            base = {
                name.replace(".base_layer.", "."): tensor
                for name, tensor in model.state_dict().items()
                if ".mode_" not in name
            }
            self._teacher_cache = load_or_build(
                Path(run.work_dir) / "teacher_cache",
                model_fingerprint(model, base),
                run.bench.stream,
                int(self.token_ids.image_vocab_mask().sum()),
                self.config.kd_top_k,
                lambda ids, mask: self.teacher_logits(model, ids, mask),
                run.device,
                run.log,
            )

    def extra_batches(self, model: nn.Module, task_index: int, step: int, run: RunContext) -> dict[str, Any]:
        """The distillation batch: ``kd_batch_size`` stream samples (default: as many as the task
        batch), drawn with replacement."""
        if not self.USES_KD:
            return {}
        stream = run.bench.stream
        size = self.config.kd_batch_size or run.config.train.batch_size
        picks = torch.randint(len(stream), (size,), generator=run.generator(task_index, step, 1))
        mine = run.dist.shard(picks.tolist())
        batch = stream.stream_batch_of(mine)
        if self._teacher_cache is not None:
            width = batch.input_ids.shape[1]
            batch.teacher_logits, batch.teacher_index = self._teacher_cache.batch(mine, width)
        return {"stream": to_device(batch, run.device)}

    def loss_terms(
        self, model: nn.Module, batch: Batch, stream: StreamBatch | None = None, **extra: Any
    ) -> dict[str, torch.Tensor]:
        """The task loss, plus λ·KD on the image stream when the method distils."""
        terms = super().loss_terms(model, batch, **extra)
        if self.USES_KD and stream is not None and self.config.kd_weight > 0:
            terms["kd"] = self.config.kd_weight * self.distillation(model, stream)
        return terms

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
