"""Generation over HTTP held to its bounds: the model's context, the queue's bound, stop sequences, a client
that leaves, a task unloaded while its stream waits. The run's LM never ends a text by itself (its
end-of-sequence row is zeroed), so only these bounds end one."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.serving.conftest import running_server, train, write_rows

httpx = pytest.importorskip("httpx")
ADMIN = "admin-s3cret"
CONTEXT = 1024  # the tiny LM's positions


@pytest.fixture(scope="module")
def endless_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generation tasks on a tiny Llama of CONTEXT positions whose end-of-sequence logit is always 0 (its
    tied embedding row zeroed after training), below the largest of the others: greedy never picks it."""
    import torch
    from safetensors.torch import load_file, save_file

    from tests.generation.conftest import build_tiny_causal_lm, copy_rows

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("endless")
    lm = build_tiny_causal_lm(folder / "lm", max_position_embeddings=CONTEXT)
    data = write_rows(folder / "copy.jsonl", copy_rows(30))
    task = {"type": "generation", "source": {"format": "jsonl", "train": str(data)}, "label_field": "target"}
    config = {
        "run": {"name": "endless", "output_dir": str(folder / "runs"), "seed": 3},
        "model": {"backbone": str(lm), "max_length": 48},
        "training": {"steps": 2, "batch_size": 4, "lr": 1e-3, "eval_every": 2, "progress": False},
        "tasks": {"copy": {**task, "max_new_tokens": 4}, "echo": {**task, "max_new_tokens": 4}},
    }
    run = train(folder, config)
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(str(run / "backbone")).eos_token_id
    weights = load_file(str(run / "model.safetensors"))
    for name, tensor in weights.items():
        if "embed_tokens" in name or "lm_head" in name:
            tensor[eos] = 0.0
    save_file(weights, str(run / "model.safetensors"))
    return run


def completion(url: str, timeout: float = 60, **body: object) -> httpx.Response:
    body = {"model": "copy", "prompt": "the cat sits", **body}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)


def queue_depth(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name == "multitune_queue_depth":
            return float(family.samples[0].value)
    raise AssertionError("no multitune_queue_depth")


def test_max_tokens_finish_reason_stop_sequences_and_the_context(endless_run):
    with running_server(endless_run) as url:
        cut = completion(url, max_tokens=6).json()
        assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 6
        text = cut["choices"][0]["text"]
        stop = text.split()[-1]  # the text ends before the first place it appears
        stopped = completion(url, max_tokens=6, stop=[stop, "no such words here"]).json()
        assert stopped["choices"][0]["text"] == text[: text.index(stop)].strip()
        assert stopped["choices"][0]["finish_reason"] == "stop"
        body = {"model": "copy", "prompt": "the cat sits", "max_tokens": 6, "stop": stop, "stream": True}
        events = httpx.post(f"{url}/v1/completions", json=body, timeout=60).text.split("\n\n")
        chunks = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks).strip() == text[: text.index(stop)].strip()
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        # the prompt and max_tokens must fit in the model's positions: one line naming max_tokens, not a 500
        too_long = completion(url, max_tokens=CONTEXT)
        assert too_long.status_code == 422 and too_long.json()["detail"].startswith("max_tokens: the prompt takes")
        assert f"{CONTEXT}-token context" in too_long.json()["detail"]
        assert completion(url, max_tokens=CONTEXT - 40).status_code == 200  # what fits runs to the end of it
        assert completion(url, prompt="word " * 20_000).status_code == 422  # --max-chars holds here too
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "copy",
                "max_tokens": 2,
                "messages": [
                    {"role": "user", "content": "a dog"},
                    {"role": "assistant", "content": None},  # a tool-call turn carries no content
                    {"role": "user", "content": ""},
                ],
            },
            timeout=60,
        )
        assert chat.status_code == 422 and chat.json()["detail"].startswith("messages:"), chat.text
        assert httpx.get(f"{url}/v1/models/copy", timeout=10).json()["id"] == "copy"
        assert httpx.get(f"{url}/v1/models/nothing", timeout=10).status_code == 404
        for wrong in ({"max_tokens": "7"}, {"stream": "yes"}, {"stop": 5}):
            assert completion(url, **wrong).status_code == 422, wrong


