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

import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn

from multitune.balancing.backward import Balancer
from multitune.catalogue import check_balancing
from multitune.config import (
    DEFAULT_METRICS,
    NAME_PATTERN,
    EarlyStopping,
    GradientConfig,
    MethodConfig,
    TrainingConfig,
    check_numbers,
)
from multitune.data.collate import Batch, TaskRows
from multitune.data.samplers import TaskSampler
from multitune.data.streams import TaskStream
from multitune.data.tasks import MAX_TARGET
from multitune.data.tokens import IGNORE_INDEX
from multitune.errors import ConfigError, DataError
from multitune.evaluation.evaluate import average_main_score, class_prediction, format_table, score_with
from multitune.evaluation.metrics import build_metrics
from multitune.models.architectures import ARCHITECTURE_INJECTED, ARCHITECTURES
from multitune.models.heads import HEADS
from multitune.models.multitask import MultiTaskModel
from multitune.recipe.components import build_balancer, build_optimizer, build_sampler, require_shared_parameters
from multitune.recipe.session import Session, loop_settings
from multitune.runs.layout import create_run_dir, manifest_entry
from multitune.runs.predict import held_to_range
from multitune.training.loop import LoopParts, TrainState, train

TASK_TYPES = ("classification", "regression", "token_classification")
INPUT = "inputs"  # the batch key of a plain tensor input (passed to the backbone positionally)
MASK = "attention_mask"  # what MultiTaskModel pools over; ones unless the inputs carry their own

Split = tuple[Any, Any]  # (inputs, labels): inputs an array / tensor or a dict of them, labels an array / list


@dataclass
class Task:
    """One task: a type, its splits as (inputs, labels) pairs, and how it is scored.

    Classification labels are class ids 0..C-1 or label strings; `labels` names the classes (or gives their
    number); by default the distinct strings of train, sorted, or the ids 0..max. `predict` answers in the
    labels' own terms: class ids (of their type) when the labels were ids and `labels` named no classes,
    else class names. Regression labels are numbers. Token-level labels are class ids [N, L],
    IGNORE_INDEX (-100) where a position has no label.
    Without `validation`, a seeded `validation_fraction` of train is held out for picking the best step.
    """

    name: str
    type: str
    train: Split
    validation: Split | None = None
    test: Split | None = None
    labels: Sequence[str] | int | None = None
    metrics: Sequence[str] | None = None  # default by type (config.DEFAULT_METRICS); the first is the main one
    main_metric: str | None = None
    positive_label: str | None = None  # for the `f1` metric
    normalize_targets: bool = True  # regression: train on standardised targets
    sampling_weight: float = 1.0
    loss_weight: float = 1.0  # used by the `static` loss weighting
    validation_fraction: float = 0.1


@dataclass
class Rows:
    """One split of a task as tensors."""

    inputs: dict[str, Tensor]  # key -> [N, ...]
    labels: Tensor | None  # what the head trains on: class ids [N], standardised targets [N], tag ids [N, L]
    references: list[Any]  # what the metrics compare predictions with: label names, targets, tag lists

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


@dataclass
class TensorTask:
    """A checked task: its splits as tensors, its label vocabulary and target scaling, its metrics."""

    spec: Task
    splits: dict[str, Rows]
    labels: list[str] | None = None
    values: list[Any] | None = None  # what predict returns for each class: the user's own ids, when they gave ids
    target_mean: float = 0.0
    target_std: float = 1.0
    target_range: tuple[float, float] | None = None  # regression: the smallest and largest training target
    metrics: list[str] = field(default_factory=list)
    main_metric: str = ""


@dataclass
class TensorBatch(Batch):
    """A Batch of in-memory tensors: rows are not padded, so one task's part is a plain slice of rows."""

    def to(self, device: torch.device | str) -> TensorBatch:
        moved = super().to(device)
        return TensorBatch(moved.inputs, moved.tasks)

    def only(self, name: str) -> TensorBatch:
        part = self.tasks[name]
        inputs = {key: value[part.rows] for key, value in self.inputs.items()}
        return TensorBatch(inputs, {name: TaskRows(slice(0, inputs[MASK].shape[0]), part.labels)})

    @property
    def size(self) -> int:
        return int(self.inputs[MASK].shape[0])


