"""Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019).

w_i = T · softmax(r / τ)_i with r_i = L̄_i(k−1) / L̄_i(k−2), the ratio of task i's average loss over the
last two windows: a task whose loss falls slowly gains weight. The paper's windows are epochs; here a
window is `period` steps, since tasks of very different sizes have no common epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multitune.balancing.losses.base import LOSS_WEIGHTINGS, task_index


@LOSS_WEIGHTINGS.register("dwa")
class DynamicWeightAverage(nn.Module):
    """T·softmax(r/τ), r_i = ratio of task i's mean loss over the last two windows (Liu et al. 2019)."""

    paper = "Liu et al. 2019"
    cost = "O(T)"
    sums: Tensor
    counts: Tensor
    previous: Tensor  # [2, T]: mean losses of windows k-2 and k-1 (0 = unknown)
    task_weights: Tensor
    window: Tensor

    def __init__(
        self,
        task_names: Sequence[str],
        temperature: float = 2.0,
        period: int = 50,
    ) -> None:
        super().__init__()
        if temperature <= 0 or period < 1:
            raise ValueError("temperature must be > 0 and period >= 1")
        self.task_names = list(task_names)
        self.temperature = temperature
        self.period = period
        n = len(self.task_names)
        self.register_buffer("sums", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("previous", torch.zeros(2, n, dtype=torch.float64))
        self.register_buffer("task_weights", torch.ones(n))
        self.register_buffer("window", torch.zeros((), dtype=torch.long))

    def _roll(self) -> None:
        means = torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), self.previous[1])
        self.previous = torch.stack([self.previous[1], means])
        self.sums.zero_()
        self.counts.zero_()
        if bool((self.previous > 0).all()):
            ratio = (self.previous[1] / self.previous[0]).float()
            self.task_weights = len(self.task_names) * torch.softmax(ratio / self.temperature, dim=0)

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        window = step // self.period
        while int(self.window) < window:
            self._roll()
            self.window += 1
        index = task_index(self.task_names, tasks)
        observed = losses.detach().double().to(self.sums.device)  # the state lives where the module was put
        finite = torch.isfinite(observed)  # a skipped (non-finite) step must not poison the averages
        self.sums[index] += torch.where(finite, observed, torch.zeros_like(observed))
        self.counts[index] += finite.double()
        return self.task_weights.to(losses.device)[index] * losses / len(tasks)

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.task_weights.tolist(), strict=True))
