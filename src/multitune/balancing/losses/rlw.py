"""Random loss weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A
Litmus Test for Multi-Task Learning", TMLR 2022).

Each step draws λ ~ N(0, I) and weighs task i by softmax(λ)_i. The draw is a pure function of
(seed, step), so a resumed run draws the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multitune.balancing.losses.base import LOSS_WEIGHTINGS, task_index


@LOSS_WEIGHTINGS.register("rlw")
class RandomLossWeighting(nn.Module):
    """Random weights softmax(λ), λ ~ N(0, I), drawn afresh each step (Lin et al. 2022)."""

    paper = "Lin et al. 2022"
    cost = "O(T)"

    def __init__(self, task_names: Sequence[str], seed: int = 0) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.seed = seed
        self._last = torch.full((len(self.task_names),), 1.0 / len(self.task_names))

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draw = torch.randn(len(self.task_names), generator=generator)[task_index(self.task_names, tasks)]
        weights = torch.softmax(draw, dim=0)  # [T], sums to 1 like equal's 1/T
        self._last = torch.zeros(len(self.task_names)).index_put_(
            (torch.tensor(task_index(self.task_names, tasks)),), weights
        )
        return weights.to(losses.device, losses.dtype) * losses

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, (self._last * len(self.task_names)).tolist(), strict=True))