@dataclass
class Features:
    last_hidden_state: Tensor  # [B, L, H]


class FeatureBackbone(nn.Module):
    """Your module behind the interface MultiTaskModel reads: batch inputs -> `.last_hidden_state` [B, L, H]
    (features [B, H] become [B, 1, H], which mean pooling over the one position leaves as they are)."""

    def __init__(self, module: nn.Module, positional: bool, own_mask: bool, hidden_size: int, length: int) -> None:
        super().__init__()
        self.module = module
        self.positional, self.own_mask = positional, own_mask
        self.hidden_size, self.length = hidden_size, length

    def forward(self, **inputs: Tensor) -> Features:
        rows = int(inputs[MASK].shape[0])
        given = inputs if self.own_mask else {k: v for k, v in inputs.items() if k != MASK}
        features = self.module(given[INPUT]) if self.positional else self.module(**given)
        return Features(checked_features(features, rows, self.hidden_size, self.length))


def checked_features(features: Any, rows: int, hidden_size: int | None = None, length: int | None = None) -> Tensor:
    """The backbone's output as [B, L, H], or a DataError saying what is wrong with it."""
    if not isinstance(features, Tensor):
        raise DataError(f"the backbone must return a tensor of features [B, H] or [B, L, H], not {type(features)}")
    shape = tuple(features.shape)
    if features.ndim not in (2, 3) or shape[0] != rows or not features.is_floating_point():
        raise DataError(
            f"the backbone returned features of shape {list(shape)} ({features.dtype}) for {rows} rows; "
            "expected floating-point [B, H] (one vector per row) or [B, L, H] (token-level)"
        )
    hidden = features if features.ndim == 3 else features.unsqueeze(1)
    if hidden_size is not None and (hidden.shape[2] != hidden_size or hidden.shape[1] != length):
        raise DataError(
            f"the backbone returned features of shape {list(shape)}, but [B, {hidden_size}]"
            f"{'' if length == 1 else f' x {length} positions'} on the first batch: features must keep one shape"
        )
    return hidden


# --- checking and converting the user's data ---------------------------------------------------------


def as_tensor(value: Any, what: str) -> Tensor:
    """An array, list or tensor as a tensor with one row per example; floating point becomes float32."""
    if isinstance(value, Tensor):
        tensor = value.detach().cpu()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as error:
            raise DataError(f"{what}: not a numeric array ({error})") from None
    if tensor.ndim == 0:
        raise DataError(f"{what}: expected one row per example, got a single value")
    return tensor.float() if tensor.is_floating_point() else tensor


