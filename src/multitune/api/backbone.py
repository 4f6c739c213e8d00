"""The user's backbone as multitune sees it: features [B, H] or [B, L, H] checked on a probe batch, and
batches of in-memory tensors (TensorBatch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from multitune.api.tensors import INPUT, MASK, Rows, TensorTask, _describe, schema
from multitune.data.collate import Batch, TaskRows
from multitune.errors import DataError


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
