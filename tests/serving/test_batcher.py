"""The micro-batcher without a model: requests of several tasks share calls; a full queue refuses at once."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from multitune.serving.batcher import Busy, MicroBatcher
from multitune.serving.engine import padded_chunks


class FakeEngine:
    """Answers each row with its task and value; remembers the parts of every call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[list[Any]] = []
        self.delay = delay
        self.release = threading.Event()

    def run(self, parts: list[Any], done: Any = None) -> list[list[dict[str, Any]]]:
        self.calls.append(list(parts))
        answers = []
        for p, (task, rows) in enumerate(parts):  # one part after another, each told as soon as it is answered
            time.sleep(self.delay / max(len(parts), 1))
            answers.append([{"prediction": f"{task}:{row}"} for row in rows])
            if done is not None:
                done(p, answers[-1])
        return answers


def test_concurrent_requests_of_several_tasks_share_a_call():
    engine = FakeEngine(delay=0.05)

    async def scenario() -> list[Any]:
        batcher = MicroBatcher(engine, max_rows=64, max_wait_ms=20)  # type: ignore[arg-type]
        await batcher.start()
        try:
            calls = [batcher.submit([(task, [i])]) for i in range(12) for task in ("a", "b")]
            return list(await asyncio.gather(*calls))
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    assert [a[0][0]["prediction"] for a in answers] == [f"{t}:{i}" for i in range(12) for t in ("a", "b")]
    assert len(engine.calls) < 24 and any({task for task, _ in call} == {"a", "b"} for call in engine.calls)


def test_a_request_is_answered_when_its_own_rows_are_not_when_the_whole_call_ends():
    engine = FakeEngine(delay=0.6)  # three parts in one call, 0.2 s each

    async def scenario() -> list[float]:
        batcher = MicroBatcher(engine, max_rows=64, max_wait_ms=50)  # type: ignore[arg-type]
        await batcher.start()
        began = time.perf_counter()
        answered: list[float] = []

        async def one(task: str) -> None:
            await batcher.submit([(task, [0])])
            answered.append(time.perf_counter() - began)

        try:
            await asyncio.gather(*(one(task) for task in ("a", "b", "c")))
        finally:
            await batcher.stop()
        return answered

    answered = asyncio.run(scenario())
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 3
    # all at the call's end, the three answers would come together; told part by part, 0.4 s apart
    assert answered[2] - answered[0] > 0.2, answered


def test_a_full_queue_refuses_with_busy():
    engine = FakeEngine(delay=0.3)

    async def scenario() -> None:
        batcher = MicroBatcher(engine, max_rows=1, max_wait_ms=0, max_queue=2)  # type: ignore[arg-type]
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit([("a", [0])]))
            await asyncio.sleep(0.05)  # the worker took it: the model is busy
            waiting = [asyncio.ensure_future(batcher.submit([("a", [i])])) for i in (1, 2)]
            await asyncio.sleep(0)
            with pytest.raises(Busy, match="busy"):
                await batcher.submit([("a", [3])])
            await asyncio.gather(first, *waiting)
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_padded_chunks_split_where_padding_would_cost_more_than_a_forward():
    lengths = [5, 6, 8, 10, 120, 125]
    chunks = padded_chunks(list(range(6)), lengths, batch_size=3, slack=64)
    assert chunks == [[0, 1, 2], [3], [4, 5]]
    assert padded_chunks([0, 1], [5, 5], batch_size=8) == [[0, 1]]


def test_the_engine_tells_each_part_as_its_rows_are_answered(tiny_run):
    """Engine.run's `done`: each part is told once its last row is answered, rows in length order (the short
    part first, though it came second), with the answer the call returns."""
    from multitune.serving.engine import Engine

    engine = Engine(tiny_run)
    long = {"text": " ".join(["good"] * 25)}
    parts = [
        ("sentiment", engine.encode("sentiment", [long])),
        ("sentiment", engine.encode("sentiment", [{"text": "bad"}])),
    ]
    told: list[tuple[int, Any]] = []
    returned = engine.run(parts, lambda p, answer: told.append((p, answer)))
    assert [p for p, _ in told] == [1, 0]
    assert [answer for _, answer in sorted(told, key=lambda item: item[0])] == returned


def test_a_prediction_runs_between_the_tokens_of_a_generation(tmp_path_factory):
    """A generation holds the inference thread for all its tokens: a prediction queued meanwhile runs
    between two of them (before the generation ends), through its own task's adapter, and both answers
    equal those each gives alone (the generation's routing is restored after the prediction's batch)."""
    from multitune.serving.engine import Engine, Watch
    from tests.serving.conftest import trained_generation_run

    engine = Engine(trained_generation_run(tmp_path_factory, {"method": "lora", "r": 4}))
    prompt = engine.encode("copy", [{"text": "a dog runs in paris"}])[0]
    asked = engine.encode("copy", [{"text": "the cat sits"}])
    alone_text = engine.generate_one("copy", prompt, None, 6)
    alone_prediction = engine.run([("copy", asked)])
    order: list[str] = []  # on the inference thread
    run = engine.run

    def recorded_run(*args: Any) -> Any:
        order.append("prediction")
        return run(*args)

    engine.run = recorded_run  # type: ignore[method-assign]

    async def scenario() -> tuple[Any, str]:
        batcher = MicroBatcher(engine, max_rows=8)
        await batcher.start()

        class Holding:  # the generation's streamer: at its first new token, waits until a prediction is queued
            seen = 0

            def put(self, value: Any) -> None:
                self.seen += 1
                deadline = time.monotonic() + 20
                while self.seen == 2 and not batcher.pending and time.monotonic() < deadline:
                    time.sleep(0.01)

            def end(self) -> None:
                order.append("generation ended")

        try:
            generation = batcher.call(engine.generate_one, "copy", prompt, Watch(Holding(), batcher.run_pending), 6)
            prediction = await batcher.submit([("copy", asked)])
            return prediction, await generation
        finally:
            await batcher.stop()

    prediction, text = asyncio.run(scenario())
    assert order == ["prediction", "generation ended"]
    assert prediction == alone_prediction and text == alone_text