def as_inputs(value: Any, what: str) -> dict[str, Tensor]:
    """Inputs as a dict of tensors with one row count: one tensor under INPUT, or the user's own keys."""
    if isinstance(value, Mapping):
        if not value:
            raise DataError(f"{what}: an empty dict of inputs")
        inputs = {str(key): as_tensor(v, f"{what} '{key}'") for key, v in value.items()}
        if INPUT in inputs:
            raise DataError(f"{what}: '{INPUT}' is reserved; name the input otherwise")
    else:
        inputs = {INPUT: as_tensor(value, what)}
    counts = {key: int(v.shape[0]) for key, v in inputs.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{what}: the inputs have different numbers of rows: {counts}")
    if MASK in inputs and inputs[MASK].ndim != 2:
        raise DataError(f"{what}: '{MASK}' must be [N, L], got {list(inputs[MASK].shape)}")
    return inputs


def schema(inputs: dict[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each input's shape per row and dtype: what one backbone needs to be the same for every task."""
    return {key: (tuple(value.shape[1:]), value.dtype) for key, value in inputs.items()}


def as_array(value: Any, what: str) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
    if array.ndim == 0:
        raise DataError(f"{what}: expected one label per row, got a single value")
    return array


def _is_text(array: np.ndarray) -> bool:
    return array.dtype.kind in "USO"


def class_ids(array: np.ndarray, names: list[str], what: str, ignore: bool = False) -> Tensor:
    """Label strings or class ids -> class ids in range (IGNORE_INDEX kept where `ignore`)."""
    if _is_text(array):
        index = {name: i for i, name in enumerate(names)}
        flat = [str(v) for v in array.reshape(-1)]
        unknown = next((v for v in flat if v not in index), None)
        if unknown is not None:
            raise DataError(f"{what}: unknown label '{unknown}' (labels: {', '.join(names)})")
        return torch.tensor([index[v] for v in flat], dtype=torch.long).view(array.shape)
    if array.dtype.kind not in "iubf" or (
        array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array % 1 == 0))
    ):
        raise DataError(f"{what}: class labels must be whole numbers or strings, got {array.dtype}")
    ids = array.astype(np.int64)
    bad = ((ids < 0) | (ids >= len(names))) & ~((ids == IGNORE_INDEX) if ignore else False)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"{what}: label {ids[where]} at row {where[0]} is out of range for {len(names)} classes "
            f"(0..{len(names) - 1}){'; IGNORE_INDEX (-100) marks unlabelled positions' if ignore else ''}"
        )
    return torch.from_numpy(ids)


def label_names(task: Task, train: np.ndarray) -> list[str]:
    """The task's classes: as given, or the distinct strings of train (sorted), or the ids 0..max."""
    where = f"task '{task.name}' labels"
    given = task.labels
    if isinstance(given, int) and not isinstance(given, bool):
        if given < 2:  # as the YAML route: one class leaves the head nothing to tell apart
            raise ConfigError(f"{where}: a {task.type} task needs at least two classes, got {given}")
        return [str(i) for i in range(given)]
    if isinstance(given, (str, bool)) or (given is not None and not isinstance(given, (Sequence, np.ndarray))):
        raise ConfigError(f"{where}: give the class names as a list, or their number, not {given!r}")
    if given is not None:
        names = [str(name) for name in given]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"{where}: name each class once (got {names})")
        if len(names) < 2:
            raise ConfigError(f"{where}: a {task.type} task needs at least two labels, got {names}")
        return names
    if _is_text(train):
        return sorted({str(v) for v in train.reshape(-1)})
    values = train[train != IGNORE_INDEX] if task.type == "token_classification" else train
    if values.dtype.kind not in "iubf" or values.size == 0:
        raise DataError(f"{where}: class labels must be whole numbers or strings, got {values.dtype}")
    return [str(i) for i in range(int(values.max()) + 1)]


def _rows_of(inputs: dict[str, Tensor], labels: np.ndarray, index: Sequence[int]) -> tuple[dict[str, Tensor], Any]:
    pick = torch.tensor(list(index), dtype=torch.long)
    return {key: value[pick] for key, value in inputs.items()}, labels[np.asarray(index, dtype=np.int64)]


