"""O-LoRA: Orthogonal Subspace Learning (Wang et al., "Orthogonal Subspace Learning for Language Model
Continual Learning", Findings of EMNLP 2023; official code: github.com/cmnlp/O-LoRA).

Each task learns its own LoRA; the LoRAs of finished tasks are frozen, and the new one is pushed,
by a penalty, into a subspace orthogonal to theirs, so that learning it disturbs them as little as
possible. No data of old tasks is stored or replayed.

What :class:`OLoRA` does:

* **Adapters.** Every targeted linear (``method.target_modules``; the MLP's gate/up/down
  projections by default) gets one LoRA pair per task of the sequence: ``A_t [r, in]``
  (Kaiming-uniform, as peft) and ``B_t [out, r]`` (zero), scaling ``s = α/r`` (``method.alpha``,
  ``method.r``). While task ``c`` (0-based) trains, and when the model is evaluated after it,

      y = W x + s · Σ_{t ≤ c} B_t A_t drop(x)

  Only ``A_c, B_c`` are trainable; the pairs of earlier tasks are frozen (``requires_grad`` off,
  so they get no gradient and the optimizer never sees them); the pairs of later tasks do not take
  part in the forward. The pairs are created for every task of the run in :meth:`OLoRA.setup`
  (``len(run.config.tasks)``, known there, not at ``attach``); :meth:`OLoRA.attach` creates the
  first one, so the method also works without a run (the first task is current by default).
* **Loss.** At task ``c``:

      L = CE_task + λ1 · L_orth + λ2 · L_2
      L_orth = Σ_layers Σ_{t < c} Σ_{j,k} ((A_t A_c^T)[j, k])²     (= Σ ‖A_t A_c^T‖_F²)
      L_2    = Σ_layers (‖A_c‖_F² + ‖B_c‖_F²)

  with ``λ1 = method.olora_weight`` and ``λ2 = method.olora_l2``. ``loss_terms`` returns
  ``task``, ``orth`` (= λ1·L_orth; absent on the first task, where no earlier subspace exists, and
  when λ1 = 0) and ``l2`` (= λ2·L_2; absent when λ2 = 0, the default). Both penalties are computed
  in fp32 outside autocast.
* **Resume.** Which task is current is the method's state (:meth:`OLoRA.state_dict`:
  ``{"current_task": c}``, also written into the adapter config): a run resumed inside task ``c``
  (where ``before_task`` does not run again) trains ``A_c, B_c`` with ``A_0..A_{c-1}`` in the
  penalty. The adapter files hold every task's pair, the not-yet-trained ones included, so a
  resumed run starts later tasks from the same initial ``A``.
* **Teacher.** :meth:`OLoRA.teacher` bypasses every adapter: the frozen base model.

Differences from the paper and its code, and why:

* The paper writes the orthogonality loss as the sum of *squared* entries of ``O = A_t^T A_c``
  (its ``A`` is ``[in, r]``; here ``A`` is ``[r, in]`` as in peft, so the product is
  ``A_t A_c^T``); the official code sums their *absolute values* (``torch.abs(A_old @ A_new.T)
  .sum()``). The paper's formula is used here. The official code's L2 term is ``Σ ‖θ‖₂`` (a norm,
  not squared) over the new LoRA's tensors; the squared form (the usual weight-decay penalty) is
  used here. Its default λ2 = 0 is kept, so by default neither choice changes training.
* LoRA sits on the MLP projections, not on attention's q/v as in the paper: every adapter of this
  project (MoDE, seq_lora, lwf) targets the MLP, and the methods are compared on the same layers.
* The official code merges the old tasks' LoRAs into one LoRA of rank ``r·(t-1)`` (concatenating
  the A's and B's) and adds a fresh ``loranew``; keeping one pair per task, as here, is the same
  function and the same penalty (the squared entries of a stacked product are the sum over its
  blocks).
* One dropout mask of ``x`` is shared by all task LoRAs of a layer (they are computed as one
  stacked product); peft-style separate adapters would each draw their own.
* No instruction-schema prompts and no task-specific decoding: the benchmarks give each task's
  input and answer format, and the model is evaluated with every learned LoRA active, as the
  paper's task-ID-free inference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainables.adapter_io import AdapterMismatchError, assign_strict, compare_configs, read_adapter, save_adapter
from trainables.batching import Batch
from trainables.methods.base import Method, MethodConfig
from trainables.methods.registry import register_method
from trainables.run_context import RunContext
from trainables.vocab import TokenIds

ADAPTER_TYPE = "olora"
# Checked on load: what fixes the tensors' shapes and what they compute (dropout does neither).
CHECKED_FIELDS = ["adapter_type", "r", "alpha", "target_modules"]


@dataclass
class OLoRAState:
    """Shared by every :class:`OLoRALinear` of one model: the current task and the teacher switch."""

    current_task: int = 0  # tasks 0..current_task contribute to the forward; current_task trains
    teacher: bool = False  # True: every adapter bypassed (the frozen base model)


class OLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus one LoRA pair per task: ``olora_A[t] [r, in]``, ``olora_B[t] [out, r]``.

    ``y = W x + (α/r) · Σ_{t ≤ c} B_t A_t drop(x)`` with ``c = state.current_task``, as one
    stacked product ``[B_0 … B_c] · [A_0; …; A_c] · drop(x)``.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, state: OLoRAState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / r
        self.state = state  # shared, not a submodule
        self.olora_A = nn.ParameterList()
        self.olora_B = nn.ParameterList()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def num_tasks(self) -> int:
        return len(self.olora_A)

    def add_task(self) -> None:
        """Append a frozen pair for one more task: A Kaiming-uniform (as peft's LoRA A), B zero."""
        weight = self.base_layer.weight
        # fp32 master weights even on a bf16 base; autocast picks the compute dtype.
        a = torch.empty(self.r, self.base_layer.in_features, device=weight.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.base_layer.out_features, self.r, device=weight.device)
        self.olora_A.append(nn.Parameter(a, requires_grad=False))
        self.olora_B.append(nn.Parameter(b, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.state.teacher:
            return result
        active = self.state.current_task + 1
        if active > self.num_tasks:
            raise RuntimeError(f"O-LoRA layer has {self.num_tasks} task adapters, task {active} is current")
        a_list, b_list = list(self.olora_A)[:active], list(self.olora_B)[:active]
        a = a_list[0] if active == 1 else torch.cat(a_list, dim=0)  # [(c+1)·r, in]
        b = b_list[0] if active == 1 else torch.cat(b_list, dim=1)  # [out, (c+1)·r]
        hidden = nn.functional.linear(self.dropout(x).to(a.dtype), a)
        delta = nn.functional.linear(hidden, b) * self.scaling
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.base_layer.in_features}, out={self.base_layer.out_features}, r={self.r}, tasks={self.num_tasks}"
        )


def olora_layers(model: nn.Module) -> list[tuple[str, OLoRALinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, OLoRALinear)]


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """``Σ_layers Σ_{t < c} Σ_{j,k} ((A_t A_c^T)[j, k])²`` in fp32, ``c`` the current task (0 when c = 0)."""
    layers = olora_layers(model)
    if not layers:
        raise ValueError("no O-LoRA adapters on this model")
    current = layers[0][1].state.current_task
    first = layers[0][1].olora_A[0]
    total = torch.zeros((), device=first.device)
    if current == 0:
        return total
    with torch.autocast(first.device.type, enabled=False):
        for _, layer in layers:
            old = torch.cat(list(layer.olora_A)[:current], dim=0).float()  # [c·r, in]
            total = total + (old @ layer.olora_A[current].float().T).square().sum()
    return total


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """``Σ_layers ‖A_c‖_F² + ‖B_c‖_F²`` in fp32, ``c`` the current task."""
    layers = olora_layers(model)
    if not layers:
        raise ValueError("no O-LoRA adapters on this model")
    current = layers[0][1].state.current_task
    total = torch.zeros((), device=layers[0][1].olora_A[0].device)
    with torch.autocast(total.device.type, enabled=False):
        for _, layer in layers:
            for tensor in (layer.olora_A[current], layer.olora_B[current]):
                total = total + tensor.float().square().sum()
    return total


@contextmanager
def _bypassed(state: OLoRAState) -> Iterator[None]:
    previous, state.teacher = state.teacher, True
    try:
        yield
    finally:
        state.teacher = previous


@register_method
class OLoRA(Method):
    """O-LoRA: one LoRA per task, earlier ones frozen, the new one kept orthogonal to them (λ1·Σ‖A_t A_c^T‖²)."""

    NAME = "olora"

    def __init__(self, config: MethodConfig, token_ids: TokenIds) -> None:
        super().__init__(config, token_ids)
        self._state: OLoRAState | None = None
        self._layers: list[tuple[str, OLoRALinear]] = []

    @classmethod
    def adapter_factors(cls, config: MethodConfig) -> list[tuple[str, int]]:
        # One rank-r pair per task and layer is stored, but only the current task's is trained (the
        # frozen pairs cost 4 bytes a parameter, not the 16 of a trained one) and the number of tasks
        # is not known here: the check is for the one trained pair (the width check is per pair anyway).
        return [("method.r", config.r)]

    # --- adapters -------------------------------------------------------------------------------

    @property
    def current_task(self) -> int:
        return self._shared().current_task

    def _shared(self) -> OLoRAState:
        if self._state is None:
            raise RuntimeError("olora: attach the method to a model first")
        return self._state

    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze ``model`` and wrap every target linear with an :class:`OLoRALinear` holding the
        first task's pair (more are added by :meth:`setup` / :meth:`before_task`)."""
        if olora_layers(model):
            raise ValueError("O-LoRA adapters are already attached to this model; attach to a fresh base model")
        c = self.config
        targets = [
            (name, module)
            for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] in c.target_modules and isinstance(module, nn.Linear)
        ]
        if not targets:
            raise ValueError(f"method.target_modules {list(c.target_modules)} matched no nn.Linear to attach O-LoRA to")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        state = OLoRAState()
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, OLoRALinear(module, c.r, c.alpha, c.dropout, state))
        self._state, self._layers = state, olora_layers(model)
        self._grow(1)
        self._activate(0)
        return model

    @property
    def num_tasks(self) -> int:
        return self._layers[0][1].num_tasks if self._layers else 0

    def _grow(self, num_tasks: int) -> None:
        """Add pairs until every layer has ``num_tasks`` (layer by layer, in module order)."""
        for _, layer in self._layers:
            while layer.num_tasks < num_tasks:
                layer.add_task()

    def _activate(self, task_index: int) -> None:
        """Make ``task_index`` current: its pair trainable, every other pair frozen (and its stale
        gradient from the task that trained it dropped)."""
        if not 0 <= task_index < self.num_tasks:
            raise ValueError(f"olora: task {task_index} is out of range (the model has {self.num_tasks} task adapters)")
        self._shared().current_task = task_index
        for _, layer in self._layers:
            for t in range(layer.num_tasks):
                for parameter in (layer.olora_A[t], layer.olora_B[t]):
                    parameter.requires_grad_(t == task_index)
                    if t != task_index:
                        parameter.grad = None

    # --- engine hooks ---------------------------------------------------------------------------

    def setup(self, model: nn.Module, run: RunContext) -> None:
        """One pair per task of the run (before a checkpoint is restored into them)."""
        self._grow(len(run.config.tasks))

    def before_task(self, model: nn.Module, task_index: int, run: RunContext | None) -> None:
        """Task ``task_index`` becomes current: its pair trains, the earlier ones are frozen."""
        self._grow(task_index + 1)
        self._activate(task_index)

    def trainable_parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        """The current task's ``A`` and ``B`` of every layer (made the only trainable adapter tensors)."""
        current = self.current_task
        self._activate(current)
        return iter([p for _, layer in self._layers for p in (layer.olora_A[current], layer.olora_B[current])])

    def loss_terms(self, model: nn.Module, batch: Batch, **extra: Any) -> dict[str, torch.Tensor]:
        """``task`` CE, ``orth`` = λ1·L_orth (from the second task on) and ``l2`` = λ2·L_2 (when λ2 > 0)."""
        terms = super().loss_terms(model, batch, **extra)
        if self.current_task > 0 and self.config.olora_weight > 0:
            terms["orth"] = self.config.olora_weight * orthogonality_loss(model)
        if self.config.olora_l2 > 0:
            terms["l2"] = self.config.olora_l2 * l2_penalty(model)
        return terms

    def teacher(self, model: nn.Module) -> AbstractContextManager:
        return _bypassed(self._shared())

    # --- persistence ----------------------------------------------------------------------------

    def _adapter_config(self) -> dict[str, Any]:
        return {
            "adapter_type": ADAPTER_TYPE,
            "r": self.config.r,
            "alpha": self.config.alpha,
            "dropout": self.config.dropout,
            "target_modules": list(self.config.target_modules),
            "num_tasks": self.num_tasks,
            "current_task": self.current_task,
        }

    def _tensors(self) -> dict[str, nn.Parameter]:
        return {
            f"{name}.olora_{kind}.{t}": getattr(layer, f"olora_{kind}")[t]
            for name, layer in self._layers
            for kind in ("A", "B")
            for t in range(layer.num_tasks)
        }

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        """Every task's pair (trained, current and not yet trained) and the config."""
        return save_adapter(directory, self._tensors(), self._adapter_config())

    def load(self, model: nn.Module, directory: str | Path) -> nn.Module:
        """Load what :meth:`save` wrote. A model with fewer task pairs than stored (a fresh
        ``attach``) gets the missing ones first; more, or another shape, is refused."""
        tensors, stored = read_adapter(directory)
        expected = self._adapter_config()
        compare_configs(stored, expected, CHECKED_FIELDS)
        num_tasks = stored.get("num_tasks")
        if isinstance(num_tasks, int) and num_tasks > self.num_tasks:
            self._grow(num_tasks)
        compare_configs(stored, self._adapter_config(), ["num_tasks"])
        current = stored.get("current_task")
        if not isinstance(current, int) or not 0 <= current < self.num_tasks:
            raise AdapterMismatchError(f"adapter config: current_task {current!r} is not a task index")
        assign_strict(self._tensors(), tensors)
        self._activate(current)
        return model

    def state_dict(self) -> dict[str, Any]:
        """The current task, so a run resumed inside it trains the same pair."""
        return {"current_task": self.current_task}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # no method state in the checkpoint: keep what the adapter config said
            return
        if set(state) != {"current_task"} or not isinstance(state["current_task"], int):
            raise ValueError(f"olora state must be {{'current_task': int}}, got keys {sorted(state)}")
        self._activate(state["current_task"])
