"""`Task`: one task of in-memory arrays (inputs and labels per split), checked and converted into a
TensorTask: tensors, the label vocabulary (names or the user's own ids), regression targets standardised,
validation carved from train when missing, each split's references for the metrics."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from multitune.config import (
    DEFAULT_METRICS,
    NAME_PATTERN,
)
from multitune.data.tasks import MAX_TARGET
from multitune.data.tokens import IGNORE_INDEX
from multitune.errors import ConfigError, DataError
from multitune.evaluation.evaluate import class_prediction
from multitune.evaluation.metrics import build_metrics

TASK_TYPES = ("classification", "regression", "token_classification")


INPUT = "inputs"  # the batch key of a plain tensor input (passed to the backbone positionally)


MASK = "attention_mask"  # what MultiTaskModel pools over; ones unless the inputs carry their own


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
    whole_train = raw["train"][1]  # its classes are the task's, whichever rows validation holds out
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
        _classes(prepared, raw, whole_train)
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


def _classes(task: TensorTask, raw: dict[str, tuple[dict[str, Tensor], np.ndarray]], train: np.ndarray) -> None:
    """`train`: the labels of the whole train split as given, before any validation rows were held out of it."""
    name, token = task.spec.name, task.spec.type == "token_classification"
    task.labels = label_names(task.spec, train)
    named = task.spec.labels is not None and not isinstance(task.spec.labels, int)
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


def _describe(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    return ", ".join(
        f"{key} {list(shape)} {str(dtype).removeprefix('torch.')}" for key, (shape, dtype) in shapes.items()
    )


Split = tuple[Any, Any]  # (inputs, labels): inputs an array / tensor or a dict of them, labels an array / list
