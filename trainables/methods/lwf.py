"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017) on the text side.

LwF keeps the network's answers to the *old* tasks from drifting while it learns a new one, using
only the new task's inputs: before training task t it records the model's outputs on the new data
(the "old model"), then trains on the new task's loss plus a distillation loss that keeps the
outputs close to those recordings.

What :class:`LwF` does:

* **Adapter.** One peft LoRA carried across tasks, exactly as :class:`SeqLoRA` (same target
  modules, same parameter-matched rank rule) — LwF is ``seq_lora`` plus the distillation term.
* **Old model.** When task t starts (:meth:`LwF.before_task`) the LoRA tensors are copied
  (detached clones): the old model is the frozen base plus those weights. Its logits are computed
  live every step, on the step's own batch, under ``torch.no_grad`` and in eval mode, by calling
  the model with the snapshot in place of the LoRA parameters (``torch.func.functional_call``):
  the student's parameters, their autograd graph and the optimizer are never touched.
* **Positions.** The positions the task loss trains on the text side: in every understanding
  sample, the positions whose next token is an answer token (everything after the prompt/answer
  separator, up to and including end-of-sequence; padding excluded), i.e. the positions
  :func:`~trainables.losses.task_loss` scores with its shifted cross-entropy. Prompt positions are
  not distilled (their outputs are never read), and neither are generation samples (their answer
  is an image: image generation is what MoDE's V-Adapter distillation protects, and LwF here is
  the text-side baseline).
* **Vocabulary.** The text vocabulary: every id but the image codebook — the label space the task
  loss and the evaluation use for understanding answers (:func:`~trainables.losses.label_space`).
  The codebook logits are masked there and never scored for a text answer, so matching them would
  spend capacity on outputs no old task reads; the remaining ids are selected (not masked), so
  both distributions are renormalised over the text vocabulary alone.
* **Loss.** ``lwf_weight · T² · mean_positions KL(p_old ‖ p_new)``, ``p = softmax(z / T)`` with
  ``T = lwf_temperature`` applied once to both logits (:func:`~trainables.losses.kd_loss`). The
  paper writes it as the cross-entropy −Σ p_old log p_new; the two differ by the old model's
  entropy, a constant for the new parameters, so the gradients are the same — and the KL is 0 when
  the models agree, which makes the term readable in the logs (and testable). The T² factor
  (Hinton et al.) keeps the gradient scale independent of T; the paper has no such factor
  (its λ_o = 1, T = 2), so ``lwf_weight`` here equals the paper's λ_o / T².
* **First task.** No distillation: there is no previous task whose answers could be forgotten,
  and the old model would be the base model (the LoRA starts at zero), whose answers to the new
  questions are the very thing the first task must change. So ``loss_terms`` returns the task
  loss alone on the first task (as it does when ``lwf_weight`` is 0).

Exactness: at the first step of a task the old and new weights are equal, so the term is exactly 0
when dropout is 0 (the teacher runs in eval mode, the student in train mode: with LoRA dropout > 0
they differ by the dropout noise from the first step). A run resumed inside a task distils from
the same old model: the snapshot is the method's state (:meth:`LwF.state_dict`), written with every
checkpoint — :meth:`LwF.before_task` does not run again when a run resumes inside a task.

Simplified vs the paper: no task-specific output heads (one shared vocabulary head serves every
task, so the "old-task outputs" are that head's text-vocabulary distribution at the answer
positions), and no warm-up phase that trains new heads alone first (there is no new head). The
old model's outputs are recomputed each step on the step's batch rather than recorded once for the
whole training set — the same targets (the old model is frozen), without a per-sample store.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainables.batching import Batch
from trainables.losses import (
    IGNORE_INDEX,
    answer_labels,
    causal_lm_logits,
    kd_loss,
    label_space,
    restrict_logits,
    shifted_cross_entropy,
)
from trainables.methods.base import MethodConfig, eval_mode
from trainables.methods.registry import register_method
from trainables.methods.seq_lora import SeqLoRA
from trainables.run_context import RunContext
from trainables.vocab import TokenIds


def distilled_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, is_generation: torch.Tensor, separator: int
) -> torch.Tensor:
    """Bool ``[B, S - 1]``: position t is distilled when the token at t + 1 is an answer token of an
    understanding sample — the positions the task loss's shifted cross-entropy trains on the text side."""
    labels = answer_labels(input_ids, attention_mask, separator)
    return (labels[:, 1:] != IGNORE_INDEX) & ~is_generation.view(-1, 1)


