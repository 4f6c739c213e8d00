"""Loss weighting: per-task losses [T] -> one scalar to differentiate.

Weights are applied to the mean over the tasks present in the step, so a step with one task and a step
mixing several give gradients of the same scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from multitune.registry import Registry


@runtime_checkable
class LossWeighting(Protocol):
    """Per-task losses [T] (in the order of `tasks`) -> one scalar; may hold state (`state_dict`)."""

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor: ...

    def weights(self) -> dict[str, float]: ...


LOSS_WEIGHTINGS: Registry[LossWeighting] = Registry("loss weighting")
WEIGHTING_INJECTED = ("task_names", "loss_weights")  # filled in by the wiring


@LOSS_WEIGHTINGS.register("static")
class StaticWeighting(nn.Module):
    """Fixed per-task weights from each task's `loss_weight`: mean over present tasks of w_i · L_i."""

    task_weights: Tensor  # [T], a buffer

    def __init__(self, task_names: Sequence[str], loss_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        given = loss_weights or {}
        self.task_names = list(task_names)
        self.register_buffer("task_weights", torch.tensor([float(given.get(n, 1.0)) for n in self.task_names]))
        self._index = {name: i for i, name in enumerate(self.task_names)}

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        index = torch.tensor([self._index[name] for name in tasks], device=losses.device)
        weights = self.task_weights.to(losses.device)[index]  # [T]
        return (weights * losses).mean()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.task_weights.tolist(), strict=True))


@LOSS_WEIGHTINGS.register("equal")
class EqualWeighting(nn.Module):
    """Every task weighs the same: the mean of the losses present in the step."""

    def __init__(self, task_names: Sequence[str], loss_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.task_names = list(task_names)

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        return losses.mean()

    def weights(self) -> dict[str, float]:
        return dict.fromkeys(self.task_names, 1.0)
