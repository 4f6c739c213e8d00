"""The training loop, top to bottom: sample tasks, one forward, balanced backward, step, validate, checkpoint."""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from multitune.balancing.backward import Balancer, balanced_backward
from multitune.config import EarlyStopping
from multitune.core.processes import ALONE, Processes, is_sharded
from multitune.data.collate import Batch, collate
from multitune.data.samplers import ObservesTraining, TaskSampler, examples_per_task
from multitune.data.streams import RowStream
from multitune.errors import MultitunError
from multitune.models.multitask import MultiTaskModel
from multitune.models.regularization import Regularizer
from multitune.training.distributed import clip_grad_norm_
from multitune.training.schedules import Reptile


class TrainingStopped(MultitunError):
    """Training ended early: interrupted by a signal, or diverged (too many non-finite steps in a row)."""

    exit_code = 1


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
    checkpoint_every: int | None = None
    max_nonfinite_steps: int = 5
    progress: bool = True
    early_stopping: EarlyStopping | None = None
    gradient_accumulation: int = 1  # backbone passes per step (balanced_backward's micro_batches)


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint must carry (besides weights and streams)."""

    step: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    seconds: float = 0.0
    task_steps: dict[str, int] = field(default_factory=dict)
    task_rows: dict[str, int] = field(default_factory=dict)  # training rows seen per task
    task_tokens: dict[str, int] = field(default_factory=dict)  # their tokens (rows that are token sequences)
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    stale_validations: int = 0  # early stopping on the average: validations since the last gain
    task_best: dict[str, float] = field(default_factory=dict)  # early stopping per task
    task_stale: dict[str, int] = field(default_factory=dict)
    task_best_at: dict[str, int] = field(default_factory=dict)  # the task's own steps at its best validation
    stopped_tasks: list[str] = field(default_factory=list)
    stopped_early: bool = False
    running_losses: dict[str, float] = field(default_factory=dict)  # each task's loss, smoothed, as logged


class StopSignal:
    """Turns SIGTERM / SIGINT into a request the loop honours after the current step (then checkpoints)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for number in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: object) -> None:
        self.received = number

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


@dataclass
class LoopParts:
    """The live objects one training loop drives (LoopSettings holds the plain values)."""

    model: MultiTaskModel
    streams: Mapping[str, RowStream[Any]]
    sampler: TaskSampler
    balancer: Balancer
    optimizer: torch.optim.Optimizer
    scheduler: Any
    accelerator: Any
    processes: Processes = ALONE  # data parallelism: this process trains its share of each global batch
    reptile: Reptile | None = None  # the Reptile schedule: blocks of steps on one task, then a meta-update
    regularizers: Sequence[Regularizer] = ()
    # the rows the streams yield -> a Batch: padded token rows by default, in-memory tensors in api/backbone.py
    collate_rows: Callable[[dict[str, list[Any]], int], Batch] = collate


@dataclass
class LoopHooks:
    """What the loop calls out to. `validate` scores the model (the score picks the best weights, the signed
    per-task scores drive early stopping); `save_best` keeps the new best weights; `checkpoint` writes a
    resumable checkpoint; `log` records a history entry; `stop` is a SIGTERM/SIGINT request."""

    validate: Callable[[int], Validation]
    save_best: Callable[[int], None]
    checkpoint: Callable[[TrainState], object] = lambda state: None
    log: Callable[[dict[str, Any]], None] = lambda entry: None
    stop: StopSignal | None = None


@dataclass
class StepResult:
    """One optimizer step's outcome, for the history and the checks after it."""

    counts: dict[str, int]  # rows per task
    tokens: dict[str, int]  # their tokens per task (empty for rows that are not token sequences)
    losses: dict[str, float]  # raw per-task losses
    total: float  # the objective that was differentiated
    penalty: float  # the regularizers' penalty
    problem: str | None  # why the update was skipped (non-finite loss or gradient), else None


def train(parts: LoopParts, settings: LoopSettings, state: TrainState, hooks: LoopHooks) -> TrainState:
    """Run optimizer steps from `state.step` to `settings.steps` (or until early stopping ends the run)."""
    if state.stopped_early:
        return state
    for name in state.stopped_tasks:
        parts.balancer.task_scale[name] = 0.0
    parts.model.train()
    quiet = not settings.progress or not parts.processes.main
    bar = tqdm(range(state.step, settings.steps), disable=quiet, desc="train", dynamic_ncols=True)
    started = time.perf_counter()
    for step in bar:
        result = optimizer_step(parts, settings, state, step, hooks.log)
        after_step(parts, settings, state, step, result, hooks.log)
        bar.set_postfix({name: f"{v:.3f}" for name, v in state.running_losses.items()}, refresh=False)
        if state.step % settings.eval_every == 0 or state.step == settings.steps:
            state.seconds += time.perf_counter() - started
            validate(parts, settings, state, hooks)
            started = time.perf_counter()
        every = settings.checkpoint_every
        stopping = hooks.stop is not None and hooks.stop.received is not None
        last = state.step == settings.steps or state.stopped_early
        if stopping or last or (every and state.step % every == 0):
            state.seconds += time.perf_counter() - started
            require_finite_weights(parts.model, state, parts.processes)
            hooks.checkpoint(state)
            started = time.perf_counter()
        if stopping:
            raise TrainingStopped(f"interrupted at step {state.step}; checkpoint saved; resume with run.resume=auto")
        if state.stopped_early:
            break
    bar.close()
    require_trained(state)
    if state.best_step == 0:
        raise TrainingStopped(
            f"training ended at step {state.step} without a validation scoring a finite number: no best weights"
        )
    return state


