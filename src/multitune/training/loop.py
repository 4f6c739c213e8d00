"""The training loop, top to bottom: sample tasks, one forward, balanced backward, step, validate."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from multitune.balancing.backward import Balancer, balanced_backward
from multitune.data.collate import collate
from multitune.data.encoding import Encoded
from multitune.data.samplers import ObservesTraining, TaskSampler, examples_per_task
from multitune.data.streams import TaskStream
from multitune.models.multitask import MultiTaskModel


@dataclass
class LoopSettings:
    steps: int
    batch_size: int
    seed: int
    pad_id: int
    mixed_batches: bool = False
    max_grad_norm: float | None = 1.0
    eval_every: int = 200
    log_every: int = 10
    progress: bool = True


@dataclass
class TrainState:
    step: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    seconds: float = 0.0
    task_steps: dict[str, int] = field(default_factory=dict)


def train(
    model: MultiTaskModel,
    streams: dict[str, TaskStream[Encoded]],
    sampler: TaskSampler,
    balancer: Balancer,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
    settings: LoopSettings,
    validate: Callable[[int], tuple[float, dict[str, float]]],
    save_best: Callable[[int], None],
    log: Callable[[dict[str, Any]], None],
) -> TrainState:
    """Run `settings.steps` optimizer steps. `validate` returns the score that picks the best weights and
    each task's main score (for samplers that adapt to validation)."""
    adaptive = sampler if isinstance(sampler, ObservesTraining) else None
    state = TrainState()
    running: dict[str, float] = {}  # exponential moving average of each task's loss, for the progress bar
    model.train()
    bar = tqdm(range(state.step, settings.steps), disable=not settings.progress, desc="train", dynamic_ncols=True)
    started = time.perf_counter()
    for step in bar:
        rng = random.Random(f"{settings.seed}:{step}")
        counts = examples_per_task(sampler, step, rng, settings.batch_size, settings.mixed_batches)
        batch = collate({name: streams[name].take(n) for name, n in counts.items()}, settings.pad_id)
        batch = batch.to(accelerator.device)
        optimizer.zero_grad(set_to_none=True)
        with accelerator.autocast():
            result = balanced_backward(model, batch, balancer, step, accelerator.backward)
        if settings.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        state.step = step + 1

        step_losses = {name: float(loss) for name, loss in result.losses.items()}
        for name, value in step_losses.items():
            running[name] = value if name not in running else 0.9 * running[name] + 0.1 * value
            state.task_steps[name] = state.task_steps.get(name, 0) + 1
        if adaptive is not None:
            adaptive.observe_losses(step_losses, step)
        bar.set_postfix({name: f"{v:.3f}" for name, v in running.items()}, refresh=False)
        if state.step % settings.log_every == 0:
            log(
                {
                    "step": state.step,
                    "loss": float(result.total),
                    "losses": dict(running),
                    "weights": balancer.weighting.weights(),
                    "probabilities": sampler.probabilities(state.step),
                    "lr": scheduler.get_last_lr()[0],
                }
            )
        if state.step % settings.eval_every == 0 or state.step == settings.steps:
            state.seconds += time.perf_counter() - started
            score, task_scores = validate(state.step)
            if adaptive is not None:
                adaptive.observe_validation(task_scores, state.step)
            if score > state.best_score:
                state.best_score, state.best_step = score, state.step
                save_best(state.step)
            started = time.perf_counter()
    bar.close()
    return state
