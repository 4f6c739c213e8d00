"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; as in TorchJD).

Project every task gradient onto the dual cone of all of them, {x : gⱼᵀx >= 0 for all j}, and sum the
projections. The result never conflicts with any task. Projecting Mᵀeᵢ is the dual problem
λᵢ = argmin_{λ>=0} ½(eᵢ+λ)ᵀG(eᵢ+λ), so the update is (Σᵢ eᵢ+λᵢ)ᵀM: the Gramian is all it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from multitune.balancing.gradients.base import (
    GRADIENT_AGGREGATORS,
    SOURCES,
    nonnegative_quadratic,
    to_numpy,
    to_tensor,
    via_gramian,
)


@GRADIENT_AGGREGATORS.register("upgrad")
class UPGrad:
    """Sum of each task gradient's projection onto the dual cone of all task gradients (Quinton & Rey 2024)."""

    sources: tuple[str, ...] = SOURCES
    paper = "Quinton & Rey 2024"
    cost = "Gramian [T, T] + a T x T solve"

    def weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        g = to_numpy(gramian)
        identity = np.eye(g.shape[0])
        lam = nonnegative_quadratic(g, identity)  # column i: λ_i
        return to_tensor((identity + lam).sum(1))

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor:
        return via_gramian(self, grads, tasks)
