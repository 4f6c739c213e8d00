"""Training schedules beyond joint training: the Reptile meta-update (two-stage and sequential live in
run.py and data/samplers.py).

Reptile (Nichol, Achiam & Schulman 2018, "On first-order meta-learning algorithms"): train `inner_steps`
steps on one task from θ, reaching θ'; then move θ ← θ + ε(θ' − θ). Repeated over tasks, θ drifts
toward weights from which every task is a few steps away, which is what makes a new task adapt faster.
Here the inner steps are ordinary steps of the run's loop and optimizer, all on the task drawn at the
start of the block; the outer update rewrites the trainable weights at the block's end.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Reptile:
    def __init__(self, model: nn.Module, inner_steps: int, meta_lr: float) -> None:
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.inner_steps, self.meta_lr = inner_steps, meta_lr
        self.start: list[torch.Tensor] | None = None

    def block_start(self, step: int) -> int:
        """The step whose draw decides the task of `step`'s block."""
        return step - step % self.inner_steps

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        if step % self.inner_steps == 0 or self.start is None:
            self.start = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if (step + 1) % self.inner_steps != 0 or self.start is None:
            return
        for p, p0 in zip(self.parameters, self.start, strict=True):
            p.copy_(p0 + self.meta_lr * (p - p0))
        self.start = None

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = state["start"]
