"""Equal weighting: the mean of the losses present in the step."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from multitune.balancing.losses.base import LOSS_WEIGHTINGS


@LOSS_WEIGHTINGS.register("equal")
class EqualWeighting(nn.Module):
    """Every task weighs the same: L_i / T."""

    paper = "baseline"
    cost = "O(T)"

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        return losses / len(tasks)

    def weights(self) -> dict[str, float]:
        return dict.fromkeys(self.task_names, 1.0)
