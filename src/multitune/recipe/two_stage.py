"""The two-stage schedule's second stage: one copy of the multi-task model refined per task, for the YAML
recipe and for `multitune.fit` alike."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from multitune.config import Config, EarlyStopping, MethodConfig, ScheduleConfig, TrainingConfig
from multitune.data.collate import collate
from multitune.data.samplers import SAMPLERS
from multitune.data.streams import RowStream, TaskStream
from multitune.evaluation.evaluate import average_main_score, evaluate
from multitune.models.multitask import MultiTaskModel
from multitune.models.refinement import add_lora, lora_targets, save_refinement, unload
from multitune.recipe.components import build_balancer, build_optimizer
from multitune.recipe.prepare import Prepared
from multitune.recipe.session import Session, loop_settings
from multitune.runs.layout import FINETUNED
from multitune.training.checkpoint import remove_weights
from multitune.training.loop import LoopParts, TrainState, train


def record_finetune(run_dir: Path) -> Callable[[dict[str, Any]], None]:
    def record(entry: dict[str, Any]) -> None:
        with (run_dir / "history.jsonl").open("a", encoding="utf-8") as history:
            history.write(json.dumps({"stage": "finetune", **entry}) + "\n")

    return record


@dataclass
class Refinement:
    """What the two-stage refinement needs from the route that trained the shared model: the YAML recipe
    (`finetune_per_task`) or `multitune.fit`, whose rows are in-memory tensors."""

    model: MultiTaskModel
    tasks: list[str]
    schedule: ScheduleConfig
    training: TrainingConfig
    loss_weighting: MethodConfig
    loss_weights: dict[str, float]
    seed: int
    accelerator: Any
    pad_id: int
    stream: Callable[[str], RowStream[Any]]  # a task's training rows
    score: Callable[[str, str], dict[str, dict[str, Any]]]  # (task, split) -> {task: its results}
    collate_rows: Callable[[dict[str, list[Any]], int], Any] = collate
    keep: Callable[[str, MultiTaskModel], None] | None = None  # sees each kept refined predictor (merged)


def refinement_targets(model: MultiTaskModel, schedule: ScheduleConfig) -> Any:
    """What a LoRA refinement of `model` adapts (`lora_targets`), or None for a whole-copy refinement or another
    schedule. Both routes call it before training, so a refine_layers the backbone cannot take fails first."""
    if schedule.name != "two_stage" or schedule.refine != "lora":
        return None
    return lora_targets(model, schedule.refine_layers)


def finetune_per_task(
    config: Config,
    prepared: Prepared,
    accelerator: Any,
    run_dir: Path,
    record: Callable[[dict[str, Any]], None],
    shared: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], float, dict[str, str]]:
    """The YAML recipe's refinement (see `refine_per_task`), on the prepared token rows."""

    def score(name: str, split: str) -> dict[str, dict[str, Any]]:
        only = {name: prepared.tasks[name]}
        size, show = config.training.eval_batch_size, config.training.progress
        return evaluate(
            prepared.model, only, prepared.scored, split, size, accelerator.device, prepared.pad_id, progress=show
        )

    def stream(name: str) -> RowStream[Any]:
        if prepared.tasks[name].stream is not None:
            return prepared.training_stream(name, f"{config.run.seed}:{name}:finetune")
        return TaskStream(prepared.encoded[name]["train"], f"{config.run.seed}:{name}:finetune")

    parts = Refinement(
        prepared.model,
        list(prepared.tasks),
        config.training.schedule,
        config.training,
        config.loss_weighting,
        {name: task.loss_weight for name, task in config.tasks.items()},
        config.run.seed,
        accelerator,
        prepared.pad_id,
        stream,
        score,
    )
    return refine_per_task(parts, run_dir, record, shared)


