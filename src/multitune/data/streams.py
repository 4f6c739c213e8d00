"""TaskStream: an endless, seeded, epoch-wise shuffled stream of one task's training rows."""

from __future__ import annotations

import random
from typing import Generic, TypeVar

T = TypeVar("T")


class TaskStream(Generic[T]):
    """Yields rows in a fresh seeded permutation each epoch; its position is two ints (checkpointable)."""

    def __init__(self, rows: list[T], seed: str) -> None:
        if not rows:
            raise ValueError("a task stream needs at least one row")
        self.rows = rows
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

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
