"""The training components a config names, one builder each: sampler, balancer, optimizer, regularizers,
task streams, batch collation, the negative-transfer guard."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from multitune.analysis.guard import NegativeTransferGuard
from multitune.balancing.backward import Balancer
from multitune.balancing.gradients import GRADIENT_AGGREGATORS
from multitune.balancing.losses import LOSS_WEIGHTINGS, LossWeighting
from multitune.config import Config, GradientConfig, MethodConfig
from multitune.data.collate import Batch, collate, pack
from multitune.data.samplers import SAMPLERS, TaskSampler
from multitune.data.streams import TaskStream
from multitune.data.tasks import (
    TaskData,
)
from multitune.data.tokens import Encoded
from multitune.errors import ConfigError
from multitune.models.multitask import MultiTaskModel
from multitune.models.regularization import L2SP, Regularizer


def build_regularizers(config: Config, model: MultiTaskModel) -> list[Regularizer]:
    """The architecture's own penalties plus L2-SP toward the weights the model starts from."""
    out = model.regularizers()
    settings = config.regularization
    if settings.l2_sp_alpha or settings.l2_sp_beta:
        pretrained = list(model.pretrained_parameters())
        known = {id(p) for p in pretrained}
        new = [p for p in model.parameters() if id(p) not in known]
        out.append(L2SP(pretrained, new, settings.l2_sp_alpha, settings.l2_sp_beta))
    return out


def task_stream(rows: list[Encoded], seed: str, training: Any) -> TaskStream[Encoded]:
    """One task's training stream; length-grouped in groups of a batch when asked."""
    if not training.group_by_length:
        return TaskStream(rows, seed)
    return TaskStream(rows, seed, training.batch_size, [len(row.input_ids) for row in rows])


def batch_collate(config: Config) -> Callable[[dict[str, list[Encoded]], int], Batch]:
    """Padded batches, or (training.packing) packed rows of pack_length tokens."""
    if not config.training.packing:
        return collate
    length = config.training.pack_length or config.model.max_length
    return lambda rows, pad_id: pack(rows, pad_id, length)


def build_sampler(config: Config, tasks: dict[str, TaskData]) -> TaskSampler:
    """The config's sampler; the sequential schedule replaces it with its curriculum."""
    sizes = {name: len(task.splits["train"]) for name, task in tasks.items()}
    weights = {name: task.config.sampling_weight for name, task in tasks.items()}
    schedule = config.training.schedule
    if schedule.name == "sequential":
        injected = {"sizes": sizes, "weights": weights, "total_steps": config.training.steps}
        return SAMPLERS.build("sequential", injected=injected, order=schedule.order, fractions=schedule.fractions)
    return make_sampler(config.sampling, sizes, weights, config.training.steps)


def make_sampler(
    sampling: MethodConfig, sizes: dict[str, int], weights: dict[str, float], total_steps: int
) -> TaskSampler:
    """A sampler from its registry: the method's own parameters plus the task sizes, weights and steps."""
    injected = {"sizes": sizes, "weights": weights, "total_steps": total_steps}
    return SAMPLERS.build(sampling.name, injected=injected, **sampling.params)


def build_balancer(config: Config, task_names: list[str]) -> Balancer:
    loss_weights = {n: t.loss_weight for n, t in config.tasks.items()}
    return make_balancer(config.loss_weighting, config.gradient_aggregation, task_names, loss_weights, config.run.seed)


def make_balancer(
    loss_weighting: MethodConfig,
    gradient: GradientConfig | None,
    task_names: list[str],
    loss_weights: dict[str, float],
    seed: int,
) -> Balancer:
    """A loss weighting and, optionally, a gradient aggregator with its source, built from their registries."""
    weighting = LOSS_WEIGHTINGS.build(
        loss_weighting.name,
        injected={"task_names": task_names, "loss_weights": loss_weights, "seed": seed},
        **loss_weighting.params,
    )
    if gradient is None:
        return Balancer(weighting)
    aggregator = GRADIENT_AGGREGATORS.build(
        gradient.name, injected={"task_names": task_names, "seed": seed}, **gradient.params
    )
    dtype = torch.bfloat16 if gradient.buffer_dtype == "bfloat16" else torch.float32
    return Balancer(weighting, aggregator, gradient.source, dtype)


