"""balanced_backward: the one function that writes `.grad`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from multitune.balancing.weighting import LossWeighting


def balanced_backward(
    losses: dict[str, Tensor],
    weighting: LossWeighting,
    step: int,
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> Tensor:
    """Combine per-task losses with the weighting and backpropagate; returns the combined loss."""
    names = list(losses)
    stacked = torch.stack([losses[name] for name in names])  # [T]
    total = weighting.combine(stacked, names, step)
    backward(total)
    return total.detach()
