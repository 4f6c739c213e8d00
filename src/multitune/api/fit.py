"""Any PyTorch backbone: your nn.Module, tasks as in-memory arrays, trained by multitune's own machinery.

`fit(backbone, tasks, ...)` converts the in-memory tensors into tasks and runs the training session of the
YAML recipe (recipe/session.py: the same loop, validation rule, best weights, history and metrics), with the
samplers, loss weightings, gradient aggregators, heads and architectures from their registries. Only the
data differ: rows are indices into tensors, and a batch is a TensorBatch of those tensors (no tokenizer, no
padding).

The backbone maps a batch of inputs (one tensor, passed positionally, or a dict of tensors, passed as
keywords) to features [B, H], or [B, L, H] for token-level tasks; sequence-level tasks mean-pool [B, L, H]
over L (over `attention_mask` if the inputs carry one). Every task feeds the same backbone, so every task's
inputs have the same shape per row.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from multitune.api.backbone import FeatureBackbone, collate_tensors, probe_backbone
from multitune.api.fitted import FittedModel
from multitune.api.tensors import (
    INPUT,
    MASK,
    Task,
    TensorTask,
    _describe,
    prepare_task,
    schema,
)
from multitune.balancing.backward import Balancer
from multitune.catalogue import check_balancing
from multitune.config import (
    RECIPES,
    EarlyStopping,
    GradientConfig,
    MethodConfig,
    TrainingConfig,
    check_numbers,
    check_refine_layers,
)
from multitune.data.collate import Batch
from multitune.data.samplers import TaskSampler
from multitune.data.streams import TaskStream
from multitune.errors import ConfigError, DataError
from multitune.evaluation.evaluate import average_main_score
from multitune.models.architectures import ARCHITECTURE_INJECTED, ARCHITECTURES
from multitune.models.heads import HEADS
from multitune.models.multitask import MultiTaskModel
from multitune.recipe.components import (
    build_balancer,
    build_optimizer,
    build_sampler,
    require_shared_parameters,
    still_loss_weights,
)
from multitune.recipe.launch import fresh_accelerator
from multitune.recipe.session import Session, loop_settings
from multitune.recipe.two_stage import Refinement, record_finetune, refine_per_task, refinement_targets
from multitune.runs.layout import create_run_dir, manifest_entry
from multitune.training.loop import LoopParts, TrainState, train

log = logging.getLogger(__name__)

# --- checking and converting the user's data ---------------------------------------------------------


def _method(spec: str | Mapping[str, Any], kind: type[MethodConfig], field: str) -> MethodConfig:
    """`"pcgrad"` or `{"name": "pcgrad", "source": "parameters", ...}` as the config's own method group."""
    data = {"name": spec} if isinstance(spec, str) else dict(spec)
    return validated(kind, data, field)


M = TypeVar("M", bound=BaseModel)


def validated(kind: type[M], data: dict[str, Any], field: str | None = None) -> M:
    """A config group from keyword values; a bad value is a ConfigError naming the argument."""
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        where = ".".join(part for part in (field, key) if part) or None
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{message} (got {first.get('input')!r})", field=where) from None


# --- the fitted model --------------------------------------------------------------------------------


# --- fit ---------------------------------------------------------------------------------------------


