"""The micro-batcher without a model: requests of several tasks share calls; a full queue refuses at once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def two_lora_tasks(tmp_path_factory):
    """An engine whose one LM serves two generation tasks through their own LoRA adapters ('copy', and 'echo'
    of another run joined as its adapter), beside the pretrained model ('base'); and the other run's folder."""
    import yaml

    from multitune.serving.engine import Engine
    from tests.serving.conftest import train, trained_generation_run

    served = trained_generation_run(tmp_path_factory, {"method": "lora", "r": 4})
    config = yaml.safe_load((served / "config.yaml").read_text())
    config["tasks"] = {"echo": config["tasks"]["copy"]}
    folder = tmp_path_factory.mktemp("echo")
    config["run"].update(name="echo", output_dir=str(folder / "runs"), seed=7)
    config["training"]["steps"] = 4
    other = train(folder, config)
    engine = Engine(served)
    engine.register(engine.loadable(other, "echo"))
    return engine, served, other


class Tokens:
    """A streamer that keeps what it is shown (the prompt, then each new token) and whether it ended."""

    def __init__(self) -> None:
        self.shown: list[list[int]] = []
        self.ended = 0

    def put(self, value: Any) -> None:
        self.shown.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended += 1


def test_generations_of_several_tasks_run_as_one_batch_each_as_it_runs_alone(two_lora_tasks):
    """Engine.generate_many: rows of two LoRA tasks share one batch (the pretrained model's rows their own),
    each row's text and streamed tokens equal to those of its generation alone, each held to its own limit."""
    from multitune.serving.engine import BASE, Asked, Engine, Watch

    engine, served, other = two_lora_tasks
    copy_alone, echo_alone = Engine(served), Engine(other)  # each task on its own run's model
    texts = ["a dog runs in paris", "the cat", "one two three four five six"]
    asked, expected = [], []
    for i, text in enumerate(texts):
        for task, alone in (("copy", copy_alone), ("echo", echo_alone)):
            limit = 6 if i != 1 else 2
            asked.append(Asked(task, engine.encode(task, [{"text": text}])[0], Watch(Tokens()), limit))
            expected.append(alone.generate_one(task, alone.encode(task, [{"text": text}])[0], None, limit))
    base_row = engine.encode_base(None, "the cat sat")
    asked.append(Asked(BASE, base_row, Watch(Tokens()), 4))
    expected.append(copy_alone.generate_one(BASE, base_row, None, 4))
    engine.stats.tasks_per_batch.clear()
    got = engine.generate_many(asked)
    assert got == expected
    assert engine.stats.tasks_per_batch == {2: 1, 1: 1}  # the six task rows in one batch, the base row apart
    for item, text in zip(asked, got, strict=True):
        streamed = item.watch.inner
        assert streamed.ended == 1 and item.watch.tokens <= item.max_new_tokens
        tokens = [t for [t] in streamed.shown[1:]]  # after the prompt, one token per step until its end
        decoded = engine.backbone.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert decoded == text


def test_a_batched_generation_whose_client_leaves_stops_for_it_alone(two_lora_tasks):
    from multitune.serving.engine import Asked, Cancelled, Watch

    engine, _, _ = two_lora_tasks

    class Leaving(Tokens):
        def __init__(self, watch_of: list[Watch]) -> None:
            super().__init__()
            self.watch_of = watch_of

        def put(self, value: Any) -> None:
            super().put(value)
            if len(self.shown) == 2:  # its first new token: the client leaves
                self.watch_of[0].cancel.set()

    rows = [engine.encode("copy", [{"text": text}])[0] for text in ("a dog runs", "the cat sits down")]
    alone = engine.generate_one("copy", rows[1], None, 6)
    holder: list[Watch] = []
    leaving = Watch(Leaving(holder))
    holder.append(leaving)
    staying = Watch(Tokens())
    got = engine.generate_many([Asked("copy", rows[0], leaving, 6), Asked("copy", rows[1], staying, 6)])
    assert isinstance(got[0], Cancelled) and got[1] == alone
    assert leaving.inner.ended == 1 and leaving.tokens == 1 and staying.inner.ended == 1
    everyone_leaves = Watch(Leaving([]))
    everyone_leaves.inner.watch_of.append(everyone_leaves)
    [gone] = engine.generate_many([Asked("copy", rows[0], everyone_leaves, 6)])
    assert isinstance(gone, Cancelled) and everyone_leaves.tokens == 1  # stopped at once, not run to its limit