def prepare_task(task: Task, seed: int) -> TensorTask:
    """Check one task and turn its splits into tensors; every problem is a ConfigError or DataError."""
    name = task.name
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(
            f"task name {name!r} must be 1-64 letters, digits, '_', '.' or '-', starting alphanumeric", field="name"
        )
    if task.type not in TASK_TYPES:
        raise ConfigError(f"task '{name}': unknown type '{task.type}'; choose from: {', '.join(TASK_TYPES)}")
    raw: dict[str, tuple[dict[str, Tensor], np.ndarray]] = {}
    for split in ("train", "validation", "test"):
        pair = getattr(task, split)
        if pair is None:
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ConfigError(f"task '{name}': {split} must be an (inputs, labels) pair", field=split)
        what = f"task '{name}' {split}"
        inputs = as_inputs(pair[0], f"{what} inputs")
        labels = as_array(pair[1], f"{what} labels")
        if len(labels) != len(next(iter(inputs.values()))):
            raise DataError(f"{what}: {len(next(iter(inputs.values())))} inputs but {len(labels)} labels")
        if len(labels) == 0:
            raise DataError(f"{what}: no rows")
        raw[split] = (inputs, labels)
    if task.validation is None:
        inputs, labels = raw["train"]
        if len(labels) < 2 or not 0 < task.validation_fraction < 1:
            raise DataError(
                f"task '{name}': give a validation split, or a train split of >= 2 rows and a validation_fraction "
                "in (0, 1) to hold some of it out"
            )
        order = list(range(len(labels)))
        random.Random(f"{seed}:{name}:validation").shuffle(order)
        held = min(max(1, round(len(order) * task.validation_fraction)), len(order) - 1)
        raw["validation"] = _rows_of(inputs, labels, sorted(order[:held]))
        raw["train"] = _rows_of(inputs, labels, sorted(order[held:]))
    prepared = TensorTask(task, {})
    metrics = list(task.metrics) if task.metrics is not None else list(DEFAULT_METRICS[task.type])
    if not metrics:
        raise ConfigError(f"task '{name}': name at least one metric", field="metrics")
    main = task.main_metric or metrics[0]
    if main not in metrics:
        raise ConfigError(f"task '{name}': main_metric '{main}' is not in metrics {metrics}", field="main_metric")
    prepared.metrics, prepared.main_metric = metrics, main
    if task.type == "regression":
        _regression(prepared, raw)
    else:
        _classes(prepared, raw)
        if task.type == "token_classification" and "entity_f1" in metrics:
            _require_iob2(name, prepared.labels or [])
    if task.positive_label is not None and task.positive_label not in (prepared.labels or []):
        raise ConfigError(f"task '{name}': positive_label '{task.positive_label}' is not one of its labels")
    try:
        build_metrics(metrics, task.positive_label)
    except ConfigError as error:
        raise ConfigError(f"task '{name}': {error.message}", field="metrics") from None
    return prepared


def _require_iob2(name: str, tags: list[str]) -> None:
    """entity_f1 reads tags as IOB2 and refuses any other when it scores, which would be the first validation of
    a run already under way; tag ids without `labels` are named "0", "1", ..., which are not IOB2."""
    bad = next((tag for tag in tags if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2)), None)
    if bad is not None:
        raise ConfigError(
            f"task '{name}': its metric entity_f1 reads tags as IOB2 (O, B-TYPE or I-TYPE), but tag '{bad}' is not; "
            "give labels in IOB2 or choose metrics=['token_accuracy']",
            field="labels",
        )


def _regression(task: TensorTask, raw: dict[str, tuple[dict[str, Tensor], np.ndarray]]) -> None:
    name = task.spec.name
    targets: dict[str, np.ndarray] = {}
    for split, (_, labels) in raw.items():
        if labels.ndim != 1 or labels.dtype.kind not in "iuf" or not np.all(np.isfinite(labels)):
            raise DataError(f"task '{name}' {split} labels: regression targets must be [N] finite numbers")
        if labels.size and float(np.abs(labels.astype(np.float64)).max()) > MAX_TARGET:
            raise DataError(f"task '{name}' {split} labels: regression targets must lie within ±{MAX_TARGET:g}")
        targets[split] = labels.astype(np.float64)
    if task.spec.normalize_targets:
        train = targets["train"]
        task.target_mean = float(train.mean())
        task.target_std = float(train.std()) or 1.0
    task.target_range = (float(targets["train"].min()), float(targets["train"].max()))
    for split, (inputs, _) in raw.items():
        scaled = (targets[split] - task.target_mean) / task.target_std
        task.splits[split] = Rows(inputs, torch.tensor(scaled, dtype=torch.float32), targets[split].tolist())


