"""Tokenizing streamed rows in worker processes (`training.tokenize_workers`): the reader thread of
training.read_ahead reads and parses a task's next rows, and N processes tokenize them, each a share of the
chunk, while the training loop runs. A fast tokenizer releases the GIL while it encodes, but a chat
template is rendered in Python (Jinja), and so is the rest of a generation row's encoding: on a thread
that work competes with the training loop for the GIL; in a process it does not.

The processes are spawned (as torch's DataLoader does where fork is unsafe): they inherit no thread, lock or
accelerator state of the training process, and each gets the streamed tasks' definitions and a copy of the
tokenizer once, when it starts. Encoding is deterministic, so the rows, their order and the checkpointed
stream position are the same as tokenizing on the reader thread; only the time differs. A script that
starts training at import time must guard it with `if __name__ == "__main__":` (each process imports the
script's main module, as with every spawned process).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from multitune.data.encoding import encode
from multitune.data.tasks import Example, TaskData
from multitune.data.tokens import Encoded
from multitune.errors import MultitunError

_TASKS: dict[str, tuple[TaskData, Any, int, bool]] = {}  # in a worker: each streamed task's encoding


def _install(tasks: dict[str, tuple[TaskData, Any, int, bool]]) -> None:
    # Ctrl-C reaches the whole process group: the training process turns it into a checkpoint at the end of
    # the step (training/loop.py's StopSignal), for which its workers must still be alive
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _TASKS.update(tasks)
    if "torch" in sys.modules:  # one thread per worker: the processes are the parallelism
        sys.modules["torch"].set_num_threads(1)


def _encode(name: str, examples: Sequence[Example]) -> list[Encoded]:
    data, tokenizer, max_length, decoder_targets = _TASKS[name]
    return encode(examples, data, tokenizer, max_length, decoder_targets=decoder_targets)


class TokenizerPool:
    """`workers` spawned processes that encode streamed tasks' examples as data/encoding.py's `encode` does.

    tasks: {name: (task data, tokenizer, max_length, decoder_targets)}: only what encoding reads of a task is
    sent (its examples in memory and its stream are left out). Raises ValueError when workers < 1."""

    def __init__(self, workers: int, tasks: dict[str, tuple[TaskData, Any, int, bool]]) -> None:
        if workers < 1:
            raise ValueError(f"a tokenizer pool needs at least one worker, not {workers}")
        light = {
            name: (dataclasses.replace(data, splits={}, stream=None), *rest) for name, (data, *rest) in tasks.items()
        }
        self.workers = workers
        self.pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_install, initargs=(light,)
        )

    def encoder(self, name: str) -> Callable[[list[Example]], list[Encoded]]:
        """Task `name`'s examples -> Encoded rows, in their order, split evenly over the workers. An error of
        encoding (a bad row) is raised here as the worker raised it."""

        def encode_rows(examples: list[Example]) -> list[Encoded]:
            if not examples:
                return []
            size = math.ceil(len(examples) / self.workers)
            try:
                parts = [self.pool.submit(_encode, name, examples[i : i + size]) for i in range(0, len(examples), size)]
                return [row for part in parts for row in part.result()]
            except BrokenProcessPool:
                raise MultitunError(
                    "a tokenizing worker process ended without an answer (killed, or out of memory?): fewer "
                    "workers, or 0 to tokenize on the reader thread; checkpoints written before it are intact",
                    field="training.tokenize_workers",
                ) from None

        return encode_rows

    def close(self) -> None:
        """Stop the processes (work not started is dropped)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
