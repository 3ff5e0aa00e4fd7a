"""CL-MoE: dual-router LoRA experts with momentum merging after every task.

Paper: Huai et al., "CL-MoE: Enhancing Multimodal Large Language Model with Dual Momentum
Mixture-of-Experts for Continual Visual Question Answering", CVPR 2025 (arXiv 2503.00413); official
code ECNU-ICALK/CL-MoE, ported to LlamaFactory in ECNU-ICALK/EasyCL (``easycl/cl/clmoe``).

CL-MoE has two parts, both implemented here:

* **Dual-Router MoE (RMoE).** Every adapted linear carries E LoRA experts ``E_e(x) = B_e A_e x``.
  An *instance-level* router picks each token's k_I *local* experts from the token itself, a
  *task-level* router picks the task's k_T *global* experts from a representation of the task, and
  the two gates are mixed (the paper's eq. for x̂, with its β):

      y      = W x + (α/r) Σ_e g_e(x) B_e A_e drop(x)
      g(x)   = β · G^I(x) + (1 − β) · G^T(t)                      β = ``clmoe_router_mix``
      G^I(x) = TopK_{k_I}(W^I x)                                  k_I = ``clmoe_top_k_instance``
      G^T(t) = TopK_{k_T}(W^T μ_t)                                k_T = ``clmoe_top_k_task``

  ``TopK_k(z)`` is the softmax over the k largest entries of z, zero elsewhere (the top-k softmax
  probabilities renormalised). ``W^I``, ``W^T`` ``[E, in]`` are trained with the experts.
  ``μ_t`` (the task's *key*) is the mean input of this layer over the tokens (padding excluded) of
  ``clmoe_key_samples`` training samples of task t, computed with the model as it is when task t
  starts (:meth:`CLMoE.before_task`); it stays fixed while task t trains. While task t trains, G^T
  uses μ_t. At evaluation the task is not given to the model, so every token takes the task whose
  key is most similar to it: t(x) = argmax_s cos(x, μ_s) over the tasks started so far (before the
  first task there is no key and g = G^I).

* **Dynamic Momentum MoE (MMoE).** After task t (index ≥ 1) every expert's parameters are a momentum
  combination of its value when task t started (``θ_e^old``, snapshot in ``before_task``) and the
  trained value (``θ_e^new``) — the paper's θ_t = λ ∘ θ_{t−1} + (1 − λ) ∘ φ_t, λ per expert:

      θ_e ← β_e · θ_e^old + (1 − β_e) · θ_e^new                  θ_e = (A_e, B_e)

  with β_e from the routers' statistics on task t:

      L_t = the k_I experts most often among the instance-level router's top k_I over the task's
            training tokens (counted on every training step, padding excluded; ties → lower index)
      T_t = the k_T experts of G^T(t)   (the task-level router's choice, trained W^T on μ_t)
      S_t = L_t ∪ T_t                   (the experts task t selected);  S_<t = ∪_{s<t} S_s
      β_e = ``clmoe_beta_shared`` if e ∈ S_t ∩ S_<t   (task-shared: old tasks rely on it too)
            ``clmoe_beta_new``    if e ∈ S_t \\ S_<t   (task-specific to t: take the new knowledge)
            ``clmoe_beta_old``    if e ∉ S_t          (specific to earlier tasks, or unused: keep)

  The routers keep their trained values (the official code merges the expert weights only). The
  first task has no previous model, so nothing is merged after it; its S_0 starts the history.

What is simplified, and why:

* Tiny Chameleon-style model, no LLaVA: the experts sit on the MLP projections
  (``method.target_modules``) of every decoder layer, rank ``method.r``, ``method.num_experts`` per
  layer, on every token, image tokens included — as ``moelora`` (no V-Adapter, no distillation).
  The paper puts its LoRA-MoE into LLaVA-1.5's language model and keeps the vision tower frozen.
* The task-level router's input is a data-derived key (the task's mean layer input) rather than a
  learned task embedding, because the engine does not tell the model the task at evaluation: the
  same key identifies the task per token (nearest key). The official scripts evaluate each task
  with that task's expert statistics; per-token identification is this repo's replacement.
* The role rule and its defaults are ours, in the paper's terms (task-shared vs task-specific
  experts judged from both routers): the EasyCL port compares only the previous and the current
  task's most-used experts and hard-codes 0.7 / 0.3, which the defaults 0.7 (``beta_old``) and
  0.3 (``beta_new``) mirror; 0.5 (``beta_shared``) weighs old and new equally.
* A and B of a LoRA expert are merged separately (as the official code merges its state dicts),
  so the merged ΔW_e is not the momentum combination of the two ΔW_e = B_e A_e.

Implementation: :func:`~trainables.mode.attach_mode` wraps the targets (routing hook, teacher mode,
save/load), then each wrapped linear is replaced by a :class:`CLMoELinear` — a
:class:`~trainables.mode.layer.MoDELinear` whose router gates are the dual-router gates above (the
fused expert product is MoDE's) and which adds ``mode_task_router`` to its saved adapter tensors.

Exact resume: the keys, the current task, the instance-router counts of the task in progress, the
snapshot θ^old and the history S_0 … S_{t−1} are the method's state (:meth:`CLMoE.state_dict`),
written with every checkpoint; the counts are integers, so a resumed run counts exactly the same.
Counting happens only inside :meth:`CLMoE.loss_terms` (the training forward), not when activation
checkpointing recomputes a layer during backward. The key pass reads the same samples on every
rank (no communication); the counts, summed per rank's shard, are all-reduced in ``after_task``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.batching import Batch, to_device
from trainables.losses import causal_lm_logits
from trainables.methods.base import MethodConfig, MoDEFamily, eval_mode
from trainables.methods.registry import register_method
from trainables.mode import MoDEConfig, mode_layers
from trainables.mode.layer import MoDELinear
from trainables.mode.routing import RoutingState
from trainables.run_context import RunContext
from trainables.vocab import TokenIds

KEY_SAMPLES_PURPOSE = 71  # run.generator(task, 0, KEY_SAMPLES_PURPOSE): which samples make the task's key


def top_k_gates(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over the ``k`` largest logits of the last dimension, zero elsewhere."""
    values, index = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, torch.softmax(values, dim=-1))