def _classes(task: TensorTask, raw: dict[str, tuple[dict[str, Tensor], np.ndarray]]) -> None:
    name, token = task.spec.name, task.spec.type == "token_classification"
    task.labels = label_names(task.spec, raw["train"][1])
    train, named = raw["train"][1], task.spec.labels is not None and not isinstance(task.spec.labels, int)
    if task.spec.labels is None and not token:  # as the YAML route: one class in train teaches nothing
        seen = np.unique(train.astype(str) if _is_text(train) else train)
        if len(seen) < 2:
            raise DataError(f"task '{name}' has only one label in train: {[str(v) for v in seen]}")
    if not named and not _is_text(train):  # ids in, ids out: 0 stays 0, not "0"
        kind: type = {"b": bool, "f": float}.get(train.dtype.kind, int)
        task.values = [kind(i) for i in range(len(task.labels))]
    for split, (inputs, labels) in raw.items():
        what = f"task '{name}' {split} labels"
        if labels.ndim != (2 if token else 1):
            want = "[N, L] class ids per position" if token else "[N], one per row"
            raise DataError(f"{what}: expected {want}, got shape {list(labels.shape)}")
        ids = class_ids(labels, task.labels, what, ignore=token)
        task.splits[split] = Rows(inputs, ids, _references(ids, task.labels))


def _references(ids: Tensor, names: list[str]) -> list[Any]:
    if ids.ndim == 1:
        return [names[i] for i in ids.tolist()]
    return [[names[i] for i in row if i != IGNORE_INDEX] for row in ids.tolist()]


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

    def evaluate(self, split: str = "test") -> dict[str, Any]:
        """{"tasks": {task: metrics entry}, "average_main_score": ...}, as in metrics.json; a task without
        `split` is scored on its validation split (its entry's "split" says so)."""
        if split not in ("train", "validation", "test"):
            raise ConfigError(f"unknown split '{split}'; choose from: train, validation, test", field="split")
        results = {}
        for name, task in self.tasks.items():
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
        model, name = self.model, task.spec.name
        was_training = model.training
        model.eval()
        outputs = []
        for start in range(0, len(rows), self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, len(rows)))
            batch = collate_tensors({name: (rows, index)}, self.length).to(self.device)
            outputs.append(model(batch)[name].float().cpu())
        model.train(was_training)
        return decode_outputs(task, torch.cat(outputs), rows)


