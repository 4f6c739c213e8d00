"""The rules a valid config follows beyond its schema: usable numbers, and which choices combine. The
combination rules read the capabilities each method declares on its registry entry (registry.Capabilities),
given to them as a lookup, and never compare a method's name."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

from multitune.config.schema import Config, ScheduleConfig
from multitune.errors import ConfigError
from multitune.registry import Capabilities

FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: the weights' dtype (bf16 shares its range)


INT64_MAX = 2**63 - 1  # torch's and numpy's widest integers


def check_numbers(value: Any, field: str) -> None:
    """Every number in a setting (method parameters too) is usable: a float is finite and within float32's
    range (the weights and losses it scales are float32, where a larger one is inf), an integer within int64.
    An inf learning rate would skip every update and still exit 0."""
    stack: list[tuple[str, Any]] = [(field, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, float) and not (math.isfinite(item) and abs(item) <= FLOAT32_MAX):
            raise ConfigError(f"must be a finite number within float32's range (±3.4e38), got {item!r}", field=path)
        if isinstance(item, int) and abs(item) > INT64_MAX:
            raise ConfigError(
                f"must be an integer within int64's range, got one of {len(str(abs(item)))} digits", field=path
            )
        children = (
            item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, (list, tuple)) else ()
        )
        stack.extend(reversed([(f"{path}.{key}" if path else str(key), child) for key, child in children]))


def check_refinement(config: Config) -> None:
    """A LoRA refinement adapts the shared backbone's own projections: not on top of per-task adapters; only a
    LoRA refinement chooses the blocks it adapts (`check_refine_layers`)."""
    schedule = config.training.schedule
    if schedule.refine == "lora" and config.model.peft is not None:
        raise ConfigError(
            "a LoRA refinement adapts the shared backbone; this model already gives each task its own adapter "
            "(model.peft): use refine: full, or no model.peft",
            field="training.schedule.refine",
        )
    check_refine_layers(schedule)


def check_refine_layers(schedule: ScheduleConfig) -> None:
    """refine_layers chooses the blocks of a LoRA refinement: with a full refinement it means nothing."""
    if schedule.refine_layers is not None and schedule.refine != "lora":
        raise ConfigError(
            "refine_layers chooses the blocks a LoRA refinement adapts; a full refinement trains every weight: "
            "use refine: lora, or no refine_layers",
            field="training.schedule.refine_layers",
        )


NOT_DRAWN = ("all_tasks", "round_robin", "sequential")  # samplers that pick tasks by a rule, not by probability


def check_speed_options(config: Config) -> None:
    """Packing, gradient accumulation and mixing by tokens: where they apply."""
    training = config.training
    if training.mix_by == "tokens":
        if config.model.kind == "vision":
            raise ConfigError("mix_by: tokens shares out text tokens; image tasks have none", field="training.mix_by")
        ruled = config.sampling.name if config.sampling.name in NOT_DRAWN else None
        ruled = ruled or ("sequential" if training.schedule.name == "sequential" else None)
        if ruled is not None:
            raise ConfigError(
                f"mix_by: tokens reweights the tasks' draws; the {ruled} sampler picks tasks by a rule, not by "
                "probability",
                field="training.mix_by",
            )
    if training.packing:
        not_generation = [name for name, task in config.tasks.items() if task.type != "generation"]
        if config.model.kind != "causal_lm" or not_generation:
            raise ConfigError(
                "packing puts several generation examples in one row of a causal LM; "
                + (
                    f"task '{not_generation[0]}' is a {config.tasks[not_generation[0]].type} task"
                    if not_generation
                    else f"this model is a {config.model.kind}"
                ),
                field="training.packing",
            )
        if config.model.peft is not None:  # with `shared` too: every row also has its own task's adapter
            raise ConfigError(
                "per-task adapters route whole rows to one task; a packed row holds several tasks' examples",
                field="training.packing",
            )
        if training.pack_length is not None and training.pack_length < config.model.max_length:
            raise ConfigError(
                f"pack_length {training.pack_length} is shorter than model.max_length {config.model.max_length}",
                field="training.pack_length",
            )
    if training.gradient_accumulation > training.batch_size:
        raise ConfigError(
            f"gradient_accumulation {training.gradient_accumulation} splits a batch of {training.batch_size} rows "
            "into more parts than it has rows",
            field="training.gradient_accumulation",
        )


class Capable(Protocol):
    """The registries' declarations, as the rules read them (catalogue.py gives the real ones)."""

    def capabilities(self, kind: str, name: str) -> Capabilities:
        """What method `name` of `kind` (architecture, adapter, gradient source, schedule) supports."""
        ...

    def supporting(self, kind: str, wanted: Callable[[Capabilities], bool]) -> list[str]:
        """The names of `kind` whose capabilities are `wanted`, sorted."""
        ...