def fit(
    backbone: nn.Module,
    tasks: Sequence[Task],
    *,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-3,
    head_lr: float | None = None,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.0,
    max_grad_norm: float | None = 1.0,
    sampling: str | Mapping[str, Any] = "temperature",
    loss_weighting: str | Mapping[str, Any] = "equal",
    gradient_aggregation: str | Mapping[str, Any] | None = None,
    mixed_batches: bool = False,
    architecture: str | Mapping[str, Any] = "hard",
    pooling: str = "mean",
    dropout: float = 0.1,
    eval_every: int = 200,
    eval_batch_size: int = 256,
    early_stopping: EarlyStopping | None = None,
    schedule: Mapping[str, Any] | None = None,
    recipe: str | None = None,
    seed: int = 13,
    cpu: bool = False,
    output_dir: str | Path | None = None,
    name: str = "run",
    progress: bool = True,
    log_every: int = 10,
) -> FittedModel:
    """Train `backbone` with one head per task, jointly, and return the model with the best validation score.

    Methods are named as in a config: a registry name, or a dict of the name and its parameters, e.g.
    `sampling={"name": "temperature", "temperature": 2.0}`, `gradient_aggregation={"name": "pcgrad",
    "source": "parameters"}` (gradient aggregation needs several tasks per step: the `all_tasks` sampler or
    `mixed_batches=True`). `schedule` is the config's `training.schedule` group, `joint` or `two_stage`
    (then each task is refined alone and answered by its refined predictor: `{"name": "two_stage",
    "refine": "lora", "keep": "best"}`). `recipe="recommended"` fills in the recommended recipe's early
    stopping and schedule where those arguments are not given (config/recipes.py). Nothing is written
    unless `output_dir` is given: then a new run directory there holds model.safetensors (the best
    weights), metrics.json, tasks.json and history.jsonl (and finetuned/TASK for a two-stage refinement).
    """
    # every check on the user's input first: nothing is trained or written before they pass
    names = _checked_inputs(backbone, tasks)
    # as the YAML route: every float finite and within float32's range (an inf lr would train on NaN weights)
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose from: {', '.join(RECIPES)}", field="recipe")
    given = RECIPES[recipe]["training"] if recipe else {}
    stopping = asdict(early_stopping) if is_dataclass(early_stopping) else early_stopping  # type: ignore[arg-type]
    stopping = given.get("early_stopping") if stopping is None else stopping
    schedule = given.get("schedule") if schedule is None else schedule
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "head_lr": head_lr,
        "weight_decay": weight_decay,
        "warmup_ratio": warmup_ratio,
        "max_grad_norm": max_grad_norm,
        "eval_every": eval_every,
        "eval_batch_size": eval_batch_size,
        "mixed_batches": mixed_batches,
        "log_every": log_every,
        "progress": progress,
        "checkpoint_every": None,
        "early_stopping": stopping,
        "schedule": dict(schedule) if isinstance(schedule, Mapping) else schedule or {"name": "joint"},
    }
    methods_given = {
        "sampling": sampling,
        "loss_weighting": loss_weighting,
        "gradient_aggregation": gradient_aggregation,
        "architecture": architecture,
    }
    for key, value in {**settings, "dropout": dropout, "seed": seed, **methods_given}.items():
        check_numbers(dict(value) if isinstance(value, Mapping) else value, key)
    for given in tasks:
        for key in ("sampling_weight", "loss_weight", "validation_fraction"):
            check_numbers(getattr(given, key), f"tasks.{given.name}.{key}")
    training = validated(TrainingConfig, settings)
    if training.schedule.name not in ("joint", "two_stage"):
        raise ConfigError("fit trains the joint or the two_stage schedule", field="schedule.name")
    check_refine_layers(training.schedule)
    methods = _checked_methods(
        sampling, loss_weighting, gradient_aggregation, architecture, pooling, dropout, names, training
    )
    prepared = {task.name: prepare_task(task, seed) for task in tasks}
    model, length = _fit_model(backbone, prepared, methods.architecture, pooling, dropout, seed)
    refinement_targets(model, training.schedule)  # a refinement the backbone cannot take fails before training
    sizes = {name: len(task.splits["train"]) for name, task in prepared.items()}
    sampler = build_sampler(methods.sampling, sizes, {n: t.spec.sampling_weight for n, t in prepared.items()}, steps)
    loss_weights = {n: t.spec.loss_weight for n, t in prepared.items()}
    balancer = build_balancer(methods.loss_weighting, methods.gradient, list(prepared), loss_weights, seed)
    require_shared_parameters(model, balancer)
    if (still := still_loss_weights(balancer.weighting, training)) is not None:
        log.warning(still)
    run_dir = create_run_dir(str(output_dir), name) if output_dir is not None else None
    return _train_fitted(model, prepared, length, sampler, balancer, methods, training, seed, cpu, run_dir)