def as_given(task: TensorTask, predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predictions with each class as the user gave it (an id of the labels' type), where they gave ids."""
    if task.values is None or task.labels is None:
        return predictions
    value = dict(zip(task.labels, task.values, strict=True))
    for entry in predictions:
        found = entry["prediction"]
        entry["prediction"] = [value[t] for t in found] if isinstance(found, list) else value[found]
        if "probabilities" in entry:
            entry["probabilities"] = {value[name]: p for name, p in entry["probabilities"].items()}
    return predictions


def decode_outputs(task: TensorTask, outputs: Tensor, rows: Rows) -> list[dict[str, Any]]:
    """Head outputs -> predictions: label names (with probabilities), targets in their own units, tag lists."""
    kind, names = task.spec.type, task.labels or []
    if kind == "regression":
        return [{"prediction": float(o) * task.target_std + task.target_mean} for o in outputs]
    if kind == "classification":
        return [class_prediction(names, o) for o in outputs]
    ids = outputs.argmax(-1)  # [N, L]
    if rows.labels is not None:  # score the labelled positions only
        keep = rows.labels != IGNORE_INDEX
    elif MASK in rows.inputs:
        keep = rows.inputs[MASK] > 0
    else:
        keep = torch.ones_like(ids, dtype=torch.bool)
    return [{"prediction": [names[i] for i in row[mask].tolist()]} for row, mask in zip(ids, keep, strict=True)]


def collate_tensors(parts: dict[str, tuple[Rows, Tensor]], length: int) -> TensorBatch:
    """Rows `index` of each task's split, concatenated task after task, with a mask of ones [B, length]
    unless the inputs carry their own `attention_mask`."""
    splits = [rows for rows, _ in parts.values()]
    inputs = {key: torch.cat([rows.inputs[key][index] for rows, index in parts.values()]) for key in splits[0].inputs}
    total = sum(len(index) for _, index in parts.values())
    if MASK not in inputs:
        inputs[MASK] = torch.ones(total, length, dtype=torch.long)
    tasks, start = {}, 0
    for name, (rows, index) in parts.items():
        labels = rows.labels[index] if rows.labels is not None else None
        tasks[name] = TaskRows(slice(start, start + len(index)), labels)
        start += len(index)
    return TensorBatch(inputs, tasks)


def _describe(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    return ", ".join(
        f"{key} {list(shape)} {str(dtype).removeprefix('torch.')}" for key, (shape, dtype) in shapes.items()
    )


# --- fit ---------------------------------------------------------------------------------------------


def probe_backbone(backbone: nn.Module, task: TensorTask, positional: bool) -> tuple[int, int]:
    """(hidden size H, positions L) of the backbone's features on two train rows; L = 1 for [B, H]."""
    rows = task.splits["train"]
    parameter = next(backbone.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    sample = {key: value[:2].to(device) for key, value in rows.inputs.items()}
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            given = {k: v for k, v in sample.items() if k != MASK} if positional else sample
            features = backbone(given[INPUT]) if positional else backbone(**given)
    except Exception as error:  # the user's module: say which inputs it failed on, in one line
        raise DataError(
            f"the backbone failed on task '{task.spec.name}' train inputs ({_describe(schema(rows.inputs))}): "
            f"{type(error).__name__}: {error}"
        ) from None
    finally:
        backbone.train(was_training)
    hidden = checked_features(features, len(next(iter(sample.values()))))
    if MASK in rows.inputs and rows.inputs[MASK].shape[1] != hidden.shape[1] and features.ndim == 3:
        raise DataError(
            f"'{MASK}' has {rows.inputs[MASK].shape[1]} positions but the backbone's features have "
            f"{hidden.shape[1]}: the mask must cover the feature positions"
        )
    return int(hidden.shape[2]), int(hidden.shape[1])


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
    `mixed_batches=True`). Nothing is written unless `output_dir` is given: then a new run directory there
    holds model.safetensors (the best weights), metrics.json, tasks.json and history.jsonl.
    """
    # every check on the user's input first: nothing is trained or written before they pass
    names = _checked_inputs(backbone, tasks)
    # as the YAML route: every float finite and within float32's range (an inf lr would train on NaN weights)
    stopping = asdict(early_stopping) if is_dataclass(early_stopping) else early_stopping  # type: ignore[arg-type]
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
    methods = _checked_methods(
        sampling, loss_weighting, gradient_aggregation, architecture, pooling, dropout, names, training
    )
    prepared = {task.name: prepare_task(task, seed) for task in tasks}
    model, length = _fit_model(backbone, prepared, methods.architecture, pooling, dropout, seed)
    sizes = {name: len(task.splits["train"]) for name, task in prepared.items()}
    sampler = build_sampler(methods.sampling, sizes, {n: t.spec.sampling_weight for n, t in prepared.items()}, steps)
    loss_weights = {n: t.spec.loss_weight for n, t in prepared.items()}
    balancer = build_balancer(methods.loss_weighting, methods.gradient, list(prepared), loss_weights, seed)
    require_shared_parameters(model, balancer)
    run_dir = create_run_dir(str(output_dir), name) if output_dir is not None else None
    return _train_fitted(model, prepared, length, sampler, balancer, training, seed, cpu, run_dir)


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
    training: TrainingConfig,
    seed: int,
    cpu: bool,
    run_dir: Path | None,
) -> FittedModel:
    """The training session (recipe/session.py, as the YAML recipe runs it) on in-memory tensors."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    accelerator = Accelerator(cpu=cpu)
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
    fitted.metrics = session.metrics(results, state, balancer, model, accelerator.device)
    session.write("tasks.json", _manifest(prepared))
    session.write("metrics.json", fitted.metrics)
    if run_dir is not None:
        print(f"saved to {run_dir}", file=sys.stderr)
    return fitted


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
