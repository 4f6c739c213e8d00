"""Loss-scale invariant objectives: the geometric mean of the losses, and the sum of their logs.

Both make the update independent of each loss's scale: multiplying L_i by a constant changes neither
direction. Geometric mean: Chennupati et al., "MultiNet++", CVPR Workshops 2019; the log-loss ("scale
invariant") baseline as compared in Liu et al., "FAMO", NeurIPS 2023.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multitune.balancing.losses.base import LOSS_WEIGHTINGS

EPSILON = 1e-8


@LOSS_WEIGHTINGS.register("geometric")
class GeometricMeanWeighting(nn.Module):
    """Minimise (Π L_i)^(1/T): task i's gradient is scaled by G / (T·L_i) (Chennupati et al. 2019)."""

    paper = "Chennupati et al. 2019"
    needs_several_tasks = True  # with one task per step it reduces exactly to equal weighting
    cost = "O(T)"

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self._last: dict[str, float] = dict.fromkeys(self.task_names, 1.0)

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        clamped = losses.clamp_min(EPSILON)
        geometric = torch.exp(torch.log(clamped).mean())
        coefficients = (geometric / (len(tasks) * clamped)).detach()  # [T]: d G / d L_i
        self._last.update(zip(tasks, (coefficients * len(tasks)).tolist(), strict=True))
        return coefficients * losses

    def weights(self) -> dict[str, float]:
        return dict(self._last)


@LOSS_WEIGHTINGS.register("log")
class LogLossWeighting(nn.Module):
    """Minimise Σ log L_i / T: task i's gradient is scaled by 1 / (T·L_i) (scale-invariant baseline)."""

    paper = "Liu et al. 2023 (SI baseline)"
    cost = "O(T)"

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self._last: dict[str, float] = dict.fromkeys(self.task_names, 1.0)

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        self._last.update(zip(tasks, (1.0 / losses.detach().clamp_min(EPSILON)).tolist(), strict=True))
        return torch.log(losses.clamp_min(EPSILON)) / len(tasks)

    def weights(self) -> dict[str, float]:
        return dict(self._last)
