"""Every method multitune registers (samplers, loss weightings, gradient aggregators and sources,
architectures, adapters, heads, metrics, schedules): the checks a config's choices must pass, the capability
lookup the combination rules read, and the catalogue `multitune list` prints."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from multitune.balancing.backward import GRADIENT_SOURCES
from multitune.balancing.gradients import GRADIENT_AGGREGATORS
from multitune.balancing.gradients.base import AGGREGATOR_INJECTED
from multitune.balancing.losses import LOSS_WEIGHTINGS
from multitune.balancing.losses.base import WEIGHTING_INJECTED
from multitune.config import (
    Config,
    GradientConfig,
    MethodConfig,
    check_numbers,
    check_refinement,
    check_speed_options,
    loading,
)
from multitune.config.rules import check_combinations
from multitune.data.discovery import discovered_tasks
from multitune.data.samplers import SAMPLER_INJECTED, SAMPLERS
from multitune.errors import ConfigError
from multitune.evaluation.metrics import METRICS
from multitune.models.adapters.base import ADAPTERS
from multitune.models.architectures import ARCHITECTURE_INJECTED, ARCHITECTURES
from multitune.models.heads import HEADS
from multitune.models.merging import MERGE_METHODS
from multitune.registry import Capabilities, Registry
from multitune.training.schedules import SCHEDULES, schedule_sampler

DECLARING: dict[str, Registry[Any]] = {  # the registries whose entries declare capabilities, by kind
    "architecture": ARCHITECTURES,
    "adapter": ADAPTERS,
    "gradient source": GRADIENT_SOURCES,
    "schedule": SCHEDULES,
}


class Methods:
    """The registries' capability declarations, by kind, for the combination rules (config/rules.py)."""

    def capabilities(self, kind: str, name: str) -> Capabilities:
        return DECLARING[kind].capabilities(name)

    def supporting(self, kind: str, wanted: Callable[[Capabilities], bool]) -> list[str]:
        registry = DECLARING[kind]
        return [name for name in registry.names() if wanted(registry.capabilities(name))]


METHODS = Methods()


def check_methods(config: Config) -> None:
    """Method names and parameters exist in their registries, and the choices combine."""
    architecture = config.model.architecture
    ARCHITECTURES.get(architecture.name, field="model.architecture.name")
    ARCHITECTURES.check_params(
        architecture.name, architecture.params, ARCHITECTURE_INJECTED, field="model.architecture"
    )
    if config.model.peft is not None:
        ADAPTERS.get(config.model.peft.method, field="model.peft.method")
    if config.gradient_aggregation is not None:
        GRADIENT_SOURCES.get(config.gradient_aggregation.source, field="gradient_aggregation.source")
    SCHEDULES.get(config.training.schedule.name, field="training.schedule.name")
    check_combinations(config, METHODS)
    check_speed_options(config)
    check_refinement(config)
    sizes = dict.fromkeys(config.tasks, 1)
    try:  # a schedule's own settings (the sequential order and fractions) now, not after the data is read
        schedule_sampler(config.training.schedule, sizes, dict.fromkeys(config.tasks, 1.0), config.training.steps)
    except ConfigError as error:
        raise ConfigError(error.message, field="training.schedule") from None
    check_balancing(
        config.sampling,
        config.loss_weighting,
        config.gradient_aggregation,
        list(config.tasks),
        config.training.mixed_batches,
        config.training.mixed_precision,
        config.training.steps,
    )
    for name, task in config.tasks.items():
        for metric in task.metrics or []:
            METRICS.get(metric, field=f"tasks.{name}.metrics")
            try:  # a metric refuses what it cannot score with (f1 without the task's positive_label)
                METRICS.build(metric, injected={"positive_label": task.positive_label})
            except ConfigError as error:
                raise ConfigError(error.message, field=f"tasks.{name}.positive_label") from None


