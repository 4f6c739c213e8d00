"""Pad encoded rows of one or several tasks into one backbone batch, remembering which rows are whose."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from multitune.data.encoding import IGNORE_INDEX, Encoded


@dataclass
class TaskRows:
    rows: slice  # this task's rows in the batch
    labels: Tensor | None  # [n] class ids or targets, [n, L] tag ids, or [n, T] a decoder's target ids
    aligned: bool = True  # [n, L] labels sit on the input's positions (False: decoder targets of their own length)


@dataclass
class Batch:
    """One backbone forward: inputs of all tasks padded together, plus each task's rows and labels."""

    inputs: dict[str, Tensor]  # input_ids, attention_mask[, token_type_ids]: [B, L]
    tasks: dict[str, TaskRows]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
            {
                name: TaskRows(t.rows, None if t.labels is None else t.labels.to(device, non_blocking=True), t.aligned)
                for name, t in self.tasks.items()
            },
        )

    def only(self, name: str) -> Batch:
        """The rows of one task, trimmed to their own longest row (less padding than the joint batch)."""
        part = self.tasks[name]
        mask = self.inputs["attention_mask"][part.rows]
        length = max(int(mask.sum(1).max()), 1)
        inputs = {k: v[part.rows, :length] for k, v in self.inputs.items()}
        labels = part.labels
        if labels is not None and labels.ndim == 2 and part.aligned:
            labels = labels[:, :length]
        return Batch(inputs, {name: TaskRows(slice(0, mask.shape[0]), labels, part.aligned)})

    @property
    def size(self) -> int:
        return int(self.inputs["input_ids"].shape[0])


def collate(rows_by_task: dict[str, list[Encoded]], pad_id: int) -> Batch:
    """Right-pad every row to the longest in the batch; token labels are padded with IGNORE_INDEX."""
    every = [row for rows in rows_by_task.values() for row in rows]
    length = max(len(row.input_ids) for row in every)
    input_ids = torch.full((len(every), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(every), length), dtype=torch.long)
    with_types = all(row.token_type_ids is not None for row in every)
    type_ids = torch.zeros((len(every), length), dtype=torch.long) if with_types else None
    for i, row in enumerate(every):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        attention[i, :n] = 1
        if type_ids is not None:
            type_ids[i, :n] = torch.tensor(row.token_type_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention}
    if type_ids is not None:
        inputs["token_type_ids"] = type_ids
    tasks: dict[str, TaskRows] = {}
    start = 0
    for name, rows in rows_by_task.items():
        aligned = all(row.aligned for row in rows)
        tasks[name] = TaskRows(slice(start, start + len(rows)), _labels(rows, length, aligned), aligned)
        start += len(rows)
    return Batch(inputs, tasks)


def _labels(rows: list[Encoded], length: int, aligned: bool = True) -> Tensor | None:
    if not rows or rows[0].label is None:
        return None
    first = rows[0].label
    if isinstance(first, list):
        if not aligned:  # decoder targets: padded to the longest target, not to the input
            length = max(len(row.label) for row in rows)  # type: ignore[arg-type]
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            tags = row.label
            assert isinstance(tags, list)
            labels[i, : len(tags)] = torch.tensor(tags)
        return labels
    if isinstance(first, float):
        return torch.tensor([row.label for row in rows], dtype=torch.float32)
    return torch.tensor([row.label for row in rows], dtype=torch.long)
