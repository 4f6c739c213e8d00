"""TaskStream: an endless, seeded, epoch-wise shuffled stream of one task's training rows.

With `group_size` and `lengths` the epoch's order is length-grouped (as Hugging Face's
LengthGroupedSampler and fairseq's bucketing): the shuffled rows are cut into windows of
`group_size * GROUP_WINDOW` rows, each window is sorted by length (longest first) and cut into groups of
`group_size`, and the groups are shuffled. Consecutive draws of `group_size` rows then have similar
lengths, so a padded batch carries little padding, while every row is still seen once per epoch and the
order stays a pure function of (seed, epoch): resuming reproduces it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")

GROUP_WINDOW = 50  # groups per sorting window: larger packs tighter, smaller keeps more randomness


class RowStream(Protocol[T]):
    """A task's endless stream of training rows, checkpointable: TaskStream (rows in memory) or
    data/streaming.py's StreamedRows (rows read from their files as they are drawn)."""

    def take(self, n: int) -> list[T]: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TaskStream(Generic[T]):
    """Yields rows in a fresh seeded permutation each epoch; its position is two ints (checkpointable)."""

    def __init__(
        self, rows: list[T], seed: str, group_size: int | None = None, lengths: Sequence[int] | None = None
    ) -> None:
        if not rows:
            raise ValueError("a task stream needs at least one row")
        if group_size is not None and (lengths is None or len(lengths) != len(rows)):
            raise ValueError("length grouping needs one length per row")
        self.rows = rows
        self.seed = seed
        self.group_size = group_size
        self.lengths = list(lengths) if lengths is not None else None
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        rng = random.Random(f"{self.seed}:{epoch}")
        rng.shuffle(order)
        if self.group_size is None or self.lengths is None or self.group_size <= 1:
            return order
        lengths, size = self.lengths, self.group_size
        window = size * GROUP_WINDOW
        groups: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
            groups.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
        rng.shuffle(groups)
        groups.sort(key=lambda group: len(group) < size)  # a short last group goes last: draws stay aligned
        return [i for group in groups for i in group]

    def take(self, n: int) -> list[T]:
        out = []
        for _ in range(n):
            if self.offset == len(self.rows):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self.rows[self._order[self.offset]])
            self.offset += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)