def _checked_inputs(backbone: Any, tasks: Any) -> list[str]:
    """The backbone is a module and the tasks a non-empty list of uniquely named Tasks; their names."""
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"the backbone must be a torch.nn.Module, not {type(backbone).__name__}", field="backbone")
    if isinstance(tasks, Task) or not tasks or not all(isinstance(t, Task) for t in tasks):
        raise ConfigError("tasks: give a non-empty list of multitune.Task", field="tasks")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names}", field="tasks")
    return names


@dataclass
class FitMethods:
    """The methods fit's arguments name, as the config's method groups."""

    sampling: MethodConfig
    loss_weighting: MethodConfig
    gradient: GradientConfig | None
    architecture: MethodConfig


def _checked_methods(
    sampling: str | Mapping[str, Any],
    loss_weighting: str | Mapping[str, Any],
    gradient_aggregation: str | Mapping[str, Any] | None,
    architecture: str | Mapping[str, Any],
    pooling: str,
    dropout: float,
    names: list[str],
    training: TrainingConfig,
) -> FitMethods:
    """Each method exists, takes its parameters and fits the others, as the config check decides."""
    if pooling not in ("mean", "cls"):
        raise ConfigError(f"pooling must be 'mean' or 'cls', not {pooling!r}", field="pooling")
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}", field="dropout")
    sampling_method = _method(sampling, MethodConfig, "sampling")
    weighting_method = _method(loss_weighting, MethodConfig, "loss_weighting")
    gradient = (
        None if gradient_aggregation is None else _method(gradient_aggregation, GradientConfig, "gradient_aggregation")
    )
    assert gradient is None or isinstance(gradient, GradientConfig)
    check_balancing(
        sampling_method, weighting_method, gradient, names, training.mixed_batches, total_steps=training.steps
    )
    shape = _method(architecture, MethodConfig, "architecture")
    ARCHITECTURES.get(shape.name, field="architecture.name")
    ARCHITECTURES.check_params(shape.name, shape.params, ARCHITECTURE_INJECTED, field="architecture")
    return FitMethods(sampling_method, weighting_method, gradient, shape)


def _fit_model(
    backbone: nn.Module,
    prepared: dict[str, TensorTask],
    shape: MethodConfig,
    pooling: str,
    dropout: float,
    seed: int,
) -> tuple[MultiTaskModel, int]:
    """The multi-task model around the user's backbone, and the feature positions per row (1 for [B, H]).
    Every task's rows must have the same inputs, and a token task's features one position per label."""
    first = next(iter(prepared.values()))
    expected = schema(first.splits["train"].inputs)
    for task in prepared.values():
        for split, rows in task.splits.items():
            if schema(rows.inputs) != expected:
                raise DataError(
                    f"task '{task.spec.name}' {split} inputs: rows of {_describe(schema(rows.inputs))}, but task "
                    f"'{first.spec.name}' train has {_describe(expected)}: one backbone reads every task's rows"
                )
    positional = INPUT in expected
    hidden_size, length = probe_backbone(backbone, first, positional)
    for task in prepared.values():
        if task.spec.type == "token_classification":
            width = task.splits["train"].labels.shape[1]  # type: ignore[union-attr]
            if length == 1 or width != length:
                raise DataError(
                    f"task '{task.spec.name}' is token-level: the backbone must return [B, L, H] features with "
                    f"L = {width} (the labels' positions), but it returns {length} position(s) per row"
                )
    torch.manual_seed(seed)  # heads start the same whatever the backbone's construction consumed
    heads = {
        name: HEADS.build(
            task.spec.type, hidden_size=hidden_size, num_labels=len(task.labels or [None]), dropout=dropout
        )
        for name, task in prepared.items()
    }
    wrapped = FeatureBackbone(backbone, positional, MASK in expected, hidden_size, length)
    injected = {"backbone": wrapped, "heads": heads, "pooling": pooling, "hidden_size": hidden_size}
    return ARCHITECTURES.build(shape.name, injected=injected, **shape.params), length


