"""Streamed training splits (`source.streaming: true`): a task's training rows are read lazily from their
files, shuffled in a bounded buffer, and tokenized when they are drawn, so memory does not grow with the data.

- Order: each epoch, the rows pass through a shuffle buffer of `shuffle_buffer` rows seeded by (seed, epoch)
  (as tf.data's and Hugging Face's streaming shuffles): the buffer is filled, then each drawn row is a random
  one of the buffer, replaced by the next row read. A split that fits in the buffer is drawn in exactly the
  permutation an in-memory task stream uses (data/streams.py), so a small streamed task trains on the same
  batches as the same task read into memory.
- Position: two numbers, the epoch and the rows drawn in it; a resumed run reads the epoch again up to that
  row (parsing, not tokenizing, the rows before it) and continues exactly where it stopped.
- Row counts: the sampler's sizes are `num_rows` when declared, else counted in one pass over the files
  without parsing them (lines, blocks or a Parquet footer). Labels and regression statistics, when the
  config does not give them, take one parsing pass (data/tasks.py).
- A unified file feeds many tasks: one pass indexes where each task's records start (8 bytes per record),
  and each task's stream reads its own records there.
- A bad row found late is an error at its file and line, raised where the row is drawn.
- Read-ahead (`training.read_ahead`, on by default): one background thread reads, parses and tokenizes each
  streamed task's next rows while the training loop runs the forward and backward passes (torch and a fast
  tokenizer release the GIL while they work). It tokenizes with its own copy of the tokenizer (a fast
  tokenizer must not serve two threads at once). The rows, their order, the checkpointed position and the
  step at which a bad row stops the run are those of reading in the loop: only the time differs.
"""

from __future__ import annotations

import codecs
import contextlib
import heapq
import itertools
import logging
import random
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, TypeVar

from multitune.data.readers import Row, json_rows, lines_at, offset_lines, open_binary
from multitune.data.tokens import Encoded
from multitune.errors import DataError

T = TypeVar("T")
log = logging.getLogger(__name__)
STREAMED_EVAL_ROWS = 2000  # a streamed task's validation and test rows kept in memory, unless max_rows says
BUFFER_ROWS = 10_000  # a streamed task's shuffle buffer, by default
BUFFER_BUDGET = 100_000  # ... all streamed tasks' buffers together, by default
MIN_BUFFER_ROWS = 256