def nearest_task(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index of the key most cosine-similar to each vector of ``x`` ``[..., in]`` (keys ``[T, in]``)."""
    return (F.normalize(x, dim=-1) @ F.normalize(keys, dim=-1).T).argmax(dim=-1)


def most_used(counts: torch.Tensor, k: int) -> list[int]:
    """The (at most) ``k`` experts with the largest non-zero counts, ties to the lower index; sorted."""
    order = torch.sort(counts.cpu(), descending=True, stable=True).indices[:k]
    return sorted(int(e) for e in order if counts[e] > 0)


def expert_betas(selected: set[int], before: set[int], num_experts: int, config: MethodConfig) -> list[float]:
    """β_e of every expert: shared (selected now and before), new (now only), old (not now)."""
    return [
        (config.clmoe_beta_shared if e in before else config.clmoe_beta_new) if e in selected else config.clmoe_beta_old
        for e in range(num_experts)
    ]


def momentum_merge(layer: CLMoELinear, old_a: torch.Tensor, old_b: torch.Tensor, betas: list[float]) -> None:
    """In place: expert e's rows of A and columns of B ← β_e·old + (1 − β_e)·current."""
    r = layer.config.r
    with torch.no_grad():
        for expert, beta in enumerate(betas):
            rows = slice(expert * r, (expert + 1) * r)
            a, b = layer.mode_text_A[rows], layer.mode_text_B[:, rows]
            a.copy_(beta * old_a[rows].to(a) + (1.0 - beta) * a)
            b.copy_(beta * old_b[:, rows].to(b) + (1.0 - beta) * b)


@dataclass
class CLMoEContext:
    """Routing settings shared by every :class:`CLMoELinear` of one model.

    ``task``: the task being trained (G^T uses its key), or None (each token takes its nearest key).
    ``count_mask``: bool ``[B, S]`` while a training forward counts the instance-level choices.
    """

    top_k_instance: int
    top_k_task: int
    mix: float
    task: int | None = None
    count_mask: torch.Tensor | None = None


class CLMoELinear(MoDELinear):
    """A MoDE linear (fused LoRA experts, every token) whose gates come from CL-MoE's two routers.

    Adds the trainable ``mode_task_router`` ``[E, in]`` (W^T; ``mode_text_router`` is W^I) and two
    non-persistent buffers the method fills: ``task_keys`` ``[T, in]`` (μ_0 … μ_{T−1}) and
    ``instance_counts`` ``[E]`` (how often each expert was among a token's top k_I this task).
    """

    adapter_parameter_names = (*MoDELinear.adapter_parameter_names, "mode_task_router")

    def __init__(self, base_layer: nn.Linear, config: MoDEConfig, routing: RoutingState, context: CLMoEContext) -> None:
        super().__init__(base_layer, config, routing)
        self.context = context
        device = base_layer.weight.device
        experts, in_features = config.num_experts, base_layer.in_features
        self.mode_task_router = nn.Parameter(torch.empty(experts, in_features, device=device))
        self.register_buffer("task_keys", torch.zeros(0, in_features, device=device), persistent=False)
        self.register_buffer("instance_counts", torch.zeros(experts, dtype=torch.long, device=device), persistent=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.mode_task_router, a=math.sqrt(5))

    def reset_adapters(self) -> None:
        super().reset_adapters()
        if hasattr(self, "mode_task_router"):  # not yet during MoDELinear.__init__
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.mode_task_router, a=math.sqrt(5))

    def task_gates(self) -> torch.Tensor:
        """G^T of every task with a key: ``[T, E]`` (fp32)."""
        logits = F.linear(self.task_keys.float(), self.mode_task_router.float())
        return top_k_gates(logits, self.context.top_k_task)

    def global_experts(self, task: int) -> list[int]:
        """T_t: the k_T experts the task-level router chooses for task ``task`` (sorted; none without a key)."""
        if task >= self.task_keys.shape[0]:
            return []
        with torch.no_grad():
            logits = F.linear(self.task_keys[task].float(), self.mode_task_router.float())
            return sorted(logits.topk(min(self.context.top_k_task, logits.shape[-1])).indices.tolist())

    def router_gates(self, x: torch.Tensor) -> torch.Tensor:
        """g(x) = β·G^I(x) + (1 − β)·G^T(t), in fp32: ``[..., E]``."""
        context = self.context
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            instance_logits = F.linear(x, self.mode_text_router.float())
            instance = top_k_gates(instance_logits, context.top_k_instance)
            if context.count_mask is not None:
                self._count(instance_logits, context.count_mask)
            keys = self.task_keys
            if keys.shape[0] == 0:
                return instance
            task = self.task_gates()
            if context.task is None:
                global_gates = task[nearest_task(x, keys.float())]
            elif context.task < keys.shape[0]:
                global_gates = task[context.task]
            else:
                raise RuntimeError(f"cl_moe: training task {context.task} but only {keys.shape[0]} task keys exist")
            return context.mix * instance + (1.0 - context.mix) * global_gates

    def _count(self, instance_logits: torch.Tensor, mask: torch.Tensor) -> None:
        """Count the top-k choices of the tokens ``mask`` selects; the layer may see its input as
        ``[B, S, in]`` or as rows ``[B·S, in]``, the mask is ``[B, S]``."""
        rows = tuple(instance_logits.shape[:-1])
        if tuple(mask.shape) != rows and not (len(rows) == 1 and mask.numel() == rows[0]):
            raise RuntimeError(f"cl_moe: counting mask {tuple(mask.shape)} does not match the layer input {rows}")
        with torch.no_grad():
            chosen = instance_logits.topk(min(self.context.top_k_instance, instance_logits.shape[-1]), dim=-1).indices
            chosen = chosen.reshape(-1, chosen.shape[-1])[mask.reshape(-1)]
            self.instance_counts += torch.bincount(chosen.flatten(), minlength=self.config.num_experts)