def test_generations_waiting_together_run_in_one_call(two_lora_tasks):
    """MicroBatcher.generate: generations queued while the inference thread is busy run in one generate_many
    call when it is free, each future getting its own text."""
    import threading

    from multitune.serving.engine import Asked

    engine, _, _ = two_lora_tasks
    rows = [engine.encode(task, [{"text": "a dog runs in paris"}])[0] for task in ("copy", "echo", "copy")]
    alone = [engine.generate_one(task, row, None, 5) for task, row in zip(("copy", "echo", "copy"), rows, strict=True)]
    calls: list[int] = []
    free = threading.Event()

    async def scenario() -> list[str]:
        batcher = MicroBatcher(engine, max_rows=8)
        await batcher.start()
        try:
            busy = batcher.call(free.wait, 20)  # the inference thread is held until the three are queued
            futures = [
                batcher.generate(Asked(task, row, None, 5))
                for task, row in zip(("copy", "echo", "copy"), rows, strict=True)
            ]
            assert batcher.depth == 4
            free.set()
            await busy
            return list(await asyncio.gather(*futures))
        finally:
            await batcher.stop()

    with generate_many_calls(engine, calls.append):
        assert asyncio.run(scenario()) == alone
    assert calls == [3]


def test_a_batch_stops_once_every_row_has_ended(two_lora_tasks):
    """One row ends at its own limit, the other at its end of sequence: no further step runs (generate alone
    would go on to the longest limit), so nothing waits behind forwards whose tokens nobody keeps."""
    from multitune.serving.engine import Asked, Watch

    engine, _, _ = two_lora_tasks
    model = engine._model("copy")
    tokenizer = engine.backbone.tokenizer
    short, ending = engine.encode("echo", [{"text": "the cat"}])[0], engine.encode("copy", [{"text": "the cat"}])[0]
    first = Watch(Tokens())
    engine.generate_one("copy", ending, first, 3)
    eos = first.inner.shown[1][0]  # its first new token, taken as the end of sequence below
    forwards = [0]
    hook = model.backbone.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    real_eos = tokenizer.eos_token_id
    try:
        tokenizer.eos_token_id = eos
        got = engine.generate_many(
            [Asked("echo", short, Watch(Tokens()), 1), Asked("copy", ending, Watch(Tokens()), 20)]
        )
    finally:
        tokenizer.eos_token_id = real_eos
        hook.remove()
    assert got[1] == tokenizer.decode([eos], skip_special_tokens=True).strip() or got[1] == ""
    assert forwards[0] == 1  # one step made both rows' last tokens; 20 before the fix


