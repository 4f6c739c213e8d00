"""The training components a config names, one builder each: sampler, balancer, optimizer, regularizers,
task streams, batch collation, the negative-transfer guard."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from multitune.analysis.guard import NegativeTransferGuard
from multitune.balancing.backward import GRADIENT_SOURCES, Balancer
from multitune.balancing.gradients import GRADIENT_AGGREGATORS
from multitune.balancing.losses import LOSS_WEIGHTINGS, LossWeighting
from multitune.config import GradientConfig, MethodConfig
from multitune.config.schema import GuardConfig, RegularizationConfig, ScheduleConfig, TrainingConfig
from multitune.data.collate import Batch, collate, pack
from multitune.data.samplers import SAMPLERS, TaskSampler
from multitune.data.streams import TaskStream
from multitune.data.tokens import Encoded
from multitune.errors import ConfigError
from multitune.models.multitask import MultiTaskModel
from multitune.models.regularization import L2SP, Regularizer
from multitune.training.schedules import schedule_sampler


def build_regularizers(settings: RegularizationConfig, model: MultiTaskModel) -> list[Regularizer]:
    """The architecture's own penalties plus L2-SP toward the weights the model starts from."""
    out = model.regularizers()
    if settings.l2_sp_alpha or settings.l2_sp_beta:
        pretrained = list(model.pretrained_parameters())
        known = {id(p) for p in pretrained}
        new = [p for p in model.parameters() if id(p) not in known]
        out.append(L2SP(pretrained, new, settings.l2_sp_alpha, settings.l2_sp_beta))
    return out


def build_stream(rows: list[Encoded], seed: str, training: TrainingConfig) -> TaskStream[Encoded]:
    """One task's training stream; length-grouped in groups of a batch when asked."""
    if not training.group_by_length:
        return TaskStream(rows, seed)
    return TaskStream(rows, seed, training.batch_size, [len(row.input_ids) for row in rows])


def build_collate(training: TrainingConfig, max_length: int) -> Callable[[dict[str, list[Encoded]], int], Batch]:
    """Padded batches, or (training.packing) packed rows of pack_length tokens."""
    if not training.packing:
        return collate
    length = training.pack_length or max_length
    return lambda rows, pad_id: pack(rows, pad_id, length)


def build_sampler(
    sampling: MethodConfig,
    sizes: dict[str, int],
    weights: dict[str, float],
    total_steps: int,
    schedule: ScheduleConfig | None = None,
) -> TaskSampler:
    """The sampler from its registry (the method's own parameters plus the task sizes, weights and steps),
    unless the schedule trains with a sampler of its own (sequential: its curriculum)."""
    if schedule is not None:
        own = schedule_sampler(schedule, sizes, weights, total_steps)
        if own is not None:
            return own
    injected = {"sizes": sizes, "weights": weights, "total_steps": total_steps}
    return SAMPLERS.build(sampling.name, injected=injected, **sampling.params)


def build_balancer(
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
    """A gradient source taking whole per-task gradients needs trainable shared parameters to take them of."""
    whole = balancer.aggregator is not None and GRADIENT_SOURCES.capabilities(balancer.source).whole_gradients
    if whole and not any(p.requires_grad for p in model.shared_parameters()):
        raise ConfigError(
            f"gradient source '{balancer.source}' needs trainable shared parameters, and this model has none "
            "(per-task adapters on a frozen backbone, or soft sharing): use source 'representation' or "
            "peft.shared=true",
            field="gradient_aggregation.source",
        )


def loss_weights_rate(training: TrainingConfig) -> float:
    """The rate learnable loss weights train at: the heads' (training.head_lr), else training.lr."""
    return training.head_lr or training.lr


def still_loss_weights(weighting: LossWeighting, training: TrainingConfig) -> str | None:
    """A warning when a learnable loss weighting (uncertainty weighting's log-variances) cannot move far from
    its start in this run: AdamW moves a parameter by about its learning rate per step at most, so over
    training.steps steps each learned log-weight changes by at most rate × steps, and the task weights stay
    within a factor exp(rate × steps) of their start. Under 0.1 (weights within ~10% of equal) the weighting
    is in effect equal weighting; None otherwise, or for a weighting with nothing to learn."""
    if not isinstance(weighting, torch.nn.Module) or not any(p.requires_grad for p in weighting.parameters()):
        return None
    rate = loss_weights_rate(training)
    reach = rate * training.steps
    if reach >= 0.1:
        return None
    return (
        f"the learnable loss weights learn at {rate:g} (training.head_lr, else training.lr) for {training.steps} "
        f"steps: each log-weight moves by at most {reach:.3g}, so the task weights stay within "
        f"{math.expm1(reach):.1%} of their start and the run trains as with equal weights; give training.head_lr "
        "a rate at which they can move (it also sets the heads' rate)"
    )


def build_optimizer(
    model: torch.nn.Module, weighting: LossWeighting, training: TrainingConfig
) -> torch.optim.Optimizer:
    """AdamW at training.lr (heads and learnable loss weights: head_lr, when set) with training.weight_decay,
    none on biases and norms. The backbone's parameters get groups of their own: sharded (FSDP) they cannot
    share a fused step with whole tensors, and keeping the groups the same sharded or not lets a sharded run
    resume on one process."""
    lr, head_lr, weight_decay = training.lr, training.head_lr, training.weight_decay
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
            groups.setdefault((loss_weights_rate(training), 0.0, False), []).extend(learnable)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd, _), ps in groups.items()]
    try:  # the fused kernel: on 2 CPU cores it takes the optimizer step of MiniLM from ~0.16 s to ~0.02 s
        return torch.optim.AdamW(param_groups, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(param_groups)


def guard_baselines(
    settings: GuardConfig, task_names: list[str]
) -> tuple[dict[str, float], dict[str, list[tuple[int, float]]]]:
    """Single-task main scores for the guard, and their trajectories by rows seen where a comparison.json
    recorded them; signed like validation scores (negated where lower is better)."""
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
    unknown = sorted(set(baselines) - set(task_names))
    if unknown:
        raise ConfigError(f"baselines for unknown tasks: {', '.join(unknown)}", field="guard.baselines")
    return baselines, trajectories


def build_guard(
    settings: GuardConfig, names: list[str], balancer: Balancer, total_steps: int
) -> NegativeTransferGuard | None:
    """The negative-transfer guard (analysis/guard.py) when enabled; its task multipliers become the
    balancer's `task_scale`."""
    if not settings.enabled:
        return None
    baselines, trajectories = guard_baselines(settings, names)
    guard = NegativeTransferGuard(
        names,
        settings.action,
        settings.patience,
        settings.min_gain,
        settings.factor,
        baselines,
        trajectories,
        start_step=int(settings.start * total_steps),
    )
    balancer.task_scale = guard.scale  # the guard's multipliers are what balanced_backward applies
    return guard