def check_balancing(
    sampling: MethodConfig,
    loss_weighting: MethodConfig,
    gradient: GradientConfig | None,
    task_names: list[str],
    mixed_batches: bool,
    mixed_precision: str = "no",
    total_steps: int = 1,
) -> None:
    """The sampler, loss weighting and gradient aggregator exist, accept their parameters' values, and fit
    together (shared by the config check and the Python API, api/fit.py). Each is built once here on stand-in
    task sizes, so a bad value fails before any data is read, naming its config group."""
    tasks = len(task_names)
    for field, method in (
        ("sampling", sampling),
        ("loss_weighting", loss_weighting),
        ("gradient_aggregation", gradient),
    ):
        if method is not None:
            check_numbers(method.params, field)
    SAMPLERS.get(sampling.name, field="sampling.name")
    SAMPLERS.check_params(sampling.name, sampling.params, SAMPLER_INJECTED, field="sampling")
    stand_in = {"sizes": dict.fromkeys(task_names, 1), "weights": dict.fromkeys(task_names, 1.0)}
    SAMPLERS.build(
        sampling.name, injected={**stand_in, "total_steps": total_steps}, field="sampling", **sampling.params
    )
    LOSS_WEIGHTINGS.get(loss_weighting.name, field="loss_weighting.name")
    LOSS_WEIGHTINGS.check_params(loss_weighting.name, loss_weighting.params, WEIGHTING_INJECTED, field="loss_weighting")
    named = {"task_names": list(task_names), "seed": 0}
    LOSS_WEIGHTINGS.build(
        loss_weighting.name,
        injected={**named, "loss_weights": dict.fromkeys(task_names, 1.0)},
        field="loss_weighting",
        **loss_weighting.params,
    )
    one_task_steps = getattr(SAMPLERS.get(sampling.name), "tasks_per_step", "one") == "one"
    weighting = LOSS_WEIGHTINGS.get(loss_weighting.name)
    if getattr(weighting, "needs_several_tasks", False) and one_task_steps and not mixed_batches:
        import logging

        logging.getLogger("multitune").warning(
            "loss weighting '%s' balances the tasks of a step, but sampler '%s' feeds one task per step, where it "
            "equals 'equal': use sampling.name=all_tasks or training.mixed_batches=true",
            loss_weighting.name,
            sampling.name,
        )
    if gradient is not None:
        field = "gradient_aggregation"
        factory = GRADIENT_AGGREGATORS.get(gradient.name, field=f"{field}.name")
        GRADIENT_AGGREGATORS.check_params(gradient.name, gradient.params, AGGREGATOR_INJECTED, field=field)
        GRADIENT_AGGREGATORS.build(gradient.name, injected=named, field=field, **gradient.params)
        sources = getattr(factory, "sources", ())
        if gradient.source not in sources:
            raise ConfigError(
                f"'{gradient.name}' is defined only for the {' and '.join(sources)} source", field=f"{field}.source"
            )
        all_tasks = getattr(SAMPLERS.get(sampling.name), "tasks_per_step", "one") == "all"
        if tasks > 1 and not (all_tasks or mixed_batches):
            raise ConfigError(
                f"'{gradient.name}' combines the gradients of several tasks, but sampler '{sampling.name}' "
                "feeds one task per step: use sampling.name=all_tasks or training.mixed_batches=true",
                field=f"{field}.name",
            )
        if mixed_precision == "fp16":
            raise ConfigError(
                "gradient aggregation needs bf16 or no mixed precision (fp16 loss scaling would be bypassed)",
                field="training.mixed_precision",
            )


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config file with its overrides, checked against the schema and the method registries."""
    return loading.load_config(path, overrides, check=check_methods, expand=discovered_tasks)


def load_run_config(path: str | Path, run_settings: dict[str, Any] | None = None) -> Config:
    """A run directory's saved config.yaml, checked as a new one is (`run_settings` replace keys of `run`)."""
    return loading.load_run_config(path, run_settings, check=check_methods)


def validate_config(data: dict[str, Any], file: str | None = None) -> Config:
    """A config given as a mapping, checked as a file is (a `discover` group's paths relative to the current
    folder)."""
    return loading.validate_discovering(data, Path.cwd(), file, check=check_methods, expand=discovered_tasks)


def describe_methods() -> Iterable[dict[str, str]]:
    """Every registered method with its summary, paper, gradient sources and cost (from the classes)."""
    registries = (
        ("sampler", SAMPLERS),
        ("schedule", SCHEDULES),
        ("loss weighting", LOSS_WEIGHTINGS),
        ("gradient aggregator", GRADIENT_AGGREGATORS),
        ("gradient source", GRADIENT_SOURCES),
        ("architecture", ARCHITECTURES),
        ("adapter", ADAPTERS),
        ("merge method", MERGE_METHODS),
        ("head", HEADS),
        ("metric", METRICS),
    )
    for kind, registry in registries:
        for name, summary in registry.summaries():
            factory = registry.get(name)
            yield {
                "kind": kind,
                "name": name,
                "summary": summary,
                "paper": getattr(factory, "paper", ""),
                "sources": ", ".join(getattr(factory, "sources", ())),
                "cost": getattr(factory, "cost", ""),
            }


def methods_markdown() -> str:
    """The README's methods table, generated from the registries."""
    lines = [
        "| kind | config name | what it does | paper | gradient source | extra cost |",
        "|---|---|---|---|---|---|",
    ]
    for m in describe_methods():
        cells = [m["kind"], f"`{m['name']}`", m["summary"], m["paper"], m["sources"], m["cost"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)