def refine_per_task(
    parts: Refinement,
    run_dir: Path | None,
    record: Callable[[dict[str, Any]], None],
    shared: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], float, dict[str, str]]:
    """The second stage of `two_stage` (as MT-DNN): from the multi-task weights, a copy fine-tuned on each task
    alone, best on its own validation score, saved to RUN_DIR/finetuned/TASK (in memory without a run
    directory): the whole model, or with schedule.refine "lora" only a LoRA adapter (of the top
    schedule.refine_layers blocks, or of every projection) and the task's head (models/refinement.py). Each
    copy trains schedule.finetune_steps, or with schedule.finetune_patience until its validation score stalls
    for that many validations (finetune_steps at most). With `shared` (the multi-
    task model's per-task {"validation", "test"} results) and schedule.keep "best", a copy is kept only where
    its validation score beats the shared model's; elsewhere the shared model answers the task. Returns the
    answering predictors' test results, the copies' training seconds, and per task which predictor answers it
    ("refined" or "shared"). The multi-task weights are back in place afterwards."""
    from transformers import get_linear_schedule_with_warmup

    model, schedule, training = parts.model, parts.schedule, parts.training
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    lora_rank = schedule.refine_r if schedule.refine == "lora" else None
    targets = refinement_targets(model, schedule)  # the same projections for every task
    results: dict[str, Any] = {}
    kept: dict[str, str] = {}
    seconds = 0.0
    for name in parts.tasks:
        model.load_state_dict(start)
        lora = None if lora_rank is None else add_lora(model, name, lora_rank, 2 * lora_rank, targets)
        folder = None if run_dir is None else run_dir / FINETUNED / name
        stage = training.model_copy(update={"lr": schedule.finetune_lr or training.lr})
        balancer = build_balancer(parts.loss_weighting, None, [name], {name: parts.loss_weights[name]}, parts.seed)
        optimizer = build_optimizer(model, balancer.weighting, stage)
        warmup = int(training.warmup_ratio * schedule.finetune_steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, schedule.finetune_steps)
        sampler = SAMPLERS.build("round_robin", injected={"sizes": {name: 1}})
        # a LoRA refinement keeps its best weights in memory: only the adapter and head reach the disk, once
        kept_in = folder if lora is None else None
        session = Session(kept_in, sink=lambda entry, name=name: record({"task": name, **entry}))  # type: ignore[misc]
        settings = replace(
            loop_settings(training, parts.seed, parts.pad_id),
            steps=schedule.finetune_steps,
            mixed_batches=False,
            eval_every=min(training.eval_every, schedule.finetune_steps),
            checkpoint_every=None,
            early_stopping=None if schedule.finetune_patience is None else EarlyStopping(schedule.finetune_patience),
            gradient_accumulation=1,
        )
        streams = {name: parts.stream(name)}
        loop = LoopParts(
            model, streams, sampler, balancer, optimizer, scheduler, parts.accelerator, collate_rows=parts.collate_rows
        )
        hooks = session.hooks(lambda split, name=name: parts.score(name, split), lambda: model)  # type: ignore[misc]
        state = train(loop, settings, TrainState(), hooks)
        seconds += state.seconds
        if shared is not None and schedule.keep == "best":
            own_score = average_main_score({name: shared[name]["validation"]})  # signed: higher is better
            if not state.best_score > own_score:  # the shared model is as good: no copy to store
                if folder is not None:
                    remove_weights(folder)
                if lora is not None:
                    unload(lora, merge=False)
                results[name], kept[name] = shared[name]["test"], "shared"
                scores = {"shared": own_score, "refined": state.best_score}
                record({"task": name, "kept": "shared", "validation_scores": scores})
                continue
        session.restore_best(model)
        if lora is not None:  # keep the adapter and head only; test the merged model, as loading builds it
            if folder is not None:
                save_refinement(model, lora, name, folder)
            unload(lora, merge=True)
        results.update(parts.score(name, "test"))
        kept[name] = "refined"
        if parts.keep is not None:
            parts.keep(name, model)
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad = trainable[parameter_name]
    model.load_state_dict(start)
    return results, seconds, kept