@pytest.mark.parametrize("failing", ["prefill", "step"])
def test_a_failing_forward_fails_the_rows_it_ran_only(two_lora_tasks, failing):
    """One row at a time (batch_size 1): when the second row's prefill, or the first row's second step,
    raises, that row fails; the rows before and after keep their texts, and every watch hears its end."""
    from multitune.serving.engine import Asked, Watch

    engine, _, _ = two_lora_tasks
    model = engine._model("copy")
    texts = ["a b", "a much longer prompt than that", "the longest prompt of all three of these prompts"]
    rows = [engine.encode("copy", [{"text": text}])[0] for text in texts]
    alone = [model.generate_texts([list(row.input_ids)], 3, engine.pad_id, "copy")[0] for row in rows]
    calls = {"prefill": 0, "step": 0}

    def fails(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        kind = "prefill" if kwargs["input_ids"].shape[1] > 1 else "step"
        calls[kind] += 1
        if kind == failing and calls[kind] == 2:
            raise RuntimeError("out of memory (simulated)")

    watches = [Watch(Tokens()) for _ in rows]
    engine.batch_size, size = 1, engine.batch_size
    hook = model.backbone.register_forward_pre_hook(fails, with_kwargs=True)
    try:
        got = engine.generate_many([Asked("copy", row, watch, 3) for row, watch in zip(rows, watches, strict=True)])
    finally:
        engine.batch_size = size
        hook.remove()
    broken = 1 if failing == "prefill" else 0
    for i, text in enumerate(got):
        if i == broken:
            assert isinstance(text, RuntimeError) and "simulated" in str(text)
        else:
            assert text == alone[i]
    assert [watch.inner.ended for watch in watches] == [1, 1, 1]


class Gate(Tokens):
    """A streamer that, at its `at`-th new token, holds the inference thread until `ready()` (20 s at most)."""

    def __init__(self, at: int, ready: Any) -> None:
        super().__init__()
        self.at, self.ready = at, ready

    def put(self, value: Any) -> None:
        super().put(value)
        deadline = time.monotonic() + 20
        while len(self.shown) == self.at + 1 and not self.ready() and time.monotonic() < deadline:
            time.sleep(0.005)


def test_generations_arriving_during_a_generation_join_it_and_end_first(two_lora_tasks):
    """Continuous batching: two generations queued while a long one runs join its batch between two steps
    (no second generate_many call), end and are answered while it still runs, and every text equals
    transformers' generate of that row alone through its own adapter."""
    import threading

    from multitune.serving.engine import Asked, Watch

    engine, _, _ = two_lora_tasks
    model, pad = engine._model("copy"), engine.pad_id
    long_row = engine.encode("copy", [{"text": "one two three four five six"}])[0]
    [long_alone] = model.generate_texts([list(long_row.input_ids)], 30, pad, "copy")
    shorts = [(task, engine.encode(task, [{"text": "a dog runs in paris"}])[0]) for task in ("copy", "echo")]
    shorts_alone = [model.generate_texts([list(row.input_ids)], 3, pad, task)[0] for task, row in shorts]
    calls: list[int] = []
    answered = threading.Event()

    async def scenario() -> tuple[str, list[str], bool]:
        batcher = MicroBatcher(engine, max_rows=8)
        await batcher.start()
        # the long row holds the thread at its 2nd token until both are queued, at its 20th until they are answered
        gate = Gate(2, lambda: len(batcher.generations) == 2)
        later = Gate(20, answered.is_set)
        try:
            long = batcher.generate(Asked("copy", long_row, Watch(Both(gate, later)), 30))
            while len(gate.shown) < 3:
                await asyncio.sleep(0.005)
            texts = list(await asyncio.gather(*(batcher.generate(Asked(t, row, None, 3)) for t, row in shorts)))
            still_running = not long.done()
            answered.set()
            return await long, texts, still_running
        finally:
            await batcher.stop()

    with generate_many_calls(engine, calls.append):
        long_text, texts, still_running = asyncio.run(scenario())
    assert calls == [1]  # the two joined the running batch
    assert still_running and texts == shorts_alone and long_text == long_alone


class Both:
    """Two streamers shown the same tokens."""

    def __init__(self, *streamers: Any) -> None:
        self.streamers = streamers

    def put(self, value: Any) -> None:
        for streamer in self.streamers:
            streamer.put(value)

    def end(self) -> None:
        for streamer in self.streamers:
            streamer.end()


def test_an_admin_change_queued_during_a_generation_runs_before_later_generations(two_lora_tasks):
    """A change queued by `call` (loading or unloading a task) while a generation runs stops rows joining it:
    the change runs when that batch ends, before a generation queued after it, which then runs on its own."""
    from multitune.serving.engine import Asked, Watch

    engine, _, _ = two_lora_tasks
    row = engine.encode("copy", [{"text": "one two three four five six"}])[0]
    order: list[str] = []

    async def scenario() -> None:
        batcher = MicroBatcher(engine, max_rows=8)
        await batcher.start()
        gate = Gate(2, lambda: batcher.calls_waiting == 1 and len(batcher.generations) == 1)
        try:
            first = batcher.generate(Asked("copy", row, Watch(gate), 8))
            while len(gate.shown) < 3:
                await asyncio.sleep(0.005)
            change = batcher.call(order.append, "change")
            await asyncio.sleep(0)
            second = batcher.generate(Asked("echo", row, None, 3))
            await asyncio.gather(first, change, second)
        finally:
            await batcher.stop()

    with generate_many_calls(engine, lambda n: order.append(f"generate {n}")):
        asyncio.run(scenario())
    assert order == ["generate 1", "change", "generate 1"]


@contextlib.contextmanager
def generate_many_calls(engine: Any, record: Any) -> Iterator[None]:
    """Within the block, each engine.generate_many call's number of generations is passed to `record`."""
    many = engine.generate_many

    def counted(asked: Any, *rest: Any) -> Any:
        record(len(asked))
        return many(asked, *rest)

    engine.generate_many = counted
    try:
        yield
    finally:
        engine.generate_many = many


def test_rows_of_another_batch_taken_together_do_not_wait_behind_a_running_one(two_lora_tasks):
    """A task row and a base row taken together: the batch that takes arriving rows runs last, so rows that
    keep arriving for the task's batch cannot hold the base row back."""
    from multitune.serving.engine import BASE, Asked

    engine, _, _ = two_lora_tasks
    row = engine.encode("copy", [{"text": "a dog runs"}])[0]
    base_row = engine.encode_base(None, "the cat sat")
    arriving = [Asked("copy", row, None, 3) for _ in range(20)]
    offered: list[int] = []

    def more(accept: Any, room: int) -> list[Any]:
        taken = []
        while arriving and len(taken) < room and accept(arriving[0]):
            taken.append(arriving.pop(0))
        offered.append(len(taken))
        return taken

    ended: list[str] = []
    engine.generate_many(
        [Asked("copy", row, None, 3), Asked(BASE, base_row, None, 3)], more, lambda item, _: ended.append(item.task)
    )
    assert ended == ["copy", BASE] and len(arriving) == 20  # the base batch takes no task rows; none passed it


def test_a_model_whose_generation_config_is_not_plain_greedy_generates_through_transformers(two_lora_tasks):
    """A repetition penalty (from the checkpoint's generation_config) changes greedy decoding: such a model
    takes no rows mid-run and generates through transformers' generate, which applies it."""
    from multitune.models.decoding import can_join
    from multitune.serving.engine import Asked

    engine, _, _ = two_lora_tasks
    model = engine._model("copy")
    row = engine.encode("copy", [{"text": "one two three four five six"}])[0]
    plain = engine.generate_many([Asked("copy", row, None, 12)])
    config = model.backbone.generation_config
    config.repetition_penalty, before = 5.0, config.repetition_penalty
    try:
        assert not can_join(model)
        penalised = engine.generate_many([Asked("copy", row, None, 12)])
        [expected] = model.generate_texts([list(row.input_ids)], 12, engine.pad_id, "copy")
    finally:
        config.repetition_penalty = before
    assert can_join(model)
    assert penalised == [expected] and penalised != plain


def test_stopping_the_server_runs_no_queued_generation(two_lora_tasks):
    """stop() while a generation runs: it ends, and the generations still queued are cancelled, not run
    (they would otherwise join the running batch one after another)."""
    from multitune.serving.engine import Asked, Watch

    engine, _, _ = two_lora_tasks
    row = engine.encode("copy", [{"text": "one two three four five six"}])[0]
    calls: list[int] = []

    async def scenario() -> list[bool]:
        batcher = MicroBatcher(engine, max_rows=8)
        await batcher.start()
        gate = Gate(2, lambda: batcher.closing)
        first = batcher.generate(Asked("copy", row, Watch(gate), 8))
        while len(gate.shown) < 3:
            await asyncio.sleep(0.005)
        queued = [batcher.generate(Asked("echo", row, None, 4)) for _ in range(3)]
        await batcher.stop()
        await asyncio.sleep(0.05)  # the first generation's answer, sent while stop() held the loop
        return [first.done() and not first.cancelled(), *(q.cancelled() for q in queued)]

    with generate_many_calls(engine, calls.append):
        assert asyncio.run(scenario()) == [True, True, True, True]
    assert calls == [1]


def test_a_call_given_up_before_it_ran_holds_no_generation_back(two_lora_tasks):
    """A `call` whose caller is cancelled before it starts is not counted as waiting (nor in the queue's
    depth): later generations still join running batches."""
    import threading

    engine, _, _ = two_lora_tasks
    free = threading.Event()

    async def scenario() -> tuple[int, int, int]:
        batcher = MicroBatcher(engine, max_rows=8)
        await batcher.start()
        try:
            busy = batcher.call(free.wait, 20)
            change = batcher.call(lambda: None)
            waiting = batcher.calls_waiting
            change.cancel()
            await asyncio.sleep(0.01)
            after = (batcher.calls_waiting, batcher.depth)
            free.set()
            await busy
            return waiting, *after
        finally:
            await batcher.stop()

    waiting, after, depth = asyncio.run(scenario())
    assert waiting == 1 and after == 0 and depth == 1  # only the call that runs still counts
