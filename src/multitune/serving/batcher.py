"""Dynamic micro-batching: requests of any task wait in one bounded queue; a worker takes what is there (up to
`max_rows` rows, waiting at most `max_wait_ms` for more when the queue runs dry) and answers it with one
`Engine.run` call on the inference thread, so concurrent requests of different tasks share backbone forwards.
Each request is answered as soon as its own rows are (Engine.run's `done`), not when the whole call ends.

The model runs on one dedicated thread: the event loop keeps accepting (and refusing) requests meanwhile,
and per-task adapter routing, which is state on the model, is never used by two calls at once. A streamed
generation holds that thread for all its tokens, so the batches that come meanwhile run between two of its
tokens (`run_pending`, called by the generation's Watch): a prediction waits for one token, not for a whole
answer. Routing is restored after each batch (TaskAdapters.route), and the generation's cache is its own.
Generations waiting together for the inference thread run as one batch per model (`generate`,
Engine.generate_many), each row exactly as it would run alone.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from multitune.serving.engine import Asked, Engine, Part

T = TypeVar("T")


class Busy(Exception):
    """The queue is full: the client should retry later (HTTP 503)."""


@dataclass
class Job:
    parts: Sequence[Part]
    future: asyncio.Future[list[list[dict[str, Any]]]]

    @property
    def rows(self) -> int:
        return sum(len(rows) for _, rows in self.parts)


def early(jobs: Sequence[Job], loop: asyncio.AbstractEventLoop) -> Callable[[int, Any], None]:
    """Engine.run's `done` for a batch of jobs: a job's future is set (on the event loop) as soon as its last
    part is answered, before the rest of the batch is."""
    owner = [(j, k) for j, job in enumerate(jobs) for k in range(len(job.parts))]
    answers: list[list[Any]] = [[None] * len(job.parts) for job in jobs]
    left = [len(job.parts) for job in jobs]

    def resolve(job: Job, value: list[Any]) -> None:
        if not job.future.done():
            job.future.set_result(value)

    def done(p: int, answer: Any) -> None:  # on the inference thread
        j, k = owner[p]
        answers[j][k] = answer
        left[j] -= 1
        if left[j] == 0:
            loop.call_soon_threadsafe(resolve, jobs[j], answers[j])

    return done


class MicroBatcher:
    """One queue, one worker, one inference thread. Start it inside the server's event loop."""

    def __init__(self, engine: Engine, max_rows: int = 32, max_wait_ms: float = 0.0, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_rows, self.max_wait, self.max_queue = max_rows, max_wait_ms / 1000, max_queue
        self.observers: list[Callable[[int, float], None]] = []  # each batch's (rows, seconds), e.g. /metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multitune-inference")
        self.queue: asyncio.Queue[Job] | None = None
        self.worker: asyncio.Task[None] | None = None
        self.calls = 0  # work handed to the inference thread by `call`, queued or running
        # calls and generations in their order of arrival (numbered on the event loop): a generation that came
        # after a call still waiting (an admin change) runs after it, and takes no place in a running batch
        self._tickets = itertools.count()
        self._calls_waiting: set[int] = set()  # tickets of calls not started (nor given up) yet
        self._lock = threading.Lock()
        self.closing = False  # stop() began: no generation starts or joins any more
        # batches for the inference thread, run by whichever comes first there: their own task on the executor,
        # or a generation's next token (run_pending)
        self.pending: collections.deque[tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]]
        self.pending = collections.deque()
        # generations waiting for the inference thread, each with its future and loop: run together, as one
        # batch per model, by the first of their tasks on the executor to come (Engine.generate_many)
        self.generations: collections.deque[tuple[int, Asked, asyncio.Future[str], asyncio.AbstractEventLoop]]
        self.generations = collections.deque()

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.max_queue)
        self.worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        self.closing = True
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
        self.executor.shutdown(wait=True, cancel_futures=True)
        while self.generations:  # generations whose turn never came: their readers hear the end
            _, _, future, _ = self.generations.popleft()
            future.cancel()

    @property
    def depth(self) -> int:
        """Requests waiting for the inference thread: queued jobs, and calls queued or running on it."""
        return (self.queue.qsize() if self.queue is not None else 0) + self.calls

    async def submit(self, parts: Sequence[Part]) -> list[list[dict[str, Any]]]:
        """Each part's predictions, once a batch that holds them has run; Busy when the queue is full."""
        assert self.queue is not None, "MicroBatcher.start() was not called"
        self._admit()
        job = Job(parts, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)  # it has room: its bound is max_queue, and depth counts it
        return await job.future

    def call(self, function: Callable[..., T], *args: Any, rows: int = 0) -> asyncio.Future[T]:
        """Run `function` on the inference thread, between batches (one generation, an admin change). It
        counts toward the queue's bound (Busy when full) from now until it has run, even when its caller
        stops waiting; with `rows`, its time is reported to the observers as a batch of that many rows."""
        self._admit()
        loop = asyncio.get_running_loop()
        ticket, counted = next(self._tickets), [True]

        def uncount() -> None:  # on the event loop, once: it ran, or its caller gave up before it started
            if counted[0]:
                counted[0] = False
                self.calls -= 1

        def ran(seconds: float | None) -> None:  # on the event loop
            uncount()
            if rows and seconds is not None:
                for observe in self.observers:
                    observe(rows, seconds)

        def given_up(future: asyncio.Future[T]) -> None:  # on the event loop
            if future.cancelled():  # cancelled before it started, it never runs: it holds nothing back
                with self._lock:
                    self._calls_waiting.discard(ticket)
                uncount()

        def timed() -> T:  # on the inference thread
            with self._lock:
                self._calls_waiting.discard(ticket)
            started, seconds = time.perf_counter(), None
            try:
                result = function(*args)
                seconds = time.perf_counter() - started
                return result
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                    loop.call_soon_threadsafe(ran, seconds)

        with self._lock:
            self._calls_waiting.add(ticket)
        future = loop.run_in_executor(self.executor, timed)
        future.add_done_callback(given_up)
        self.calls += 1
        return future

    @property
    def calls_waiting(self) -> int:
        """Calls queued for the inference thread and not started yet."""
        with self._lock:
            return len(self._calls_waiting)

    def generate(self, asked: Asked) -> asyncio.Future[str]:
        """The text of one generation, run on the inference thread together with the other generations waiting
        then (up to `max_rows`; Engine.generate_many batches them per model), or joining a batch that runs
        already (continuous batching, on a decoder-only LM). It counts toward the queue's bound (Busy when
        full) until it has ended; its error (TaskGone, Cancelled) is the future's."""
        self._admit()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self.generations.append((next(self._tickets), asked, future, loop))
        self.calls += 1
        self.executor.submit(self._generate_waiting)
        return future

    def _generate_waiting(self) -> None:
        """On the inference thread: every generation waiting now (up to max_rows), in one generate_many call
        that more may join while it runs, each future settled as soon as its generation ends; nothing when an
        earlier call took them. Batches of predictions waiting meanwhile run between its steps."""
        owed: dict[int, tuple[asyncio.Future[str], asyncio.AbstractEventLoop]] = {}
        taken_in_all = [0]  # every generation this call ran, the ones that joined included

        def take(accept: Callable[[Asked], bool], room: int) -> list[Asked]:
            taken: list[Asked] = []
            with self._lock:  # a generation queued after a call still waiting runs after that call
                barrier = min(self._calls_waiting, default=None)
            while self.generations and len(taken) < room and not self.closing:
                ticket, asked, _, _ = self.generations[0]
                if (barrier is not None and ticket > barrier) or not accept(asked):
                    break  # it runs after this batch; none behind it passes it
                _, _, future, loop = self.generations.popleft()
                owed[id(asked)] = (future, loop)
                taken.append(asked)
            taken_in_all[0] += len(taken)
            return taken

        def done(asked: Asked, result: str | BaseException) -> None:
            future, loop = owed.pop(id(asked))
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                loop.call_soon_threadsafe(self._settle, future, result)

        first = take(lambda _: True, self.max_rows)
        if not first:
            return
        loop = owed[id(first[0])][1]
        started = time.perf_counter()
        try:
            self.engine.generate_many(first, take, done, self.run_pending)
        except BaseException as error:  # a failure of the batch: each of its generations still owed hears of it
            for future, future_loop in list(owed.values()):
                with contextlib.suppress(RuntimeError):
                    future_loop.call_soon_threadsafe(self._settle, future, error)
            owed.clear()
        seconds = time.perf_counter() - started
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._observe, taken_in_all[0], seconds)

    def _settle(self, future: asyncio.Future[str], result: Any) -> None:  # on the event loop
        self.calls -= 1
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def _observe(self, rows: int, seconds: float) -> None:  # on the event loop
        for observe in self.observers:
            observe(rows, seconds)

    def _on_thread(self, function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`function(*args)` on the inference thread: by a task queued on its executor, or sooner, between two
        tokens of a generation running there (run_pending)."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.pending.append((done, function, args))
        self.executor.submit(self.run_pending)
        return asyncio.wrap_future(done)

    def run_pending(self) -> None:
        """Run the batches waiting for the inference thread, now; call it only on that thread (a generation
        calls it between its tokens). Each batch's result or error goes to its future."""
        while True:
            try:
                done, function, args = self.pending.popleft()
            except IndexError:
                return
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(function(*args))
            except BaseException as error:  # handed to the waiting worker, which answers its requests with it
                done.set_exception(error)

    def _admit(self) -> None:
        """Busy when `max_queue` requests wait or run already: queued jobs and generations alike."""
        if self.depth >= self.max_queue:
            raise Busy(f"the server is busy: {self.max_queue} requests are already queued; retry shortly")

    async def _work(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            rows = jobs[0].rows
            deadline = loop.time() + self.max_wait
            while rows < self.max_rows:
                if self.queue.empty():  # wait a little for company, not past the deadline
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                else:
                    job = self.queue.get_nowait()
                jobs.append(job)
                rows += job.rows
            live = [job for job in jobs if not job.future.done()]  # a client that left was cancelled
            if not live:
                continue
            try:
                started = loop.time()
                answers = await self._on_thread(
                    self.engine.run, [part for job in live for part in job.parts], early(live, loop)
                )
                for observe in self.observers:
                    observe(sum(job.rows for job in live), loop.time() - started)
            except Exception as error:  # a bug, not bad input (that is refused before queueing): 500s
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            start = 0
            for job in live:
                if not job.future.done():
                    job.future.set_result(answers[start : start + len(job.parts)])
                start += len(job.parts)
