"""PCGrad (Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

Each task gradient, in turn, loses its component along every other task's gradient it conflicts with
(negative inner product), the others visited in random order; the update is the sum of the results.
Every projected gradient stays a combination of the originals, so the whole method runs on the Gramian:
C [T, T] holds each projected gradient's coefficients and α = Σ_i C_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from multitune.balancing.gradients.base import GRADIENT_AGGREGATORS, SOURCES, to_numpy, to_tensor, via_gramian


@GRADIENT_AGGREGATORS.register("pcgrad")
class PCGrad:
    """Project away each gradient's conflicting components, in random order, then sum (Yu et al. 2020)."""

    sources: tuple[str, ...] = SOURCES
    paper = "Yu et al. 2020"
    cost = "Gramian [T, T] + a T x T solve"
    randomized = True

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        g = to_numpy(gramian)
        t = g.shape[0]
        coefficients = np.eye(t)
        for i in range(t):
            for j in self.rng.permutation([k for k in range(t) if k != i]):
                dot = coefficients[i] @ g[:, j]  # <g_i', g_j>
                if dot < 0 and g[j, j] > 0:
                    coefficients[i, j] -= dot / g[j, j]
        return to_tensor(coefficients.sum(0))

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor:
        return via_gramian(self, grads, tasks)

    def state_dict(self) -> dict[str, object]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.rng.bit_generator.state = state["rng"]  # type: ignore[assignment]