def test_a_generation_counts_toward_the_queue_and_stops_when_its_client_leaves(endless_run):
    with running_server(endless_run, "--max-queue", "1") as url:
        started = time.monotonic()
        assert completion(url, max_tokens=CONTEXT - 40).status_code == 200
        whole = time.monotonic() - started  # one generation to the end of the context
        body = {"model": "copy", "prompt": "the cat sits", "max_tokens": CONTEXT - 40, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it runs
            busy = completion(url, max_tokens=2)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"  # the queue holds one
        left = time.monotonic()  # the stream's connection is closed here
        while queue_depth(url) > 0:
            assert time.monotonic() - left < max(whole / 2, 1.5), "the generation went on without its client"
            time.sleep(0.05)
        assert completion(url, max_tokens=2).status_code == 200


def test_a_stream_for_a_task_unloaded_while_it_waited_ends_and_the_server_stays_well(endless_run):
    """The stream is accepted, then its task is unloaded before the inference thread reaches it: the stream
    ends with an error event instead of waiting for ever, and streams keep working afterwards."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with running_server(endless_run, "--admin-token", ADMIN) as url:
        long = threading.Thread(target=completion, args=(url,), kwargs={"model": "echo", "max_tokens": CONTEXT - 40})
        long.start()
        time.sleep(0.3)  # the inference thread is busy with it
        unload = threading.Thread(
            target=httpx.delete, args=(f"{url}/v1/admin/tasks/copy",), kwargs={"headers": admin, "timeout": 60}
        )
        unload.start()
        time.sleep(0.2)  # queued after it: the copy stream below waits behind the unload
        for _ in range(3):  # three rounds once leaked reader threads until no stream answered
            body = {"model": "copy", "prompt": "a dog", "max_tokens": 4, "stream": True}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            assert reply.status_code in (200, 404), reply.text
            if reply.status_code == 200:
                assert '"error"' in reply.text and "[DONE]" not in reply.text
        long.join(60)
        unload.join(60)
        for _ in range(8):
            body = {"model": "echo", "prompt": "a dog", "max_tokens": 3, "stream": True}
            reply = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")


def test_a_prompt_that_fills_the_context_generates_nothing_and_still_ends_its_stream(endless_run):
    from transformers import TextIteratorStreamer

    from multitune.data.tokens import Encoded
    from multitune.serving.engine import Engine, Watch

    engine = Engine(endless_run)
    row = Encoded([7] * CONTEXT, None, None, prompt_length=CONTEXT)  # no position left after it
    assert engine.generation_limit("copy", CONTEXT) == 0
    streamer = TextIteratorStreamer(engine.backbone.tokenizer, skip_prompt=True, timeout=5)
    watch = Watch(streamer)
    assert engine.generate_one("copy", row, watch) == ""
    assert list(streamer) == [""] and watch.tokens == 0  # the reader hears the end at once


def test_the_context_counts_the_positions_a_prefix_puts_in_front(prefix_generation_run):
    from multitune.serving.engine import Engine

    model = Engine(prefix_generation_run).models[0]
    # the tiny LM's 256 positions, less the prefix's 4 virtual tokens, less the prompt's 10
    assert model.context_room(10) == 256 - 4 - 10


def test_an_admin_load_compares_tokenizers_without_their_last_truncation_state(endless_run):
    from transformers import AutoTokenizer

    from multitune.serving.engine import input_difference

    a = AutoTokenizer.from_pretrained(str(endless_run / "backbone"))
    b = AutoTokenizer.from_pretrained(str(endless_run / "backbone"))
    b("a dog", truncation=True, max_length=8)  # leaves truncation on in its backend, as a classification encode
    assert input_difference(a, b) is None
    b.add_tokens(["zzz-new-token"])
    assert input_difference(a, b) is not None
