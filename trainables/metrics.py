"""Continual-learning metrics: pure functions of the accuracy matrix and generation scores.

``R`` is a ``(T+1) × T`` accuracy matrix: row 0 is the base model, row i the model after training
task i (1-based), column j the test accuracy on task j (0-based column j ↔ task j+1). Inputs are
never modified. Metrics that need an earlier task return None for a single-task sequence.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import linalg


def _matrix(acc_matrix: Sequence[Sequence[float]]) -> np.ndarray:
    matrix = np.array(acc_matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] + 1:
        raise ValueError(f"accuracy matrix must be (T+1) × T with row 0 = base model, got shape {matrix.shape}")
    return matrix


def average_accuracy(acc_matrix: Sequence[Sequence[float]]) -> float:
    """A_T = (1/T) Σ_j R[T, j]: mean accuracy over all tasks after the last one."""
    return float(_matrix(acc_matrix)[-1].mean())


def forgetting(acc_matrix: Sequence[Sequence[float]]) -> float | None:
    """Average max-based forgetting over the tasks before the last:

        F = 1/(T−1) Σ_{j<T} ( max_{i ∈ [j, T−1]} R[i, j] − R[T, j] )

    i.e. the best accuracy task j reached from the moment it was trained until before the last
    task, minus its final accuracy (rows after training, not the base row).
    """
    matrix = _matrix(acc_matrix)
    tasks = matrix.shape[1]
    if tasks < 2:
        return None
    drops = [matrix[j + 1 : tasks, j].max() - matrix[tasks, j] for j in range(tasks - 1)]
    return float(np.mean(drops))


def retention(acc_matrix: Sequence[Sequence[float]]) -> float | None:
    """Average retention over the tasks before the last, the final accuracy of each task as a
    share of its best (the same best as :func:`forgetting`'s):

        Ret = 1/(T−1) Σ_{j<T} R[T, j] / max_{i ∈ [j, T−1]} R[i, j]

    so F_j = best_j · (1 − Ret_j) per task. 1 = nothing lost; above 1 = the task improved later.
    A task whose best accuracy is 0 has no defined retention and is left out (None if all are).
    """
    matrix = _matrix(acc_matrix)
    tasks = matrix.shape[1]
    if tasks < 2:
        return None
    shares = []
    for j in range(tasks - 1):
        best = matrix[j + 1 : tasks, j].max()
        if best > 0:
            shares.append(matrix[tasks, j] / best)
    return float(np.mean(shares)) if shares else None


def backward_transfer(acc_matrix: Sequence[Sequence[float]]) -> float | None:
    """BWT = 1/(T−1) Σ_{j<T} ( R[T, j] − R[j, j] ) with R[j, j] the accuracy right after task j."""
    matrix = _matrix(acc_matrix)
    tasks = matrix.shape[1]
    if tasks < 2:
        return None
    return float(np.mean([matrix[tasks, j] - matrix[j + 1, j] for j in range(tasks - 1)]))


def forward_transfer(acc_matrix: Sequence[Sequence[float]]) -> float | None:
    """FWT vs base = 1/(T−1) Σ_{j≥2} ( R[j−1, j] − R[0, j] ): accuracy on a task just before
    training it, relative to the base model's (1-based j)."""
    matrix = _matrix(acc_matrix)
    tasks = matrix.shape[1]
    if tasks < 2:
        return None
    return float(np.mean([matrix[j, j] - matrix[0, j] for j in range(1, tasks)]))


def inter_modal_forgetting(generation_scores: Sequence[float]) -> float:
    """Drop of a generation quality score (higher = better) from the base model (stage 0) to the
    final stage: score[0] − score[-1]. Positive = generation got worse."""
    if len(generation_scores) < 2:
        raise ValueError("need the base score and at least one later stage")
    return float(generation_scores[0] - generation_scores[-1])


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (as FID):
    ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # Near-singular products (e.g. a collapsed generator) are expected; the real part is used.
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean))