@register_method
class CLMoE(MoDEFamily):
    """CL-MoE: LoRA experts on every token, gated by an instance-level and a task-level router, and
    momentum-merged per expert after every task (see the module docstring for the formulas)."""

    NAME = "cl_moe"
    IMAGE_ADAPTER = False
    EXPERTS_ON_IMAGE_TOKENS = True

    def __init__(self, config: MethodConfig, token_ids: TokenIds) -> None:
        super().__init__(config, token_ids)
        self.context = CLMoEContext(
            top_k_instance=min(config.clmoe_top_k_instance, config.num_experts),
            top_k_task=min(config.clmoe_top_k_task, config.num_experts),
            mix=config.clmoe_router_mix,
        )
        self.layers: list[tuple[str, CLMoELinear]] = []
        self._snapshot: dict[str, torch.Tensor] = {}  # "<layer>.mode_text_A|B" → θ^old of the current task
        self._selected: list[dict[str, list[int]]] = []  # per finished task: layer → S_t
        self._betas: list[dict[str, list[float]]] = []  # per finished task: layer → β_e (empty for task 0)

    # -- attach -------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> nn.Module:
        model = super().attach(model)  # moelora's MoDE layers: experts on every token, no V-Adapter
        for name, layer in mode_layers(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, CLMoELinear(layer.base_layer, layer.config, layer.routing, self.context))
        self.layers = [(name, layer) for name, layer in mode_layers(model) if isinstance(layer, CLMoELinear)]
        return model

    # -- task hooks ---------------------------------------------------------------------------------

    def before_task(self, model: nn.Module, task_index: int, run: RunContext) -> None:
        """Compute the task's key μ_t per layer, snapshot the experts (θ^old), reset the counts."""
        self.context.task = None
        keys = self.task_means(model, task_index, run)
        for name, layer in self.layers:
            if layer.task_keys.shape[0] < task_index:
                raise RuntimeError(f"cl_moe: task {task_index} starts but the keys of earlier tasks are missing")
            layer.task_keys = torch.cat([layer.task_keys[:task_index], keys[name].to(layer.task_keys)[None]])
            layer.instance_counts.zero_()
        self._selected, self._betas = self._selected[:task_index], self._betas[:task_index]
        self._snapshot = (
            {
                f"{name}.{param}": getattr(layer, param).detach().clone()
                for name, layer in self.layers
                for param in ("mode_text_A", "mode_text_B")
            }
            if task_index > 0
            else {}
        )
        self.context.task = task_index

    def task_means(self, model: nn.Module, task_index: int, run: RunContext) -> dict[str, torch.Tensor]:
        """Each layer's mean input (fp32 ``[in]``) over the non-padding tokens of ``clmoe_key_samples``
        seeded training samples of the task, with the model as it is (eval mode, no gradient)."""
        samples = run.bench.train_set(run.config.tasks[task_index])
        picks = torch.randperm(len(samples), generator=run.generator(task_index, 0, KEY_SAMPLES_PURPOSE))
        picks = picks[: self.config.clmoe_key_samples].tolist()
        sums = {name: torch.zeros(layer.base_layer.in_features, dtype=torch.float64) for name, layer in self.layers}
        tokens = 0
        mask_now: list[torch.Tensor] = []

        def add_input(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                x, mask = args[0], mask_now[0]
                sums[name] += (x.double() * mask[..., None]).sum(dim=(0, 1)).cpu()

            return hook

        handles = [layer.register_forward_pre_hook(add_input(name)) for name, layer in self.layers]
        size = run.config.train.batch_size
        try:
            with run.timer("clmoe_keys"), torch.no_grad(), eval_mode(model):
                for start in range(0, len(picks), size):
                    batch = to_device(samples.batch(picks[start : start + size]), run.device)
                    mask_now[:] = [batch.attention_mask.double()]
                    tokens += int(batch.attention_mask.sum())
                    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
                        causal_lm_logits(model, batch.input_ids, batch.attention_mask)
        finally:
            for handle in handles:
                handle.remove()
        return {name: (total / max(tokens, 1)).float() for name, total in sums.items()}

    def loss_terms(self, model: nn.Module, batch: Batch, **extra: Any) -> dict[str, torch.Tensor]:
        """The task loss; while a task is being trained, its forward also counts each layer's
        instance-level top-k choices on the non-padding tokens (the statistics behind β_e)."""
        if self.context.task is None:
            return super().loss_terms(model, batch, **extra)
        self.context.count_mask = batch.attention_mask.bool()
        try:
            return super().loss_terms(model, batch, **extra)
        finally:
            self.context.count_mask = None

    def after_task(self, model: nn.Module, task_index: int, run: RunContext | None) -> None:
        """Judge every expert task-shared / task-specific from both routers and momentum-merge it
        (from the second task on); record S_t. ``run`` may be None (a single process)."""
        if self.context.task != task_index:
            raise RuntimeError(f"cl_moe: after_task({task_index}) but the task in progress is {self.context.task}")
        selected: dict[str, list[int]] = {}
        betas: dict[str, list[float]] = {}
        for name, layer in self.layers:
            counts = layer.instance_counts.clone()
            if run is not None and run.dist.world > 1:
                torch.distributed.all_reduce(counts)
            local = set(most_used(counts, self.context.top_k_instance))
            now = local | set(layer.global_experts(task_index))
            before = {e for finished in self._selected for e in finished[name]}
            selected[name] = sorted(now)
            if not self._snapshot:
                betas[name] = []
                continue
            betas[name] = expert_betas(now, before, layer.config.num_experts, self.config)
            momentum_merge(
                layer, self._snapshot[f"{name}.mode_text_A"], self._snapshot[f"{name}.mode_text_B"], betas[name]
            )
        self._selected.append(selected)
        self._betas.append(betas)
        self._snapshot = {}
        self.context.task = None

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Keys, current task (−1: none), counts, snapshot θ^old and the history S_t / β_e."""
        return {
            "task": -1 if self.context.task is None else self.context.task,
            "task_keys": {name: layer.task_keys.detach().cpu().clone() for name, layer in self.layers},
            "instance_counts": {name: layer.instance_counts.cpu().clone() for name, layer in self.layers},
            "snapshot": {key: tensor.cpu().clone() for key, tensor in self._snapshot.items()},
            "selected": [dict(entry) for entry in self._selected],
            "betas": [dict(entry) for entry in self._betas],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a checkpoint without method state: nothing started yet
            state = {"task": -1, "task_keys": {}, "instance_counts": {}, "snapshot": {}, "selected": [], "betas": []}
        names = {name for name, _ in self.layers}
        for part in ("task_keys", "instance_counts"):
            if state[part] and set(state[part]) != names:
                differ = sorted(set(state[part]) ^ names)
                raise ValueError(f"cl_moe state {part!r} does not match the model's layers, e.g. {differ[:3]}")
        for name, layer in self.layers:
            keys = state["task_keys"].get(name)
            layer.task_keys = (
                keys.to(layer.task_keys) if keys is not None else torch.zeros_like(layer.task_keys[:0])
            ).clone()
            counts = state["instance_counts"].get(name)
            layer.instance_counts.copy_(counts if counts is not None else torch.zeros_like(layer.instance_counts))
        devices = {name: layer.mode_text_A.device for name, layer in self.layers}
        self._snapshot = {
            key: tensor.to(devices[key.rsplit(".", 1)[0]]).clone() for key, tensor in state["snapshot"].items()
        }
        # Keyed by this method's own layer-name strings, so the state pickles byte for byte as the
        # uninterrupted run's (pickle shares repeated string objects, and identity decides that).
        self._selected = [
            {name: [int(e) for e in entry[name]] for name, _ in self.layers} for entry in state["selected"]
        ]
        self._betas = [{name: [float(b) for b in entry[name]] for name, _ in self.layers} for entry in state["betas"]]
        self.context.task = None if state["task"] < 0 else int(state["task"])