def optimizer_step(
    parts: LoopParts, settings: LoopSettings, state: TrainState, step: int, log: Callable[[dict[str, Any]], None]
) -> StepResult:
    """Draw the step's rows, run the balanced backward and the update (skipped when a loss or the gradient
    is not finite: one bad batch must not poison the run)."""
    model, balancer, optimizer, accelerator, reptile = (
        parts.model, parts.balancer, parts.optimizer, parts.accelerator, parts.reptile,
    )  # fmt: skip
    draw = reptile.block_start(step) if reptile is not None else step
    counts = active_counts(parts.sampler, balancer, draw, random.Random(f"{settings.seed}:{draw}"), settings)
    if reptile is not None:
        reptile.before_step(step)
    drawn = {name: parts.streams[name].take(n) for name, n in counts.items()}  # the global batch
    tokens = {name: sum(len(getattr(row, "input_ids", ())) for row in rows) for name, rows in drawn.items()}
    group, shares = parts.processes, None
    if group.several:  # this process's rows of every task, and its share of each task's loss
        mine = {name: group.shard(task_rows) for name, task_rows in drawn.items()}
        shares = {name: len(mine[name]) / len(drawn[name]) for name in drawn}
        drawn = {name: task_rows for name, task_rows in mine.items() if task_rows}
    batch = parts.collate_rows(drawn, settings.pad_id).to(accelerator.device)
    optimizer.zero_grad(set_to_none=True)
    with accelerator.autocast():
        result = balanced_backward(
            model, batch, balancer, step, accelerator.backward, group, shares, settings.gradient_accumulation
        )
    penalty = sum(r.apply_() for r in parts.regularizers)
    if group.sharded:
        norm = clip_grad_norm_(model.parameters(), settings.max_grad_norm or math.inf, group)
    else:
        norm = accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm or math.inf)
    step_losses = {name: float(loss) for name, loss in result.losses.items()}
    problem = _nonfinite(step_losses, float(norm))
    if problem is None:
        optimizer.step()
        state.nonfinite_in_a_row = 0
        if reptile is not None:
            reptile.after_step(step)
    else:
        optimizer.zero_grad(set_to_none=True)
        state.nonfinite_in_a_row += 1
        state.skipped_steps += 1
        log({"step": step + 1, "skipped": problem})
    parts.scheduler.step()
    state.step = step + 1
    return StepResult(
        counts, {n: t for n, t in tokens.items() if t}, step_losses, float(result.total), float(penalty), problem
    )


def after_step(
    parts: LoopParts,
    settings: LoopSettings,
    state: TrainState,
    step: int,
    result: StepResult,
    log: Callable[[dict[str, Any]], None],
) -> None:
    """The checks after an update, the running losses, what the sampler observes, and the history entry."""
    if result.problem is not None:  # an earlier update may have overflowed the weights: then no step will do
        require_finite_weights(parts.model, state, parts.processes)
    if state.nonfinite_in_a_row >= settings.max_nonfinite_steps:
        raise TrainingStopped(
            f"training stopped at step {state.step}: {state.nonfinite_in_a_row} non-finite steps in a row "
            f"(last: {result.problem}); checkpoints written before it are intact"
        )
    if state.step == settings.steps:
        require_trained(state)
    running = state.running_losses  # exponential moving average of each task's loss, for the log and the bar
    for name, rows in result.counts.items():
        state.task_rows[name] = state.task_rows.get(name, 0) + rows
    for name, tokens in result.tokens.items():
        state.task_tokens[name] = state.task_tokens.get(name, 0) + tokens
    for name, value in result.losses.items():
        if math.isfinite(value):
            running[name] = value if name not in running else 0.9 * running[name] + 0.1 * value
        state.task_steps[name] = state.task_steps.get(name, 0) + 1
    sampler = parts.sampler
    if isinstance(sampler, ObservesTraining) and result.problem is None:
        sampler.observe_losses(result.losses, step)
    if state.step % settings.log_every == 0:
        log(
            {
                "step": state.step,
                "loss": result.total,
                "losses": dict(running),
                "weights": parts.balancer.weighting.weights(),
                "probabilities": sampler.probabilities(state.step),
                **({"token_shares": token_shares(state.task_tokens)} if state.task_tokens else {}),
                "lr": parts.scheduler.get_last_lr()[0],
                **({"penalty": result.penalty} if parts.regularizers else {}),
            }
        )


