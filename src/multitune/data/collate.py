"""Pad encoded rows of one or several tasks into one backbone batch, remembering which rows are whose;
or pack them (causal LMs): several examples share a row, each with its own positions, no padding between.

Packing: rows are placed first-fit by decreasing length into rows of at most `length` tokens; every
example's position ids restart at 0, so a model that reads packed sequences from position ids
(transformers' sdpa/eager/flex masks, flash-attention's variable-length kernels) lets no token attend
across examples. Each task's labels cover only its own tokens, so its loss (the mean over its target
tokens) is the same as in a padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from multitune.data.tokens import IGNORE_INDEX, Encoded


@dataclass
class TaskRows:
    rows: slice  # this task's rows in the batch
    labels: Tensor | None  # [n] class ids or targets, [n, L] tag ids, or [n, T] a decoder's target ids
    aligned: bool = True  # [n, L] labels sit on the input's positions (False: decoder targets of their own length)


@dataclass
class Batch:
    """One backbone forward: inputs of all tasks padded together, plus each task's rows and labels."""

    inputs: dict[str, Tensor]  # input_ids, attention_mask[, token_type_ids | position_ids]: [B, L];
    # image rows: pixel_values [B, C, H, W] and an attention_mask of ones [B, 1] (one pooled feature per row)
    tasks: dict[str, TaskRows]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()},
            {
                name: TaskRows(t.rows, None if t.labels is None else t.labels.to(device, non_blocking=True), t.aligned)
                for name, t in self.tasks.items()
            },
        )

    @property
    def packed(self) -> bool:
        """Rows hold several examples: pack() gives every example position ids that restart at 0."""
        return "position_ids" in self.inputs

    def only(self, name: str) -> Batch:
        """The rows of one task, trimmed to their own longest row (less padding than the joint batch).
        Packed: the rows holding any of its tokens (other examples in them take part, without loss)."""
        part = self.tasks[name]
        if self.packed:
            assert part.labels is not None
            keep = (part.labels != IGNORE_INDEX).any(1)
            inputs = {k: v[keep] for k, v in self.inputs.items()}
            return Batch(inputs, {name: TaskRows(slice(0, int(keep.sum())), part.labels[keep], True)})
        return self.rows(part.rows.start, part.rows.stop)  # the task's rows are contiguous

    @property
    def size(self) -> int:
        return int(self.inputs["attention_mask"].shape[0])

    def rows(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) as a batch of their own (tasks cut to their rows there, padding trimmed)."""
        mask = self.inputs["attention_mask"][start:stop]
        length = self.inputs["input_ids"].shape[1] if self.packed else max(int(mask.sum(1).max()), 1)
        inputs = {k: v[start:stop, :length] if v.ndim == 2 else v[start:stop] for k, v in self.inputs.items()}
        tasks = {}
        for name, part in self.tasks.items():
            first, last = max(part.rows.start, start), min(part.rows.stop, stop)
            if first >= last:
                continue
            labels = part.labels
            if labels is not None:
                labels = labels[first - part.rows.start : last - part.rows.start]
                if labels.ndim == 2 and part.aligned:
                    labels = labels[:, :length]
            tasks[name] = TaskRows(slice(first - start, last - start), labels, part.aligned)
        return Batch(inputs, tasks)


def collate(rows_by_task: dict[str, list[Encoded]], pad_id: int) -> Batch:
    """Right-pad every row to the longest in the batch; token labels are padded with IGNORE_INDEX.
    Image rows are stacked: pixel_values [B, C, H, W] (every image of one size, as the processor makes them)."""
    every = [row for rows in rows_by_task.values() for row in rows]
    if every[0].pixel_values is not None:
        return _task_rows(
            rows_by_task,
            {
                "pixel_values": torch.stack([row.pixel_values for row in every]),
                "attention_mask": torch.ones((len(every), 1), dtype=torch.long),
            },
            1,
        )
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
    return _task_rows(rows_by_task, inputs, length)


def _task_rows(rows_by_task: dict[str, list[Encoded]], inputs: dict[str, Tensor], length: int) -> Batch:
    """The batch of `inputs` whose rows are each task's rows in turn, with their labels."""
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


def pack(rows_by_task: dict[str, list[Encoded]], pad_id: int, length: int) -> Batch:
    """Pack examples (prompt and target tokens, labels aligned) into rows of at most `length` tokens."""
    examples = [(name, row) for name, rows in rows_by_task.items() for row in rows]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][1].input_ids))
    bins: list[list[int]] = []  # example indices per packed row
    room: list[int] = []
    for i in order:
        size = len(examples[i][1].input_ids)
        if size > length:
            raise ValueError(f"an example of {size} tokens does not fit a packed row of {length}")
        slot = next((b for b, free in enumerate(room) if free >= size), None)
        if slot is None:
            bins.append([])
            room.append(length)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= size
    width = max(length - free for free in room)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    attention = torch.zeros((len(bins), width), dtype=torch.long)
    labels = {name: torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long) for name in rows_by_task}
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            name, row = examples[i]
            n = len(row.input_ids)
            input_ids[r, at : at + n] = torch.tensor(row.input_ids)
            positions[r, at : at + n] = torch.arange(n)
            attention[r, at : at + n] = 1
            if isinstance(row.label, list):
                labels[name][r, at : at + len(row.label)] = torch.tensor(row.label)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the tail is one more (label-free) sequence
    inputs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions}
    tasks = {name: TaskRows(slice(0, len(bins)), labels[name], True) for name in rows_by_task}
    return Batch(inputs, tasks)