def buffer_rows(streamed_tasks: int) -> int:
    """A streamed task's default shuffle buffer: BUFFER_ROWS, or fewer when many tasks stream, so that their
    buffers together hold at most BUFFER_BUDGET rows (each at least MIN_BUFFER_ROWS): memory stays bounded
    whatever the number of tasks (300 tasks: 333 rows each)."""
    return max(MIN_BUFFER_ROWS, min(BUFFER_ROWS, BUFFER_BUDGET // max(streamed_tasks, 1)))


@dataclass
class StreamSource:
    """A streamed training split: `open()` reads its examples again from the first; `num_rows` is what the
    sampler counts (declared, or counted); `buffer` the shuffle buffer's rows."""

    open: Callable[[], Iterator[Any]]
    num_rows: int
    buffer: int
    where: str  # the file(s) or dataset, for errors


def shuffled(rows: Iterator[T], buffer: int, rng: random.Random) -> Iterator[T]:
    """`rows` in the order of a seeded shuffle buffer of `buffer` rows; rows that all fit in the buffer come
    in the permutation `rng.shuffle` gives their indices (as TaskStream's)."""
    held = list(itertools.islice(rows, buffer))
    if len(held) < buffer:
        order = list(range(len(held)))
        rng.shuffle(order)
        yield from (held[i] for i in order)
        return
    for row in rows:
        slot = rng.randrange(buffer)
        yield held[slot]
        held[slot] = row
    order = list(range(len(held)))
    rng.shuffle(order)
    yield from (held[i] for i in order)


class StreamedRows:
    """A task stream (data/streams.py's protocol: take, state_dict, load_state_dict) over a streamed split:
    endless, epoch after epoch, each epoch through a shuffle buffer seeded by (seed, epoch); rows are encoded
    (`encode`: examples -> Encoded rows) when drawn."""

    def __init__(self, source: StreamSource, encode: Callable[[list[Any]], list[Encoded]], seed: str) -> None:
        self.source, self.encode, self.seed = source, encode, seed
        self.epoch = 0
        self.offset = 0  # rows drawn in this epoch
        self._rows = self._epoch(0)

    def _epoch(self, epoch: int) -> Iterator[Any]:
        return shuffled(self.source.open(), self.source.buffer, random.Random(f"{self.seed}:{epoch}"))

    def take_examples(self, n: int) -> list[Any]:
        out: list[Any] = []
        while len(out) < n:
            row = next(self._rows, None)
            if row is None:
                if self.offset == 0:
                    raise DataError("a streamed train split holds no rows", file=self.source.where)
                if self.epoch == 0 and self.offset != self.source.num_rows:
                    log.warning(
                        "%s: an epoch of the streamed train split held %d rows, not the %d its num_rows declares "
                        "(the sampler's probabilities use the declared number)",
                        self.source.where, self.offset, self.source.num_rows,
                    )  # fmt: skip
                self.epoch, self.offset = self.epoch + 1, 0
                self._rows = self._epoch(self.epoch)
                continue
            out.append(row)
            self.offset += 1
        return out

    def take(self, n: int) -> list[Encoded]:
        return self.encode(self.take_examples(n))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at (epoch, offset): the epoch is read again and its first `offset` rows passed over."""
        self._seek(state)

    def _seek(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), 0
        self._rows = self._epoch(self.epoch)
        skip = int(state["offset"])
        for _ in range(skip):
            if next(self._rows, None) is None:
                raise DataError(
                    f"the streamed train split has fewer rows than the checkpoint's position ({skip}): it changed",
                    file=self.source.where,
                )
        self.offset = skip


class ReadAheadRows(StreamedRows):
    """StreamedRows whose next rows (twice the last draw, at most `chunk`) are read and encoded on `worker` (a
    one-thread executor shared by every streamed task of a run) while the caller trains on the rows before
    them. The stream's position
    (state_dict) is that of the last row handed out, so a checkpoint resumes exactly where the loop stopped,
    whatever was read ahead. A row that cannot be read or encoded raises when the loop reaches it, as
    reading in the loop would; the rows before it are handed out first."""

    def __init__(
        self,
        source: StreamSource,
        encode: Callable[[list[Any]], list[Encoded]],
        seed: str,
        worker: Executor,
        chunk: int,
    ) -> None:
        super().__init__(source, encode, seed)
        self.worker, self.chunk = worker, chunk
        self._ready: deque[tuple[Encoded, tuple[int, int]]] = deque()
        self._pending: Future[tuple[list[tuple[Encoded, tuple[int, int]]], BaseException | None]] | None = None
        self._error: BaseException | None = None
        self._handed = (0, 0)  # (epoch, offset) after the last row handed out

    def take(self, n: int) -> list[Encoded]:
        while len(self._ready) < n:
            if self._error is not None:
                raise self._error
            future = self._pending or self.worker.submit(self._read, n - len(self._ready))
            self._pending = None
            rows, self._error = future.result()
            self._ready.extend(rows)
        out = [self._ready.popleft() for _ in range(n)]
        if out:
            self._handed = out[-1][1]
        # the next rows, read while these train: as many as twice this draw (at most `chunk`), so that a task
        # drawn a row at a time among hundreds does not have rows read for it that a run never reaches
        target = min(self.chunk, 2 * n)
        if self._pending is None and self._error is None and len(self._ready) < target:
            self._pending = self.worker.submit(self._read, target - len(self._ready))
        return [row for row, _ in out]

    def _read(self, count: int) -> tuple[list[tuple[Encoded, tuple[int, int]]], BaseException | None]:
        """On the worker: the next `count` rows encoded, each with the position after it; and the error that
        ended them early, if one did (a bad row: the rows before it are kept)."""
        examples: list[Any] = []
        positions: list[tuple[int, int]] = []
        error: BaseException | None = None
        try:
            for _ in range(count):
                examples.extend(self.take_examples(1))
                positions.append((self.epoch, self.offset))
        except Exception as failure:  # raised in the loop when it reaches this row
            error = failure
        try:
            encoded = self.encode(examples)
        except Exception:  # one row does not encode: encode one by one to hand out those before it
            encoded = []
            for example in examples:
                try:
                    encoded.extend(self.encode([example]))
                except Exception as failure:
                    error = failure
                    break
        return list(zip(encoded, positions[: len(encoded)], strict=True)), error

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._handed[0], "offset": self._handed[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._pending is not None:  # let the worker finish with the reader before it is moved
            self._pending.result()
            self._pending = None
        self._ready.clear()
        self._error = None
        self._seek(state)
        self._handed = (self.epoch, self.offset)


def reservoir(rows: Iterator[T], k: int, seed: str) -> list[T]:
    """A seeded uniform sample of k rows in one pass, in their order in the data (Algorithm R's keys, as a
    k-smallest selection of random keys); all rows when there are at most k."""
    rng = random.Random(seed)
    keyed = heapq.nsmallest(k, ((rng.random(), index, row) for index, row in enumerate(rows)), key=lambda t: t[:2])
    return [row for _, _, row in sorted(keyed, key=lambda t: t[1])]


# --- counting rows without making examples of them -----------------------------------------------------


def count_lines(path: str, encoding: str) -> int:
    """Non-blank lines (JSONL records, CSV rows of one line each, parallel pairs), read as bytes: nothing is
    decoded or parsed (bytes that do not decode are an error where the row is drawn)."""
    with _binary(path, encoding) as handle:
        return sum(1 for raw in handle if raw.strip())


def count_blocks(path: str, encoding: str) -> int:
    """Blank-line-separated blocks (CoNLL sentences; a `-DOCSTART-` line, which read_conll skips, is no
    token), read as bytes."""
    blocks, inside = 0, False
    with _binary(path, encoding) as handle:
        for raw in handle:
            text = raw.strip()
            filled = bool(text) and not text.startswith(b"-DOCSTART-" if isinstance(text, bytes) else "-DOCSTART-")
            blocks += filled and not inside
            inside = filled
    return blocks


def _binary(path: str, encoding: str) -> Any:
    """The file opened for counting; an encoding whose line breaks are not single bytes is decoded instead."""
    try:
        byte_lines = codecs.lookup(encoding).name.replace("-", "_") in BYTE_LINES
    except LookupError:  # decoding says so, in one line
        byte_lines = False
    if byte_lines:
        return open_binary(path)
    return contextlib.nullcontext(text for _, _, text in offset_lines(path, encoding))


# encodings whose line break is the byte 0x0A and whose other characters never hold it (ASCII-compatible)
BYTE_LINES = {"utf_8", "utf_8_sig", "ascii", "latin_1", "iso8859_1", "cp1252", "iso8859_15", "mbcs"}


# --- a unified file indexed by task -------------------------------------------------------------------


class UnifiedIndex:
    """Where each task's records start in one unified file: one pass (each line parsed for its `task`),
    then 8 + 8 bytes per record; `rows(key)` reads one task's records at their places, in file order."""

    def __init__(self, path: str, encoding: str, known: set[str]) -> None:
        self.path, self.encoding = path, encoding
        self.places: dict[str, tuple[array[int], array[int]]] = {}
        for number, offset, text in offset_lines(path, encoding):
            if not text.strip():
                continue
            row = next(json_rows([(number, text)], path))
            task = row.get("task")
            if not isinstance(task, str) or not task:
                raise row.error("must be a non-empty string", "task")
            if task not in known:
                raise row.error(f"no configured task '{task}' (this file feeds: {', '.join(sorted(known))})", "task")
            lines, offsets = self.places.setdefault(task, (array("q"), array("q")))
            lines.append(number)
            offsets.append(offset)

    def count(self, key: str) -> int:
        return len(self.places.get(key, (array("q"),))[0])

    def rows(self, key: str) -> Iterator[Row]:
        lines, offsets = self.places.get(key, (array("q"), array("q")))
        return json_rows(lines_at(self.path, self.encoding, zip(lines, offsets, strict=True)), self.path)
