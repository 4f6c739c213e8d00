"""`multitune evaluate`: score a finished run again on one of its splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from multitune.core.files import WEIGHTS_FILE, write_json
from multitune.data.encoding import encode_splits
from multitune.data.tasks import label_field_name
from multitune.data.windows import scoring_rows
from multitune.errors import ConfigError
from multitune.evaluation.evaluate import PRINTED_TASKS, average_main_score, evaluate, format_table
from multitune.runs.layout import FINETUNED
from multitune.runs.load import load_refined, load_run, scored_tasks
from multitune.training.checkpoint import load_weights


def evaluate_run(run_dir: str | Path, split: str = "test") -> dict[str, Any]:
    config, manifest, model, backbone = load_run(run_dir)
    tasks = scored_tasks(config, manifest)
    streamed = [name for name, task in tasks.items() if task.stream is not None]
    if split == "train" and streamed:
        raise ConfigError(
            f"task '{streamed[0]}' streams its train split, which is never held whole: score validation or test",
            field="--split",
        )
    for name, task in tasks.items():
        known = set(task.labels or [])
        for example in task.splits.get(split, task.splits["validation"]):
            for label in example.label if isinstance(example.label, tuple) else (example.label,):
                if task.labels is not None and str(label) not in known:
                    raise example.error(
                        f"unknown label '{label}' for task '{name}' as trained", label_field_name(task.config)
                    )
    encoded = encode_splits(tasks, backbone.tokenizer, config.model.max_length, config.model.kind == "seq2seq")
    scored = scoring_rows(tasks, encoded, backbone.tokenizer, config.model.max_length)
    device = torch.device("cpu")
    pad = backbone.pad_id
    finetuned = Path(run_dir) / FINETUNED
    size, show = config.training.eval_batch_size, config.training.progress
    if finetuned.is_dir():  # a two-stage run: each task is answered by its own fine-tuned copy, if it has one
        results = {}
        for name in tasks:
            if not load_refined(model, run_dir, name):
                load_weights(model, Path(run_dir) / WEIGHTS_FILE)  # the shared model answers this task
            results.update(evaluate(model, {name: tasks[name]}, scored, split, size, device, pad, progress=show))
    else:
        results = evaluate(model, tasks, scored, split, size, device, pad, progress=show)
    average = average_main_score(results)
    out = {"tasks": results, "average_main_score": average}
    write_json(Path(run_dir) / f"evaluation_{split}.json", out)
    print(format_table(results, average, PRINTED_TASKS, str(Path(run_dir) / f"evaluation_{split}.json")))
    return out
