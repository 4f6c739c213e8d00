"""Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses
for Scene Geometry and Semantics", CVPR 2018).

Each task learns s_i = log σ_i²; its term is ½·exp(−s_i)·L_i + ½·s_i, so a noisy task (large σ) is
down-weighted and the log term stops σ from growing without bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multitune.balancing.losses.base import LOSS_WEIGHTINGS, task_index


@LOSS_WEIGHTINGS.register("uncertainty")
class UncertaintyWeighting(nn.Module):
    """Learned homoscedastic uncertainty per task: ½·exp(−s_i)·L_i + ½·s_i (Kendall et al. 2018)."""

    paper = "Kendall et al. 2018"
    cost = "O(T)"

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.log_variance = nn.Parameter(torch.zeros(len(self.task_names)))  # s_i, learned with the model

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        s = self.log_variance[task_index(self.task_names, tasks)]  # [T]
        return (0.5 * torch.exp(-s) * losses + 0.5 * s) / len(tasks)

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, (0.5 * torch.exp(-self.log_variance.detach())).tolist(), strict=True))