def either(names: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_combinations(config: Config, methods: Capable) -> None:
    """The chosen methods combine: each rule reads what the methods declare, never their names."""
    model, name = config.model, config.model.architecture.name
    architecture = methods.capabilities("architecture", name)
    if model.kind not in architecture.model_kinds:
        shared_by = methods.supporting("architecture", lambda c: model.kind in c.model_kinds)
        raise ConfigError(
            f"a {model.kind} backbone{' (image tasks)' if model.kind == 'vision' else ' (or any generation task)'} "
            f"is shared by {either(shared_by)} sharing only",
            field="model.architecture.name",
        )
    gradient = config.gradient_aggregation
    source = methods.capabilities("gradient source", gradient.source) if gradient is not None else None
    if source is not None and source.whole_gradients and not architecture.shares_parameters:
        partial = methods.supporting("gradient source", lambda c: not c.whole_gradients)
        raise ConfigError(
            f"{name} sharing shares no parameters: gradient aggregation needs source {either(partial)!r}",
            field="gradient_aggregation.source",
        )
    if model.peft is not None:
        method = model.peft.method
        if model.kind not in methods.capabilities("adapter", method).model_kinds:
            usable = methods.supporting("adapter", lambda c: model.kind in c.model_kinds)
            raise ConfigError(
                f"per-task {method} adapters are not available for a {model.kind} backbone; use {either(usable)}",
                field="model.peft.method",
            )
        if not architecture.takes_adapters:
            hosts = methods.supporting("architecture", lambda c: c.takes_adapters)
            raise ConfigError(
                f"per-task adapters already give every task its own weights; use them with {either(hosts)}, not {name}",
                field="model.peft",
            )
    peft = model.peft
    frozen = peft is not None and not peft.train_backbone and not peft.shared
    if frozen and (config.analysis.task_affinity or config.guard.enabled):
        raise ConfigError(
            "task affinity is measured on shared trainable parameters, and per-task adapters on a frozen backbone "
            "share none: set model.peft.train_backbone or model.peft.shared",
            field="analysis.task_affinity" if config.analysis.task_affinity else "guard.enabled",
        )
    if not architecture.shares_parameters and (config.analysis.task_affinity or config.guard.enabled):
        raise ConfigError(
            f"task affinity is measured on shared parameters, and {name} sharing has none",
            field="analysis.task_affinity" if config.analysis.task_affinity else "guard.enabled",
        )
    training = config.training
    if training.gradient_accumulation > 1 and source is not None and source.whole_gradients:
        raise ConfigError(
            "gradient accumulation splits the shared representation's backward; with the parameters source use "
            "a smaller batch, several processes, or the representation source",
            field="training.gradient_accumulation",
        )
    schedule = training.schedule.name
    if methods.capabilities("schedule", schedule).one_task_per_step and (training.mixed_batches or gradient):
        raise ConfigError(
            f"the {schedule} schedule trains one task at a time: no mixed_batches, no gradient_aggregation",
            field="training.schedule.name",
        )
