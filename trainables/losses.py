"""Losses: answer-only CE, image-token CE, and forward-KL distillation with the temperature applied once.

HF ``ChameleonForConditionalGeneration.forward`` overwrites every image-token logit with the
dtype minimum, which makes image tokens unscorable; :func:`causal_lm_logits` therefore computes
``lm_head(decoder(...))`` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.vocab import TokenIds

IGNORE_INDEX = -100


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (adapters stay active: peft injects in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Unmasked next-token logits ``[B, S, V]`` (fp32) of a Chameleon-style model."""
    lm = unwrap(model)
    hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return lm.lm_head(hidden).float()


def answer_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, separator: int) -> torch.Tensor:
    """Labels that score only the answer: every token up to and including the first separator,
    and padding, become ``IGNORE_INDEX``. Rows without a separator are entirely ignored."""
    is_separator = input_ids == separator
    separators_before = is_separator.long().cumsum(dim=1) - is_separator.long()
    is_answer = separators_before > 0
    if attention_mask is not None:
        is_answer = is_answer & attention_mask.bool()
    return torch.where(is_answer, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def restrict_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Set logits outside ``allowed`` (bool ``[V]`` or ``[B, V]``) to the dtype minimum."""
    allowed = allowed.view(1, 1, -1) if allowed.dim() == 1 else allowed.unsqueeze(1)
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)


def label_space(token_ids: TokenIds, is_generation: torch.Tensor) -> torch.Tensor:
    """Per-sample allowed output ids ``[B, V]``: text vocabulary for understanding samples
    (image codebook masked, as in the paper's CE), image vocabulary for generation samples."""
    device = is_generation.device
    image_vocab = token_ids.image_vocab_mask(device)
    text_vocab = ~token_ids.codebook_mask(device)
    return torch.where(is_generation.view(-1, 1), image_vocab.view(1, -1), text_vocab.view(1, -1))


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over labelled positions (labels are aligned with inputs, shifted here)."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1)
    if not (shifted_labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # keeps the graph; no labelled token in this batch
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX)


def task_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_generation: torch.Tensor,
    token_ids: TokenIds,
) -> torch.Tensor:
    """CE on the answer part of each sample: text answers for understanding samples, the image
    span (begin-image .. end-image) for generation samples, each over its own label space."""
    labels = answer_labels(input_ids, attention_mask, token_ids.separator)
    logits = restrict_logits(causal_lm_logits(model, input_ids, attention_mask), label_space(token_ids, is_generation))
    return shifted_cross_entropy(logits, labels)


def kd_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float = 2.0,
    top_k: int | None = None,
    mask: torch.Tensor | None = None,
    teacher_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per position, temperature β applied once, scaled by β²:

        KD = β² · mean_t Σ_v p_T(v) (log p_T(v) − log p_S(v)),   p = softmax(z / β)

    With ``top_k`` both distributions are renormalised on the teacher's top-K ids at each
    position. ``teacher_index`` (``[B, S, K]``) says the teacher logits are already such a
    selection (e.g. read from the teacher cache) and which student logits it corresponds to.
    ``mask`` (bool ``[B, S]``) selects the positions averaged over. Computed in fp32.
    (The official code divides by β twice; we follow the paper's equation.)
    """
    if temperature <= 0:
        raise ValueError(f"kd temperature must be positive, got {temperature}")
    teacher = teacher_logits.float()
    student = student_logits.float()
    if teacher_index is not None:
        student = student.gather(-1, teacher_index.long())
    elif top_k is not None and top_k < teacher.shape[-1]:
        teacher, index = teacher.topk(top_k, dim=-1)
        student = student.gather(-1, index)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    per_position = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # [B, S]
    if mask is not None:
        mask = mask.to(per_position.dtype)
        per_position_mean = (per_position * mask).sum() / mask.sum().clamp_min(1.0)
    else:
        per_position_mean = per_position.mean()
    return temperature**2 * per_position_mean
