"""The two-stage schedule's second stage: one copy of the multi-task model fine-tuned per task."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from multitune.config import Config
from multitune.core.files import WEIGHTS_FILE
from multitune.data.samplers import SAMPLERS
from multitune.data.streams import TaskStream
from multitune.data.tasks import (
    TaskData,
)
from multitune.evaluation.evaluate import average_main_score, evaluate
from multitune.models.refinement import add_lora, save_refinement, unload
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


def finetune_per_task(
    config: Config,
    prepared: Prepared,
    accelerator: Any,
    run_dir: Path,
    record: Callable[[dict[str, Any]], None],
    shared: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], float, dict[str, str]]:
    """The second stage of `two_stage` (as MT-DNN): from the multi-task weights, a copy fine-tuned on each
    task alone, best on its own validation score, saved to RUN_DIR/finetuned/TASK: the whole model, or with
    schedule.refine "lora" only a LoRA adapter and the task's head (models/refinement.py). With `shared` (the
    multi-task model's per-task {"validation", "test"} results) and schedule.keep "best", a copy is kept
    only where its validation score beats the shared model's; elsewhere the shared model answers the task.
    Returns the answering predictors' test results, the copies' training seconds, and per task which
    predictor answers it ("refined" or "shared"). The multi-task weights are back in place afterwards."""
    from transformers import get_linear_schedule_with_warmup

    model = prepared.model
    schedule, training = config.training.schedule, config.training
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    results: dict[str, Any] = {}
    kept: dict[str, str] = {}
    seconds = 0.0
    for name, task in prepared.tasks.items():
        model.load_state_dict(start)
        lora = add_lora(model, name, schedule.refine_r, 2 * schedule.refine_r) if schedule.refine == "lora" else None
        folder = run_dir / FINETUNED / name
        stage = training.model_copy(update={"lr": schedule.finetune_lr or training.lr})
        loss_weights = {name: config.tasks[name].loss_weight}
        balancer = build_balancer(config.loss_weighting, None, [name], loss_weights, config.run.seed)
        optimizer = build_optimizer(model, balancer.weighting, stage)
        warmup = int(training.warmup_ratio * schedule.finetune_steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, schedule.finetune_steps)
        sampler = SAMPLERS.build("round_robin", injected={"sizes": {name: 1}})
        streams = {name: TaskStream(prepared.encoded[name]["train"], f"{config.run.seed}:{name}:finetune")}
        only = {name: task}

        def score(split: str, only: dict[str, TaskData] = only) -> dict[str, dict[str, Any]]:
            return evaluate(
                model,
                only,
                prepared.scored,
                split,
                training.eval_batch_size,
                accelerator.device,
                prepared.pad_id,
                progress=training.progress,
            )

        session = Session(folder, sink=lambda entry, name=name: record({"task": name, **entry}))  # type: ignore[misc]
        settings = replace(
            loop_settings(training, config.run.seed, prepared.pad_id),
            steps=schedule.finetune_steps,
            mixed_batches=False,
            eval_every=min(training.eval_every, schedule.finetune_steps),
            checkpoint_every=None,
            early_stopping=None,
            gradient_accumulation=1,
        )
        loop = LoopParts(model, streams, sampler, balancer, optimizer, scheduler, accelerator)
        state = train(loop, settings, TrainState(), session.hooks(score, lambda: model))
        seconds += state.seconds
        if shared is not None and schedule.keep == "best":
            own_score = average_main_score({name: shared[name]["validation"]})  # signed: higher is better
            if not state.best_score > own_score:  # the shared model is as good: no copy to store
                remove_weights(folder)
                if lora is not None:
                    unload(lora, merge=False)
                results[name], kept[name] = shared[name]["test"], "shared"
                scores = {"shared": own_score, "refined": state.best_score}
                record({"task": name, "kept": "shared", "validation_scores": scores})
                continue
        session.restore_best(model)
        if lora is not None:  # keep the adapter and head only; test the merged model, as loading builds it
            save_refinement(model, lora, name, folder)
            (folder / WEIGHTS_FILE).unlink(missing_ok=True)
            unload(lora, merge=True)
        results.update(score("test"))
        kept[name] = "refined"
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad = trainable[parameter_name]
    model.load_state_dict(start)
    return results, seconds, kept
