"""No aggregation: the sum of the task gradients, as a plain backward would give."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from multitune.balancing.gradients.base import GRADIENT_AGGREGATORS, SOURCES


@GRADIENT_AGGREGATORS.register("sum")
class SumAggregator:
    """Σ_i g_i: the plain update, to measure what a gradient source alone costs."""

    sources: tuple[str, ...] = SOURCES
    paper = "baseline"
    cost = "the gradient source only"

    def weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        return torch.ones(gramian.shape[0])

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor:
        return grads.sum(0)
