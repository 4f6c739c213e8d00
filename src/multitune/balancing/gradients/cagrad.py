"""CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021).

Maximise the worst task's improvement within a ball around the average gradient g0:
w = argmin_{w∈Δ} g_wᵀg0 + √φ‖g_w‖ with φ = c²‖g0‖², then d = (g0 + √φ/‖g_w‖·g_w) / (1 + c²).
All of it is expressed through the Gramian.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from multitune.balancing.gradients.base import (
    GRADIENT_AGGREGATORS,
    SOURCES,
    project_simplex,
    to_numpy,
    to_tensor,
    via_gramian,
)


@GRADIENT_AGGREGATORS.register("cagrad")
class CAGrad:
    """Average gradient corrected toward the worst-off task, within radius c·‖g0‖ (Liu et al. 2021)."""

    sources: tuple[str, ...] = SOURCES
    paper = "Liu et al. 2021 (CAGrad)"
    cost = "Gramian [T, T] + a T x T solve"

    def __init__(self, c: float = 0.4, iterations: int = 300) -> None:
        if c < 0:
            raise ValueError("c must be >= 0")
        self.c, self.iterations = c, iterations

    def weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        g = to_numpy(gramian)
        t = g.shape[0]
        scale = np.trace(g) / t
        if scale <= 0:
            return to_tensor(np.full(t, 1.0))
        g = g / scale  # the weights are scale-free; solve on a well-conditioned copy
        b = g @ np.full(t, 1.0 / t)  # [T]: g_iᵀ g0
        sqrt_phi = self.c * np.sqrt(max(np.full(t, 1.0 / t) @ b, 0.0))
        w = np.full(t, 1.0 / t)
        step = 1.0 / max(np.linalg.eigvalsh(g)[-1], 1e-12)
        for k in range(self.iterations):
            norm = np.sqrt(max(w @ g @ w, 1e-18))
            gradient = b + sqrt_phi * (g @ w) / norm
            w = project_simplex(w - step / np.sqrt(k + 1) * gradient)
        norm = np.sqrt(max(w @ g @ w, 1e-18))
        alpha = (np.full(t, 1.0 / t) + sqrt_phi / norm * w) / (1 + self.c**2)
        return to_tensor(alpha * t)  # × T: the sum convention of the other aggregators

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor:
        return via_gramian(self, grads, tasks)
