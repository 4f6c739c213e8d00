"""MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).

The update is the minimum-norm point of the convex hull of the task gradients, α = argmin_{α∈Δ} αᵀGα.
It has a non-negative inner product with every task gradient (a common descent direction, or zero at a
Pareto-stationary point). With gradients w.r.t. the shared representation this is MGDA-UB.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from multitune.balancing.gradients.base import (
    GRADIENT_AGGREGATORS,
    SOURCES,
    min_norm_on_simplex,
    to_numpy,
    to_tensor,
    via_gramian,
)


@GRADIENT_AGGREGATORS.register("mgda")
class MGDA:
    """Min-norm point of the task gradients' convex hull: a common descent direction (Sener & Koltun 2018)."""

    sources: tuple[str, ...] = SOURCES
    paper = "Sener & Koltun 2018"
    cost = "Gramian [T, T] + a T x T solve"

    def weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        return to_tensor(min_norm_on_simplex(to_numpy(gramian)))

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor:
        return via_gramian(self, grads, tasks)
