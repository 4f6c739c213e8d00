"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for
Multi-Task Learning", CVPR 2023).

Make the task-gradient system well conditioned: with G = VΛVᵀ, the aligned gradients are
σ_min·VΛ^(-1/2)Vᵀ·M (σ_min the smallest non-zero singular value), which are orthogonal and of equal
norm; the update is their sum, so α = σ_min·VΛ^(-1/2)Vᵀ·1. Directions with a zero eigenvalue are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from multitune.balancing.gradients.base import GRADIENT_AGGREGATORS, SOURCES, to_numpy, to_tensor, via_gramian


@GRADIENT_AGGREGATORS.register("aligned_mtl")
class AlignedMTL:
    """Align task gradients into an orthogonal system of equal norms, then sum (Senushkin et al. 2023)."""

    sources: tuple[str, ...] = SOURCES
    paper = "Senushkin et al. 2023"
    cost = "Gramian [T, T] + a T x T solve"

    def weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        g = to_numpy(gramian)
        values, vectors = np.linalg.eigh(g)
        keep = values > max(values[-1], 0.0) * 1e-8
        if not keep.any():
            return to_tensor(np.ones(g.shape[0]))
        values, vectors = values[keep], vectors[:, keep]
        balance = np.sqrt(values.min()) * (vectors / np.sqrt(values)) @ vectors.T  # σ_min·VΛ^(-1/2)Vᵀ
        return to_tensor(balance @ np.ones(g.shape[0]))

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor:
        return via_gramian(self, grads, tasks)
