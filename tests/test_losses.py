"""Loss functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from trainables.losses import IGNORE_INDEX, answer_labels, kd_loss, label_space

SEP, PAD = 9, 0


def test_kd_applies_the_temperature_once_and_scales_by_its_square():
    # β = 2: teacher z/β = [0, ln 3] → p_T = [1/4, 3/4]; student z = [0, 0] → p_S = [1/2, 1/2].
    teacher = torch.tensor([[[0.0, 2 * math.log(3.0)]]])
    student = torch.zeros(1, 1, 2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kd_loss(teacher, student, temperature=2.0).item() == pytest.approx(4 * kl, abs=1e-6)
    assert kd_loss(teacher, student, temperature=2.0).item() == pytest.approx(0.523248, abs=1e-5)


def test_kd_top_k_renormalises_on_the_teachers_top_ids_and_masks_positions():
    # Teacher top-2 of [ln 3, 0, -5] are ids 0 and 1 → p_T = [3/4, 1/4] at β = 1; student [0, ln 3, 9]
    # restricted to ids 0, 1 → p_S = [1/4, 3/4]. The second position is masked out.
    teacher = torch.tensor([[[math.log(3.0), 0.0, -5.0], [1.0, 2.0, 3.0]]])
    student = torch.tensor([[[0.0, math.log(3.0), 9.0], [9.0, -9.0, 0.0]]])
    kl = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)
    mask = torch.tensor([[True, False]])
    assert kd_loss(teacher, student, temperature=1.0, top_k=2, mask=mask).item() == pytest.approx(kl, abs=1e-6)


def test_kd_is_zero_for_identical_logits_and_rejects_bad_temperature():
    logits = torch.randn(2, 3, 5)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(logits, logits, temperature=0.0)


def test_answer_labels_mask_the_prompt_through_the_first_separator_and_padding():
    ids = torch.tensor([[5, 6, SEP, 7, SEP, 8, PAD], [5, SEP, 7, 8, 2, PAD, PAD], [5, 6, 7, 8, 9 + 1, 3, 3]])
    attention = (ids != PAD).long()
    x = IGNORE_INDEX
    assert answer_labels(ids, attention, SEP).tolist() == [
        [x, x, x, 7, SEP, 8, x],
        [x, x, 7, 8, 2, x, x],
        [x, x, x, x, x, x, x],
    ]


def test_label_space_masks_the_codebook_for_understanding_and_text_for_generation(ids):
    space = label_space(ids, torch.tensor([False, True]))
    codes = list(ids.image_codes)
    assert not space[0, codes].any() and space[0, ids.separator] and space[0, ids.eos]
    assert space[1, codes].all() and space[1, ids.begin_image] and space[1, ids.end_image]
    assert space[1].sum() == len(codes) + 2
