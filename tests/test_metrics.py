"""Metrics against hand-computed matrices."""

from __future__ import annotations

import numpy as np
import pytest

from trainables.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    frechet_distance,
    inter_modal_forgetting,
    retention,
)

# rows: base, after task 1, after task 2, after task 3; columns: tasks 1..3
R = [
    [0.1, 0.2, 0.0],
    [0.8, 0.3, 0.1],
    [0.6, 0.9, 0.2],
    [0.5, 0.4, 0.7],
]


def test_hand_computed_three_task_sequence():
    assert average_accuracy(R) == pytest.approx((0.5 + 0.4 + 0.7) / 3)
    # task 1: max(0.8, 0.6) − 0.5 = 0.3; task 2: max(0.9) − 0.4 = 0.5
    assert forgetting(R) == pytest.approx((0.3 + 0.5) / 2)
    # (0.5 − 0.8) and (0.4 − 0.9)
    assert backward_transfer(R) == pytest.approx((-0.3 - 0.5) / 2)
    # task 2 before training: 0.3 vs base 0.2; task 3: 0.2 vs base 0.0
    assert forward_transfer(R) == pytest.approx((0.1 + 0.2) / 2)
    # task 1: 0.5 / max(0.8, 0.6); task 2: 0.4 / 0.9
    assert retention(R) == pytest.approx((0.5 / 0.8 + 0.4 / 0.9) / 2)


def test_retention_skips_a_task_never_learned_and_can_exceed_one():
    never = [[0.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.8, 0.3], [0.0, 0.6, 0.9]]
    assert retention(never) == pytest.approx(0.6 / 0.8)  # task 1's best is 0: left out
    assert retention([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]) is None
    improved = [[0.5, 0.5], [0.6, 0.5], [0.9, 0.8]]
    assert retention(improved) == pytest.approx(1.5)
    assert retention([[0.5], [0.9]]) is None  # one task: nothing to retain


def test_task_never_learned_and_ties():
    never = [[0.0, 0.0], [0.0, 0.5], [0.0, 0.5]]  # task 1 stays at 0: no forgetting, no transfer
    assert forgetting(never) == 0.0 and backward_transfer(never) == 0.0
    assert forward_transfer(never) == pytest.approx(0.5)
    ties = [[0.2, 0.2, 0.2], [0.6, 0.2, 0.2], [0.6, 0.6, 0.2], [0.6, 0.6, 0.6]]
    assert forgetting(ties) == 0.0 and average_accuracy(ties) == pytest.approx(0.6)


def test_max_based_forgetting_differs_from_first_minus_last():
    rising_then_falling = [[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [0.9, 0.5, 0.0], [0.3, 0.5, 0.8]]
    assert forgetting(rising_then_falling) == pytest.approx((0.6 + 0.0) / 2)  # max 0.9, not 0.4
    assert backward_transfer(rising_then_falling) == pytest.approx((-0.1 + 0.0) / 2)


def test_single_task_sequence():
    single = [[0.1], [0.7]]
    assert average_accuracy(single) == pytest.approx(0.7)
    assert forgetting(single) is None and backward_transfer(single) is None and forward_transfer(single) is None


def test_inputs_are_not_mutated_and_shapes_are_checked():
    copy = [row[:] for row in R]
    forgetting(R)
    assert copy == R
    with pytest.raises(ValueError, match=r"\(T\+1\) × T"):
        average_accuracy([[0.1, 0.2], [0.3, 0.4]])


def test_inter_modal_forgetting_and_frechet_distance():
    assert inter_modal_forgetting([0.9, 0.7, 0.4]) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 2))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # identity covariances, means 0 and (3, 4): distance = 25 (+ sampling noise)
    b = rng.normal(size=(4000, 2)) + np.array([3.0, 4.0])
    assert frechet_distance(a, b) == pytest.approx(25.0, rel=0.02)
