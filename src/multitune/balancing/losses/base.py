"""The LossWeighting protocol and its registry.

A weighting maps the per-task losses of a step [T] to per-task objective terms [T]; their sum is what
gets differentiated. Keeping the terms separate lets a gradient aggregator combine per-task gradients
of already-weighted losses. Convention: equal weighting gives L_i / T, so steps with one task and steps
with several have gradients of the same scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor

from multitune.registry import Registry


@runtime_checkable
class LossWeighting(Protocol):
    """Per-task losses [T] (in the order of `tasks`) -> per-task terms [T] whose sum is the objective."""

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor: ...

    def weights(self) -> dict[str, float]: ...


@runtime_checkable
class ObservesTaskGradients(Protocol):
    """A weighting that learns from each task's gradient norm w.r.t. the shared representation (GradNorm)."""

    def observe_gradient_norms(self, norms: Tensor, losses: Tensor, tasks: Sequence[str], step: int) -> None: ...


LOSS_WEIGHTINGS: Registry[LossWeighting] = Registry("loss weighting")
WEIGHTING_INJECTED = ("task_names", "loss_weights", "seed")  # filled in by the wiring


def task_index(task_names: Sequence[str], tasks: Sequence[str]) -> list[int]:
    lookup = {name: i for i, name in enumerate(task_names)}
    return [lookup[name] for name in tasks]
