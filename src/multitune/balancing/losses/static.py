"""Static weighting: fixed per-task weights from the config."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multitune.balancing.losses.base import LOSS_WEIGHTINGS, task_index


@LOSS_WEIGHTINGS.register("static")
class StaticWeighting(nn.Module):
    """Fixed weights from each task's `loss_weight`: w_i · L_i / T."""

    paper = "baseline"
    cost = "O(T)"
    task_weights: Tensor  # [T], a buffer

    def __init__(self, task_names: Sequence[str], loss_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        given = loss_weights or {}
        self.task_names = list(task_names)
        self.register_buffer("task_weights", torch.tensor([float(given.get(n, 1.0)) for n in self.task_names]))

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        weights = self.task_weights.to(losses.device)[task_index(self.task_names, tasks)]  # [T]
        return weights * losses / len(tasks)

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.task_weights.tolist(), strict=True))