def lwf_distillation(
    old_logits: torch.Tensor,
    new_logits: torch.Tensor,
    batch: Batch,
    token_ids: TokenIds,
    temperature: float,
) -> torch.Tensor:
    """T² · mean over :func:`distilled_positions` of KL(p_old ‖ p_new), ``p = softmax(z / T)`` over the
    text vocabulary (every id but the image codebook). ``old_logits``/``new_logits``: ``[B, S, V]``."""
    text_vocab = (~token_ids.codebook_mask(new_logits.device)).nonzero().squeeze(-1)
    mask = distilled_positions(batch.input_ids, batch.attention_mask, batch.is_generation, token_ids.separator)
    return kd_loss(
        old_logits[:, :-1, text_vocab],
        new_logits[:, :-1, text_vocab],
        temperature=temperature,
        mask=mask,
    )


class _Logits(nn.Module):
    """``causal_lm_logits`` as a module's forward, so ``functional_call`` can swap its parameters
    (the model's own forward would mask the image-token logits; see :mod:`trainables.losses`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return causal_lm_logits(self.inner, input_ids, attention_mask)


@register_method
class LwF(SeqLoRA):
    """Learning without Forgetting on one shared LoRA: the task loss plus ``lwf_weight`` × T²·KL from
    the model as it was when the task started, on the task's own understanding answers (see the
    module docstring for positions, vocabulary and the first task)."""

    NAME = "lwf"

    def __init__(self, config: MethodConfig, token_ids: TokenIds) -> None:
        super().__init__(config, token_ids)
        # LoRA parameter name → its value when the current task started; None on the first task.
        self._snapshot: dict[str, torch.Tensor] | None = None

    def before_task(self, model: nn.Module, task_index: int, run: RunContext) -> None:
        """Snapshot the LoRA weights: the old model of task ``task_index`` (none for the first task)."""
        if task_index == 0:
            self._snapshot = None
            return
        self._snapshot = {name: p.detach().clone() for name, p in self._state(model).items()}

    def old_logits(self, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The old model's logits ``[B, S, V]``: the model run with the snapshot in place of the LoRA
        weights, without gradient and in eval mode; the model itself is left as it was."""
        if self._snapshot is None:
            raise RuntimeError("lwf has no old model before the second task")
        current = self._state(model)
        if self._snapshot.keys() != current.keys():
            # A checkpoint of another adapter shape: fail loudly rather than distil from a partial model.
            differ = sorted(current.keys() ^ self._snapshot.keys())
            raise ValueError(f"lwf snapshot does not match the model's LoRA parameters, e.g. {differ[:3]}")
        swapped = {f"inner.{name}": self._snapshot[name].to(p.device, p.dtype) for name, p in current.items()}
        with torch.no_grad(), eval_mode(model):
            return torch.func.functional_call(_Logits(model), swapped, (input_ids, mask))

    def loss_terms(self, model: nn.Module, batch: Batch, **extra: Any) -> dict[str, torch.Tensor]:
        """``task``: the answer CE (as :func:`~trainables.losses.task_loss`); ``lwf``: ``lwf_weight`` ×
        the distillation from the old model, from the second task on. One student forward serves both."""
        weight = self.config.lwf_weight
        distil = self._snapshot is not None and weight > 0
        # The teacher runs first, so nothing of the student's graph exists while it runs.
        old = self.old_logits(model, batch.input_ids, batch.attention_mask) if distil else None
        logits = causal_lm_logits(model, batch.input_ids, batch.attention_mask)
        labels = answer_labels(batch.input_ids, batch.attention_mask, self.token_ids.separator)
        space = label_space(self.token_ids, batch.is_generation)
        terms = {"task": shifted_cross_entropy(restrict_logits(logits, space), labels)}
        if old is not None:
            kd = lwf_distillation(old, logits, batch, self.token_ids, self.config.lwf_temperature)
            terms["lwf"] = weight * kd
        return terms

    def state_dict(self) -> dict[str, Any]:
        """The snapshot (LoRA name → tensor), so a run resumed inside a task distils from the same old model."""
        return dict(self._snapshot) if self._snapshot is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise ValueError("lwf state must map LoRA parameter names to tensors")
        # An empty state is a checkpoint of the first task: no old model yet.
        self._snapshot = {name: tensor.detach().clone() for name, tensor in state.items()} or None
