"""One streamed generation as the HTTP routes read it: on the inference thread, stopped when its client
leaves or a stop sequence comes, its text read piece by piece (transformers' TextIteratorStreamer)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator
from typing import Any

from multitune.serving.batcher import MicroBatcher
from multitune.serving.engine import Engine, Watch

POLL_SECONDS = 0.5  # how often a generation's reader looks whether its client is still there


class Generation:
    """One generation on the inference thread (counted in the batcher's queue bound: Busy when it is full),
    read as text pieces (`pieces`). The text ends before the first stop sequence; the generation is stopped
    when a stop sequence comes or the client leaves (its reader closed, or `http.is_disconnected()`), so a
    client that walks away does not keep the model busy. `finish` is then "stop", or "length" when the text
    was cut at `limit` new tokens."""

    def __init__(
        self, engine: Engine, batcher: MicroBatcher, task: str, row: Any, limit: int, stops: list[str], http: Any
    ) -> None:
        from transformers import TextIteratorStreamer

        self.streamer = TextIteratorStreamer(
            engine.backbone.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=POLL_SECONDS
        )
        self.watch = Watch(self.streamer)
        self.eos = engine.backbone.tokenizer.eos_token_id
        self.limit, self.stops, self.http = limit, stops, http
        self.finish: str | None = None  # "stop" or "length", once known
        self.gone = False  # the client left
        self._look_at = 0.0  # when to look again whether the client is there
        self.done = batcher.call(engine.generate_one, task, row, self.watch, limit, rows=1)
        self.done.add_done_callback(_retrieved)  # a stopped generation's Cancelled is expected, not a warning

    async def _next(self) -> str | None:
        """The next piece of text; None at the end, or once the client has left (looked at every
        POLL_SECONDS, whether pieces come or not: a server may not notice otherwise until it writes)."""
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= self._look_at and await self.http.is_disconnected():
                self.gone = True
                return None
            self._look_at = loop.time() + POLL_SECONDS
            try:
                return await loop.run_in_executor(None, next, self.streamer, None)  # type: ignore[arg-type]
            except queue.Empty:  # nothing new for POLL_SECONDS: queued, or a long prompt
                continue

    async def pieces(self) -> AsyncIterator[str]:
        held = ""  # text not sent yet: it may be the start of a stop sequence
        keep = max((len(stop) for stop in self.stops), default=1) - 1
        try:
            while (piece := await self._next()) is not None:
                held += piece
                cut = min((i for i in (held.find(stop) for stop in self.stops) if i >= 0), default=-1)
                if cut >= 0:
                    if held[:cut]:
                        yield held[:cut]
                    self.finish, held = "stop", ""
                    break
                if len(held) > keep:
                    yield held[: len(held) - keep]
                    held = held[len(held) - keep :]
            if self.finish is None and not self.gone:
                await self.done  # its errors (a task unloaded while queued, a failure) are the caller's
                if held:
                    yield held
                cut = self.watch.tokens >= self.limit and self.watch.last != self.eos
                self.finish = "length" if cut else "stop"
        finally:
            self.watch.cancel.set()  # a stop sequence, a client that left: the generation stops at its next token


def _retrieved(future: Any) -> None:
    if not future.cancelled():
        future.exception()