def validate(parts: LoopParts, settings: LoopSettings, state: TrainState, hooks: LoopHooks) -> None:
    """Score the model; new best weights are kept; early stopping counts the validations without a gain."""
    result = hooks.validate(state.step)
    if isinstance(parts.sampler, ObservesTraining):
        parts.sampler.observe_validation(result.task_scores, state.step)
    if result.score > state.best_score:
        require_finite_weights(parts.model, state, parts.processes)
        state.best_score, state.best_step = result.score, state.step
        hooks.save_best(state.step)
    if settings.early_stopping is not None:
        for event in early_stop(settings.early_stopping, state, result, parts.balancer, settings.eval_every):
            hooks.log({"step": state.step, "early_stopping": event})


@dataclass
class Validation:
    score: float  # what picks the best weights: the average main score
    task_scores: dict[str, float]  # each task's main score, as the metric reports it
    signed_scores: dict[str, float]  # the same, negated where lower is better (so higher is always better)


def token_shares(tokens: dict[str, int]) -> dict[str, float]:
    """Each task's share of the training tokens so far (sums to 1)."""
    total = sum(tokens.values())
    return {name: round(count / total, 6) for name, count in tokens.items()} if total else {}


def early_stop(
    rule: EarlyStopping, state: TrainState, result: Validation, balancer: Balancer, eval_every: int
) -> list[str]:
    """Update the early-stopping counters after a validation (every `eval_every` steps); returns what it
    decided, for the log."""
    events = []
    if not rule.per_task:
        if result.score > state.task_best.get("", -math.inf) + rule.min_delta:
            state.task_best[""] = result.score
            state.stale_validations = 0
        else:
            state.stale_validations += 1
        if state.stale_validations >= rule.patience:
            state.stopped_early = True
            events.append(f"average main score did not improve in {rule.patience} validations: run ends")
        return events
    for name, value in result.signed_scores.items():
        if name in state.stopped_tasks:
            continue
        own_steps = state.task_steps.get(name, 0)
        if value > state.task_best.get(name, -math.inf) + rule.min_delta:
            state.task_best[name], state.task_stale[name] = value, 0
            state.task_best_at[name] = own_steps
            continue
        state.task_stale[name] = state.task_stale.get(name, 0) + 1
        if rule.count == "own_steps":
            since = own_steps - state.task_best_at.get(name, 0)
            stale, why = since >= rule.patience * eval_every, f"{since} of its own steps"
        else:
            stale, why = state.task_stale[name] >= rule.patience, f"{rule.patience} validations"
        if stale:
            state.stopped_tasks.append(name)
            balancer.task_scale[name] = 0.0
            events.append(f"task '{name}' did not improve in {why}: no longer trained")
    if set(state.stopped_tasks) >= set(result.signed_scores):
        state.stopped_early = True
        events.append("every task has stopped: run ends")
    return events


def active_counts(
    sampler: TaskSampler, balancer: Balancer, step: int, rng: random.Random, settings: LoopSettings
) -> dict[str, int]:
    """Rows per task for this step, leaving out tasks the guard dropped (redrawn from the same rng)."""
    for _ in range(1000):
        counts = examples_per_task(sampler, step, rng, settings.batch_size, settings.mixed_batches)
        counts = {name: n for name, n in counts.items() if balancer.task_scale.get(name, 1.0) > 0}
        if counts:
            return counts
    raise TrainingStopped(f"no task left to train at step {step + 1}: every drawn task was dropped")


def require_trained(state: TrainState) -> None:
    """A run whose every update was skipped trained nothing: it must not end as if it had."""
    if state.step > 0 and state.skipped_steps >= state.step:
        raise TrainingStopped(
            f"training stopped at step {state.step}: every step was skipped as non-finite, nothing was trained"
        )


def require_finite_weights(model: torch.nn.Module, state: TrainState, group: Processes) -> None:
    """Stop when an update has made any weight NaN or infinite (an overflowing learning rate does, with finite
    losses and gradients): such weights are never validated into the best model nor checkpointed. With a
    sharded backbone each process checks its shards and the verdicts are summed, so all stop together."""
    tensors = [*model.parameters(), *model.buffers()]
    floats = [(i, t) for i, t in enumerate(tensors) if t.is_floating_point()]
    if not floats:
        return
    device = floats[0][1].device
    bad = torch.zeros(len(tensors), device=device)
    for i, tensor in floats:
        local = tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]
        bad[i] = (~torch.isfinite(local.detach())).any().to(device)
    group.sum_(bad)
    count = int((bad > 0).sum())
    if count:
        names = [name for name, _ in [*model.named_parameters(), *model.named_buffers()]]
        first = names[int((bad > 0).nonzero()[0])]
        raise TrainingStopped(
            f"training stopped at step {state.step}: {count} of {len(tensors)} weight tensors hold NaN or infinity "
            f"(first: {first}), so an update overflowed (is training.lr too large?); they were not saved, "
            "earlier checkpoints are intact"
        )


def _nonfinite(losses: dict[str, float], grad_norm: float) -> str | None:
    """What is non-finite in this step, named by task where it can be, or None."""
    bad = [name for name, value in losses.items() if not math.isfinite(value)]
    if bad:
        return f"non-finite loss in task {', '.join(bad)}"
    if not math.isfinite(grad_norm):
        return f"non-finite gradient (tasks in the step: {', '.join(losses)})"
    return None
