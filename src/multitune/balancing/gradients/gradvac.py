"""Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR 2021).

Like PCGrad, but instead of removing conflicts it raises the cosine of each pair of task gradients to a
target φ̂_ij, an exponential moving average (rate β) of the cosines observed for that pair; pairs are
identified by task name, so the targets survive steps with different task subsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from multitune.balancing.gradients.base import GRADIENT_AGGREGATORS, SOURCES, to_numpy, to_tensor, via_gramian


@GRADIENT_AGGREGATORS.register("gradvac")
class GradVac:
    """Raise each pair's gradient cosine to its moving-average target (Wang et al. 2021)."""

    sources: tuple[str, ...] = SOURCES
    paper = "Wang et al. 2021"
    cost = "Gramian [T, T] + a T x T solve"
    randomized = True

    def __init__(self, task_names: Sequence[str] = (), seed: int = 0, beta: float = 0.01) -> None:
        if not 0 < beta <= 1:
            raise ValueError("beta must be in (0, 1]")
        self.task_names = list(task_names)
        self.beta = beta
        self.targets = np.zeros((len(self.task_names), len(self.task_names)))  # φ̂, by task name
        self.rng = np.random.default_rng(seed)

    def weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        g = to_numpy(gramian)
        t = g.shape[0]
        names = list(tasks) if len(tasks) == t else [str(i) for i in range(t)]
        index = [self.task_names.index(n) if n in self.task_names else None for n in names]
        norms = np.sqrt(np.maximum(np.diag(g), 1e-30))
        coefficients = np.eye(t)
        for i in range(t):
            for j in self.rng.permutation([k for k in range(t) if k != i]):
                norm_i = np.sqrt(max(coefficients[i] @ g @ coefficients[i], 1e-30))
                cosine = np.clip((coefficients[i] @ g[:, j]) / (norm_i * norms[j]), -1.0, 1.0)  # rounding
                a, b = index[i], index[j]
                target = self.targets[a, b] if a is not None and b is not None else 0.0
                if cosine < target:
                    coefficients[i, j] += (
                        norm_i
                        * (target * np.sqrt(1 - cosine**2) - cosine * np.sqrt(1 - target**2))
                        / (norms[j] * np.sqrt(max(1 - target**2, 1e-12)))
                    )
                if a is not None and b is not None:
                    self.targets[a, b] = (1 - self.beta) * target + self.beta * cosine
        return to_tensor(coefficients.sum(0))

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor:
        return via_gramian(self, grads, tasks)

    def state_dict(self) -> dict[str, object]:
        return {"targets": torch.from_numpy(self.targets.copy()), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, object]) -> None:
        targets = state["targets"]
        assert isinstance(targets, torch.Tensor)
        self.targets = targets.numpy().copy()
        self.rng.bit_generator.state = state["rng"]  # type: ignore[assignment]
