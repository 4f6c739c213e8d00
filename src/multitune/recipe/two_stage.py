"""The two-stage schedule's second stage: one copy of the multi-task model fine-tuned per task."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multitune.config import Config
from multitune.core.files import WEIGHTS_FILE
from multitune.data.samplers import SAMPLERS
from multitune.data.streams import TaskStream
from multitune.data.tasks import (
    TaskData,
)
from multitune.evaluation.evaluate import evaluate
from multitune.recipe.components import build_balancer, optimizer_for
from multitune.recipe.prepare import Prepared
from multitune.runs.layout import FINETUNED
from multitune.training.checkpoint import load_weights, save_weights
from multitune.training.loop import LoopSettings, TrainState, Validation, train


def record_finetune(run_dir: Path) -> Callable[[dict[str, Any]], None]:
    def record(entry: dict[str, Any]) -> None:
        with (run_dir / "history.jsonl").open("a", encoding="utf-8") as history:
            history.write(json.dumps({"stage": "finetune", **entry}) + "\n")

    return record


def finetune_per_task(
    config: Config, prepared: Prepared, accelerator: Any, run_dir: Path, record: Callable[[dict[str, Any]], None]
) -> tuple[dict[str, Any], float]:
    """The second stage of `two_stage` (as MT-DNN): from the multi-task weights, a copy fine-tuned on each
    task alone, best on its own validation score, saved to RUN_DIR/finetuned/TASK; returns the copies'
    test results and their training seconds. The multi-task weights are back in place afterwards."""
    from transformers import get_linear_schedule_with_warmup

    model = prepared.model
    schedule, training = config.training.schedule, config.training
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results: dict[str, Any] = {}
    seconds = 0.0
    for name, task in prepared.tasks.items():
        model.load_state_dict(start)
        folder = run_dir / FINETUNED / name
        stage = config.model_copy(deep=True)
        stage.training.lr = schedule.finetune_lr or training.lr
        balancer = build_balancer(stage.model_copy(update={"gradient_aggregation": None}), [name])
        optimizer = optimizer_for(model, balancer.weighting, stage)
        warmup = int(training.warmup_ratio * schedule.finetune_steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, schedule.finetune_steps)
        sampler = SAMPLERS.build("round_robin", injected={"sizes": {name: 1}})
        streams = {name: TaskStream(prepared.encoded[name]["train"], f"{config.run.seed}:{name}:finetune")}
        only = {name: task}

        def validate(step: int, only: dict[str, TaskData] = only, name: str = name) -> Validation:
            result = evaluate(
                model,
                only,
                prepared.scored,
                "validation",
                training.eval_batch_size,
                accelerator.device,
                prepared.pad_id,
                progress=training.progress,
            )[name]
            signed = result["main_score"] if result["higher_is_better"] else -result["main_score"]
            record({"task": name, "step": step, "validation": {name: result["metrics"]}})
            return Validation(signed, {name: result["main_score"]}, {name: signed})

        settings = LoopSettings(
            steps=schedule.finetune_steps,
            batch_size=training.batch_size,
            seed=config.run.seed,
            pad_id=prepared.pad_id,
            max_grad_norm=training.max_grad_norm,
            eval_every=min(training.eval_every, schedule.finetune_steps),
            log_every=training.log_every,
            max_nonfinite_steps=training.max_nonfinite_steps,
            progress=training.progress,
        )
        state = train(
            model,
            streams,
            sampler,
            balancer,
            optimizer,
            scheduler,
            accelerator,
            settings,
            TrainState(),
            validate,
            lambda step, folder=folder: save_weights(model, folder / WEIGHTS_FILE),  # type: ignore[misc]
            lambda s: None,
            lambda entry, name=name: record({"task": name, **entry}),  # type: ignore[misc]
        )
        seconds += state.seconds
        load_weights(model, folder / WEIGHTS_FILE)
        results.update(
            evaluate(
                model,
                only,
                prepared.scored,
                "test",
                training.eval_batch_size,
                accelerator.device,
                prepared.pad_id,
                progress=training.progress,
            )
        )
    model.load_state_dict(start)
    return results, seconds
