"""One streamed generation as the HTTP routes read it: run on the inference thread, its text handed to the
event loop piece by piece as transformers' TextStreamer finalizes it (no thread waits for it), stopped when
its client leaves or a stop sequence comes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from transformers import TextStreamer

from multitune.serving.batcher import MicroBatcher
from multitune.serving.engine import Asked, Engine, Watch

POLL_SECONDS = 0.5  # how often a generation's reader looks whether its client is still there


class LoopStreamer(TextStreamer):
    """transformers' TextStreamer whose finalized text goes into an asyncio queue of `loop` (None at the
    end): the generation runs on another thread, its reader awaits on the event loop."""

    def __init__(self, tokenizer: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.loop = loop
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        try:
            self.loop.call_soon_threadsafe(self.pieces.put_nowait, text)
            if stream_end:
                self.loop.call_soon_threadsafe(self.pieces.put_nowait, None)
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody reads
            pass


class Generation:
    """One generation on the inference thread (counted in the batcher's queue bound: Busy when it is full),
    read as text pieces (`pieces`). The text ends before the first stop sequence; the generation is stopped
    when a stop sequence comes or the client leaves (its reader closed, or `http.is_disconnected()`), so a
    client that walks away does not keep the model busy. Once read: `finish` is "stop", or "length" when
    the text was cut at `limit` new tokens; `tokens` the new tokens generated; `text` the whole answer."""

    def __init__(
        self,
        engine: Engine,
        batcher: MicroBatcher,
        task: str,
        row: Any,
        http: Any,
        asked: int | None = None,
        stops: Sequence[str] = (),
    ) -> None:
        """`asked`: a request's max_tokens. Raises TaskGone, MultitunError (max_tokens past the model's context,
        see Engine.generation_limit) and Busy before anything is queued."""
        self.prompt_tokens = len(row.input_ids[: row.prompt_length or None])
        limit = engine.generation_limit(task, self.prompt_tokens, asked)
        self.streamer = LoopStreamer(engine.backbone.tokenizer, asyncio.get_running_loop())
        self.watch = Watch(self.streamer, between=batcher.run_pending)  # predictions run between its tokens
        self.eos = engine.backbone.tokenizer.eos_token_id
        self.limit, self.stops, self.http = limit, list(stops), http
        self.finish: str | None = None  # "stop" or "length", once known
        self.tokens = 0  # new tokens, once known
        self.gone = False  # the client left
        self._look_at = 0.0  # when to look again whether the client is there
        self._sent: list[str] = []  # the text handed out
        self._stopped = False  # by a stop sequence
        self.done = batcher.generate(Asked(task, row, self.watch, limit))  # batched with others waiting
        self.done.add_done_callback(_retrieved)  # a stopped generation's Cancelled is expected, not a warning

    def __del__(self) -> None:  # never read (a response dropped before its body was iterated): stop it
        self.watch.cancel.set()

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
                return await asyncio.wait_for(self.streamer.pieces.get(), POLL_SECONDS)
            except asyncio.TimeoutError:  # nothing new: queued, a long prompt, or over without a word
                if self.done.done() and self.streamer.pieces.empty():
                    return None

    async def pieces(self) -> AsyncIterator[str]:
        held = ""  # text not sent yet: it may be the start of a stop sequence
        keep = max((len(stop) for stop in self.stops), default=1) - 1
        try:
            while (piece := await self._next()) is not None:
                held += piece
                cut = min((i for i in (held.find(stop) for stop in self.stops) if i >= 0), default=-1)
                if cut >= 0:
                    self.finish, self.tokens, self._stopped = "stop", self.watch.tokens, True
                    if held[:cut]:
                        self._sent.append(held[:cut])
                        yield held[:cut]
                    return
                if len(held) > keep:
                    self._sent.append(held[: len(held) - keep])
                    yield self._sent[-1]
                    held = held[len(held) - keep :]
            if self.gone:
                return
            await self.done  # its errors (a task unloaded while queued, a failure) are the caller's
            if held:
                self._sent.append(held)
                yield held
            self.tokens = self.watch.tokens
            cut = self.tokens >= self.limit and self.watch.last != self.eos
            self.finish = "length" if cut else "stop"
        finally:
            self.watch.cancel.set()  # a stop sequence, a client that left: the generation stops at its next token

    @property
    def text(self) -> str:
        """The whole answer once `pieces` is read: the model's decoded text, or (ended by a stop sequence) the
        text before it."""
        return "".join(self._sent).strip() if self._stopped else str(self.done.result())


def _retrieved(future: Any) -> None:
    if not future.cancelled():
        future.exception()
