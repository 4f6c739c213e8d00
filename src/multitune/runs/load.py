"""Loading a finished run (config, manifest, model, backbone) for evaluate, predict, serve and export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multitune.catalogue import load_run_config
from multitune.config import Config, TaskConfig
from multitune.core.files import WEIGHTS_FILE
from multitune.data.tasks import (
    TaskData,
    load_tasks,
)
from multitune.errors import MultitunError
from multitune.models.assemble import FROM_RUN, build_model
from multitune.models.backbone import Backbone, backbone_from_run
from multitune.models.multitask import MultiTaskModel
from multitune.models.refinement import REFINEMENT_FILE, merge_refinement
from multitune.runs.layout import FINETUNED, read_json_file, read_manifest
from multitune.training.checkpoint import load_weights


def load_run(run_dir: str | Path) -> tuple[Config, dict[str, Any], MultiTaskModel, Backbone]:
    """A finished run's config, tasks.json and model. Every file is checked as it is read: a damaged one is a
    one-line MultitunError naming it (and the task and field), never a traceback."""
    run = Path(run_dir)
    for required in ("config.yaml", "tasks.json", WEIGHTS_FILE, "backbone"):
        try:
            found = (run / required).exists()
        except OSError as error:  # a name too long, a path through a file...: not a run folder either
            raise MultitunError(f"not a run folder: {error.strerror or error}", file=str(run)) from None
        if not found:
            raise MultitunError(f"not a finished multitune run: {required} is missing", file=str(run))
    config = load_run_config(run / "config.yaml")
    manifest = read_manifest(run / "tasks.json", config.tasks)
    backbone = rebuilt_backbone(run / "backbone", config.model.kind)
    tasks = {name: task_from_manifest(name, config.tasks[name], manifest[name]) for name in config.tasks}
    model = build_model(config.model, tasks, backbone)
    try:
        load_weights(model, run / WEIGHTS_FILE)
    except RuntimeError as error:  # a tensor of another shape: a head sized by other labels than tasks.json's
        first = str(error).strip().splitlines()
        raise MultitunError(
            f"the weights do not fit the model that config.yaml and tasks.json describe: {first[-1] if first else ''}",
            file=str(run / WEIGHTS_FILE),
        ) from None
    model.eval()
    return config, manifest, model, backbone


def rebuilt_backbone(folder: Path, kind: str) -> Backbone:
    """The run's saved backbone (architecture and tokenizer). Its JSON files are checked first, so a damaged
    one is named; whatever else transformers or tokenizers cannot read is one line naming the folder."""
    for path in sorted(folder.glob("*.json")):
        if not isinstance(read_json_file(path), dict):
            raise MultitunError("not a JSON object as transformers writes (damaged?)", file=str(path))
    try:
        return FROM_RUN.get(kind, backbone_from_run)(folder)
    except MultitunError:
        raise
    except Exception as error:  # transformers and tokenizers raise many types; all mean "cannot rebuild it"
        first = str(error).strip().splitlines()
        raise MultitunError(
            f"the saved backbone cannot be rebuilt (damaged?): {type(error).__name__}: {first[0] if first else ''}",
            file=str(folder),
        ) from None


def task_from_manifest(name: str, config: TaskConfig, entry: dict[str, Any]) -> TaskData:
    return TaskData(name, config, {}, entry["labels"], entry["target_mean"], entry["target_std"])


def scored_tasks(config: Config, manifest: dict[str, dict[str, Any]]) -> dict[str, TaskData]:
    """A finished run's tasks read again to be scored: their validation and test splits, with the labels and
    target scaling the heads were trained with (tasks.json), not ones inferred again. A streamed train split
    is not read (no count, no pass for labels): scoring never needs it."""
    tasks = load_tasks(config.tasks, config.run.seed, config.model.trust_remote_code, train_pass=False)
    for name, task in tasks.items():
        saved = task_from_manifest(name, task.config, manifest[name])
        task.labels, task.target_mean, task.target_std = saved.labels, saved.target_mean, saved.target_std
    return tasks


def refined(run_dir: str | Path, task: str) -> Path | None:
    """The file of `task`'s own refined predictor in a two-stage run (a whole fine-tuned copy, or a LoRA
    refinement), or None where the shared model answers the task."""
    folder = Path(run_dir) / FINETUNED / task
    for name in (WEIGHTS_FILE, REFINEMENT_FILE):
        if (folder / name).exists():
            return folder / name
    return None


def load_refined(model: MultiTaskModel, run_dir: str | Path, task: str) -> bool:
    """Put `task`'s refined predictor into `model`: a whole copy's weights, or the shared weights with the
    task's LoRA refinement merged in. False (the model untouched) where the shared model answers the task."""
    found = refined(run_dir, task)
    if found is None:
        return False
    if found.name == WEIGHTS_FILE:
        load_weights(model, found)
    else:
        load_weights(model, Path(run_dir) / WEIGHTS_FILE)
        merge_refinement(model, found.parent)
    model.eval()
    return True
