"""Training schedules, registered in SCHEDULES with what they support: joint (the default), sequential (a
curriculum sampler, data/samplers.py), two_stage (recipe/two_stage.py) and Reptile, whose meta-update is here.

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

from multitune.data.samplers import SAMPLERS, TaskSampler
from multitune.registry import Capabilities, Registry

# An entry gives the sampler the schedule trains with in place of the config's, or None to keep that one.
SCHEDULES: Registry[TaskSampler | None] = Registry("schedule")
SCHEDULE_INJECTED = ("sizes", "weights", "total_steps")
ONE_TASK = Capabilities(one_task_per_step=True)


@SCHEDULES.register("joint")
def joint() -> None:
    """Every step draws its tasks from the config's sampler (the default)."""
    return None


@SCHEDULES.register("sequential", ONE_TASK)
def sequential(
    sizes: dict[str, int],
    weights: dict[str, float],
    total_steps: int,
    order: list[str] | None = None,
    fractions: list[float] | None = None,
) -> TaskSampler:
    """Tasks one after another, in `order`, each for its fraction of the steps (a curriculum)."""
    injected = {"sizes": sizes, "weights": weights, "total_steps": total_steps}
    return SAMPLERS.build("sequential", injected=injected, order=order, fractions=fractions)


@SCHEDULES.register("two_stage", Capabilities(writes_weights=True))
def two_stage(
    finetune_steps: int = 200,
    finetune_lr: float | None = None,
    keep: str = "refined",
    refine: str = "full",
    refine_r: int = 8,
    refine_layers: int | None = None,
) -> None:
    """Joint training, then per task a fine-tuned copy or a LoRA refinement (MT-DNN, Liu et al. 2019)."""
    return None


@SCHEDULES.register("reptile", Capabilities(one_task_per_step=True, writes_weights=True))
def reptile(inner_steps: int = 5, meta_lr: float = 0.5) -> None:
    """Blocks of inner_steps steps on one task, each followed by the Reptile meta-update (Nichol et al. 2018)."""
    return None


def schedule_sampler(schedule: Any, sizes: dict[str, int], weights: dict[str, float], total_steps: int) -> Any:
    """The sampler `schedule` (the config's schedule group) trains with in place of the config's, or None."""
    accepted = SCHEDULES.parameters(schedule.name, SCHEDULE_INJECTED)
    params = {key: getattr(schedule, key) for key in accepted}
    injected = {"sizes": sizes, "weights": weights, "total_steps": total_steps}
    return SCHEDULES.build(schedule.name, injected=injected, field="training.schedule", **params)


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
