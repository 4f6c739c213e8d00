"""FittedModel: what `fit` returns, a trained model that evaluates and predicts on in-memory inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multitune.api.backbone import collate_tensors
from multitune.api.tensors import (
    Rows,
    TensorTask,
    _describe,
    as_given,
    as_inputs,
    decode_outputs,
    schema,
)
from multitune.errors import ConfigError, DataError
from multitune.evaluation.evaluate import average_main_score, format_table, score_with
from multitune.models.multitask import MultiTaskModel
from multitune.runs.predict import held_to_range


@dataclass
class FittedModel:
    """A model trained by `fit`. `metrics` holds what a run's metrics.json holds; `history` the log entries."""

    model: MultiTaskModel
    tasks: dict[str, TensorTask]
    device: torch.device
    batch_size: int = 256
    length: int = 1  # feature positions per row: 1 for [B, H] features
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    refined: dict[str, MultiTaskModel] = field(default_factory=dict)  # two_stage: the tasks' own predictors

    def evaluate(self, split: str = "test", only: str | None = None) -> dict[str, Any]:
        """{"tasks": {task: metrics entry}, "average_main_score": ...}, as in metrics.json; a task without
        `split` is scored on its validation split (its entry's "split" says so). `only`: that task alone."""
        if split not in ("train", "validation", "test"):
            raise ConfigError(f"unknown split '{split}'; choose from: train, validation, test", field="split")
        results = {}
        for name, task in self.tasks.items():
            if only is not None and name != only:
                continue
            use = split if split in task.splits else "validation"
            rows = task.splits[use]
            predictions = [p["prediction"] for p in self._predict(task, rows)]
            results[name] = score_with(
                task.metrics, task.main_metric, task.spec.positive_label, predictions, rows.references, use
            )
        return {"tasks": results, "average_main_score": average_main_score(results)}

    def predict(self, task: str, inputs: Any) -> list[dict[str, Any]]:
        """One dict per input row: {"prediction": ...}, plus "probabilities" per label for classification; a
        regression prediction is held to the range of the training targets, with the model's own value in "raw"."""
        if task not in self.tasks:
            raise ConfigError(f"no task '{task}' in this model (tasks: {', '.join(self.tasks)})", field="task")
        prepared = self.tasks[task]
        converted = as_inputs(inputs, f"prediction inputs for task '{task}'")
        expected = schema(prepared.splits["train"].inputs)
        if schema(converted) != expected:
            raise DataError(
                f"prediction inputs for task '{task}': rows of {_describe(schema(converted))}, "
                f"but the model was trained on {_describe(expected)}"
            )
        predictions = as_given(prepared, self._predict(prepared, Rows(converted, None, [])))
        if prepared.target_range is not None:  # as predict and serve: held to the training targets' range
            predictions = [held_to_range(p, prepared.target_range) for p in predictions]
        return predictions

    def table(self, split: str = "test") -> str:
        """The printed metrics table of `evaluate(split)`."""
        result = self.evaluate(split)
        return format_table(result["tasks"], result["average_main_score"])

    @torch.no_grad()
    def _predict(self, task: TensorTask, rows: Rows) -> list[dict[str, Any]]:
        name = task.spec.name
        model = self.refined.get(name, self.model)  # a two-stage task's refined predictor, if it kept one
        was_training = model.training
        model.eval()
        outputs = []
        for start in range(0, len(rows), self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, len(rows)))
            batch = collate_tensors({name: (rows, index)}, self.length).to(self.device)
            outputs.append(model(batch)[name].float().cpu())
        model.train(was_training)
        return decode_outputs(task, torch.cat(outputs), rows)