def _train_fitted(
    model: MultiTaskModel,
    prepared: dict[str, TensorTask],
    length: int,
    sampler: TaskSampler,
    balancer: Balancer,
    methods: FitMethods,
    training: TrainingConfig,
    seed: int,
    cpu: bool,
    run_dir: Path | None,
) -> FittedModel:
    """The training session (recipe/session.py, as the YAML recipe runs it) on in-memory tensors."""
    from transformers import get_linear_schedule_with_warmup

    accelerator = fresh_accelerator(training.mixed_precision, cpu=cpu)
    optimizer = build_optimizer(model, balancer.weighting, training)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(training.warmup_ratio * training.steps), training.steps)
    prepared_model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if isinstance(balancer.weighting, nn.Module):
        balancer.weighting.to(accelerator.device)
    streams = {
        name: TaskStream(list(range(len(task.splits["train"]))), f"{seed}:{name}:stream")
        for name, task in prepared.items()
    }
    train_rows = {name: task.splits["train"] for name, task in prepared.items()}
    fitted = FittedModel(model, prepared, accelerator.device, training.eval_batch_size, length, run_dir=run_dir)

    def collate_rows(by_task: dict[str, list[int]], pad_id: int) -> Batch:
        return collate_tensors({n: (train_rows[n], torch.tensor(rows)) for n, rows in by_task.items()}, length)

    session = Session(run_dir, keep_entries=True)
    loop = LoopParts(
        prepared_model, streams, sampler, balancer, optimizer, scheduler, accelerator, collate_rows=collate_rows
    )
    hooks = session.hooks(lambda split: fitted.evaluate(split)["tasks"], lambda: model)
    session.open()
    try:
        state = train(loop, loop_settings(training, seed, pad_id=0), TrainState(), hooks)
    finally:
        session.close()
    fitted.history = session.entries
    session.restore_best(model)
    results = fitted.evaluate("test")["tasks"]
    stages: dict[str, Any] = {}
    if training.schedule.name == "two_stage":
        results, stages = _refine(fitted, methods.loss_weighting, training, seed, accelerator, collate_rows, results)
    fitted.metrics = session.metrics(results, state, balancer, model, accelerator.device, stages)
    session.write("tasks.json", _manifest(prepared))
    session.write("metrics.json", fitted.metrics)
    if run_dir is not None:
        print(f"saved to {run_dir}", file=sys.stderr)
    return fitted


def _refine(
    fitted: FittedModel,
    weighting: MethodConfig,
    training: TrainingConfig,
    seed: int,
    accelerator: Any,
    collate_rows: Any,
    results: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two-stage schedule's refinement on tensors (recipe/two_stage.py, as the YAML recipe runs it): the
    answering predictors' test results and the stages' entries of metrics.json."""
    model, tasks, run_dir = fitted.model, fitted.tasks, fitted.run_dir
    shared = fitted.evaluate("validation")["tasks"]
    stages = {"multi_task_stage": {"tasks": results, "average_main_score": average_main_score(results)}}
    parts = Refinement(
        model,
        list(tasks),
        training.schedule,
        training,
        weighting,
        {n: t.spec.loss_weight for n, t in tasks.items()},
        seed,
        accelerator,
        0,
        lambda name: TaskStream(list(range(len(tasks[name].splits["train"]))), f"{seed}:{name}:finetune"),
        lambda name, split: {name: fitted.evaluate(split, only=name)["tasks"][name]},
        collate_rows,
        lambda name, refined: fitted.refined.__setitem__(name, copy.deepcopy(refined).eval()),
    )

    def in_memory(entry: dict[str, Any]) -> None:
        fitted.history.append({"stage": "finetune", **entry})

    record = record_finetune(run_dir) if run_dir is not None else in_memory
    both = {n: {"validation": shared[n], "test": results[n]} for n in results}
    results, seconds, kept = refine_per_task(parts, run_dir, record, both)
    return results, stages | {"finetune_seconds": round(seconds, 2), "answered_by": kept}


def _manifest(tasks: dict[str, TensorTask]) -> dict[str, Any]:
    return {
        name: manifest_entry(
            task.spec.type,
            task.labels,
            task.target_mean,
            task.target_std,
            task.target_range,
            {split: len(rows) for split, rows in task.splits.items()},
        )
        for name, task in tasks.items()
    }