def require_shared_parameters(model: MultiTaskModel, balancer: Balancer) -> None:
    """The `parameters` gradient source needs trainable shared parameters to take per-task gradients of."""
    if balancer.source == "parameters" and not any(p.requires_grad for p in model.shared_parameters()):
        raise ConfigError(
            "gradient source 'parameters' needs trainable shared parameters, and this model has none "
            "(per-task adapters on a frozen backbone, or soft sharing): use source 'representation' or "
            "peft.shared=true",
            field="gradient_aggregation.source",
        )


def optimizer_for(model: MultiTaskModel, weighting: LossWeighting, config: Config) -> torch.optim.Optimizer:
    training = config.training
    return make_optimizer(model, weighting, training.lr, training.head_lr, training.weight_decay)


def make_optimizer(
    model: torch.nn.Module, weighting: LossWeighting, lr: float, head_lr: float | None, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms; heads (and learnable loss weights) may take their own rate.
    The backbone's parameters get groups of their own: sharded (FSDP) they cannot share a fused step with whole
    tensors, and keeping the groups the same sharded or not lets a sharded run resume on one process."""
    groups: dict[tuple[float, float, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = 0.0 if parameter.ndim < 2 else weight_decay
        rate = head_lr if name.startswith("heads.") and head_lr else lr
        groups.setdefault((rate, decay, name.startswith("backbone.")), []).append(parameter)
    if isinstance(weighting, torch.nn.Module):  # learnable loss weights learn at the heads' rate
        learnable = [p for p in weighting.parameters() if p.requires_grad]
        if learnable:
            groups.setdefault((head_lr or lr, 0.0, False), []).extend(learnable)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd, _), ps in groups.items()]
    try:  # the fused kernel: on 2 CPU cores it takes the optimizer step of MiniLM from ~0.16 s to ~0.02 s
        return torch.optim.AdamW(param_groups, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(param_groups)


def guard_baselines(config: Config) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """Single-task main scores for the guard, and their trajectories by rows seen where a comparison.json
    recorded them; signed like validation scores (negated where lower is better)."""
    settings = config.guard
    baselines = dict(settings.baselines or {})
    trajectories: dict[str, list[tuple[int, float]]] = {}
    if settings.baselines_from:
        path = Path(settings.baselines_from)
        try:
            compared = json.loads(path.read_text(encoding="utf-8"))["tasks"]
            for name, entry in compared.items():
                sign = 1.0 if entry.get("higher_is_better", True) else -1.0
                baselines.setdefault(name, sign * entry["single"])
                points = [(int(rows), sign * float(score)) for rows, score in entry.get("single_trajectory") or []]
                if points and name not in (settings.baselines or {}):
                    trajectories[name] = points
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError("not a readable comparison.json", file=str(path), field="guard.baselines_from") from None
    unknown = sorted(set(baselines) - set(config.tasks))
    if unknown:
        raise ConfigError(f"baselines for unknown tasks: {', '.join(unknown)}", field="guard.baselines")
    return baselines, trajectories


def build_guard(config: Config, names: list[str], balancer: Balancer) -> NegativeTransferGuard | None:
    settings = config.guard
    if not settings.enabled:
        return None
    baselines, trajectories = guard_baselines(config)
    guard = NegativeTransferGuard(
        names,
        settings.action,
        settings.patience,
        settings.min_gain,
        settings.factor,
        baselines,
        trajectories,
        start_step=int(settings.start * config.training.steps),
    )
    balancer.task_scale = guard.scale  # the guard's multipliers are what balanced_backward applies
    return guard
