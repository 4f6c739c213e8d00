"""Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022).

The Nash bargaining solution: weights α > 0 with Gα = 1/α, so that every task's directional derivative
is αᵢ·gᵢᵀd = 1. The reference code approximates it with a sequence of convex programs (cvxpy) every step.
Here: α minimises the strictly convex ½αᵀGα − Σ log αᵢ, whose stationarity condition is exactly
Gα = 1/α; a damped Newton method on the T x T problem converges in a handful of iterations, warm-started
from the previous step's α. Where the gradients are linearly dependent with a positive combination summing to
zero (e.g. two opposite gradients) no bargaining solution exists and the objective is unbounded below; a ridge
of 1e-6 of the mean squared norm on G keeps α finite, and the update tends to that zero combination.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from multitune.balancing.gradients.base import GRADIENT_AGGREGATORS, SOURCES, to_numpy, to_tensor, via_gramian

RIDGE = 1e-6  # relative to the mean squared gradient norm: bounds α where G is singular


@GRADIENT_AGGREGATORS.register("nash_mtl")
class NashMTL:
    """Bargaining solution Gα = 1/α: each task's gradient gets the same weighted progress (Navon et al. 2022)."""

    sources: tuple[str, ...] = SOURCES
    paper = "Navon et al. 2022"
    cost = "Gramian [T, T] + a T x T solve"

    def __init__(self, iterations: int = 50, tolerance: float = 1e-10) -> None:
        self.iterations, self.tolerance = iterations, tolerance
        self.previous: np.ndarray | None = None  # warm start (scale-free α of the last step)

    def weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        g = to_numpy(gramian)
        t = g.shape[0]
        scale = np.trace(g) / t
        if scale <= 0:
            return to_tensor(np.ones(t))
        g = g / scale + RIDGE * np.eye(t)  # solve for G/s; then α = α̃ / √s
        alpha = self.previous if self.previous is not None and len(self.previous) == t else np.ones(t)

        def objective(a: np.ndarray) -> float:
            return 0.5 * a @ g @ a - np.log(a).sum()

        for _ in range(self.iterations):
            gradient = g @ alpha - 1.0 / alpha
            hessian = g + np.diag(1.0 / alpha**2)
            direction = -np.linalg.solve(hessian, gradient)
            step, current = 1.0, objective(alpha)
            while np.any(alpha + step * direction <= 0) or objective(
                alpha + step * direction
            ) > current + 1e-4 * step * (gradient @ direction):
                step *= 0.5
                if step < 1e-12:
                    break
            alpha = alpha + step * direction
            if -(gradient @ direction) < self.tolerance:
                break
        self.previous = alpha
        return to_tensor(alpha / np.sqrt(scale))

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor:
        return via_gramian(self, grads, tasks)

    def state_dict(self) -> dict[str, object]:
        return {"previous": None if self.previous is None else torch.from_numpy(self.previous.copy())}

    def load_state_dict(self, state: dict[str, object]) -> None:
        previous = state.get("previous")
        self.previous = previous.numpy().copy() if isinstance(previous, torch.Tensor) else None
