"""Generation tasks over HTTP: batched answers and streamed tokens equal `multitune predict`."""

from __future__ import annotations

import json

import pytest

from multitune.cli import main
from tests.serving.conftest import running_server

httpx = pytest.importorskip("httpx")


@pytest.mark.parametrize("run", ["generation_run", "prefix_generation_run"])
def test_generation_streams_and_equals_multitune_predict(run, tmp_path, request):
    generation_run = request.getfixturevalue(run)
    records = [{"text": "the cat sits"}, {"text": "a dog runs in paris"}]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert main(["predict", str(generation_run), "--task", "copy", "--input", str(source), "--output", str(out)]) == 0
    expected = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    with running_server(generation_run) as url:
        body = httpx.post(f"{url}/v1/tasks/copy/predict", json={"inputs": records}, timeout=60).json()
        assert [p["prediction"] for p in body["predictions"]] == expected
        plain = httpx.post(f"{url}/v1/tasks/copy/generate", json={"input": records[1]}, timeout=60).json()
        assert plain["prediction"] == expected[1]
        with httpx.stream(
            "POST", f"{url}/v1/tasks/copy/generate", json={"input": records[1], "stream": True}, timeout=60
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [block for block in response.read().decode().split("\n\n") if block]
        kinds = [block.splitlines()[0].removeprefix("event: ") for block in events]
        assert kinds[-1] == "done" and set(kinds[:-1]) <= {"token"}
        done = json.loads(events[-1].splitlines()[1].removeprefix("data: "))
        assert done["prediction"] == expected[1]
        streamed = "".join(json.loads(b.splitlines()[1].removeprefix("data: "))["token"] for b in events[:-1])
        assert streamed.strip() == expected[1]


def test_openai_clients_call_the_generation_tasks(generation_run, tmp_path):
    """The official `openai` client against the real server: the models list, chat and text completions,
    whole and streamed, each equal to `multitune predict` on the same input; a bad model is the client's 404."""
    openai = pytest.importorskip("openai")
    record = {"text": "a dog runs in paris"}
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps(record) + "\n", encoding="utf-8")
    assert main(["predict", str(generation_run), "--task", "copy", "--input", str(source), "--output", str(out)]) == 0
    expected = json.loads(out.read_text())["prediction"]
    with running_server(generation_run) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["copy"]
        chat = client.chat.completions.create(model="copy", messages=[{"role": "user", "content": record["text"]}])
        assert chat.choices[0].message.content == expected
        # cut at the task's max_new_tokens (6), or ended by the model: OpenAI's "length" or "stop"
        ended = "length" if chat.usage.completion_tokens == 6 else "stop"
        assert chat.choices[0].finish_reason == ended
        assert chat.usage.prompt_tokens > 0 and chat.model == "copy"
        stream = client.chat.completions.create(
            model="copy", messages=[{"role": "user", "content": record["text"]}], stream=True
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == ended
        assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == expected
        text = client.completions.create(model="copy", prompt=record["text"])
        assert text.choices[0].text == expected
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(model="copy", prompt="a dog runs in paris", stream=True)
        )
        assert streamed.strip() == expected
        short = client.completions.create(model="copy", prompt=record["text"], max_tokens=1)
        assert short.usage.completion_tokens <= 1
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nothing", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.UnprocessableEntityError):
            client.chat.completions.create(model="copy", messages=[{"role": "system", "content": "x"}])


def test_two_prefix_tasks_in_one_request_each_answered_through_its_own_prefix(tmp_path_factory, tmp_path):
    """A run with a prefix per generation task: one /v1/predict call mixing both tasks' records answers each
    as `multitune predict` does for that task alone (its own prefix, not the other's or none)."""
    import torch
    from starlette.testclient import TestClient

    from multitune.serving.app import create_app
    from multitune.serving.engine import Engine
    from tests.generation.conftest import build_tiny_causal_lm, copy_rows
    from tests.serving.conftest import train, write_rows

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("two-prefix-run")
    lm = build_tiny_causal_lm(folder / "lm")
    task = {"type": "generation", "label_field": "target", "metrics": ["exact_match"], "max_new_tokens": 5}
    constant = [{"text": row["text"], "target": "paris"} for row in copy_rows(20, 2)]  # one answer to learn
    config = {
        "run": {"name": "two", "output_dir": str(folder / "runs"), "seed": 3},
        "model": {"backbone": str(lm), "max_length": 48, "peft": {"method": "prefix", "virtual_tokens": 4}},
        "training": {"steps": 30, "batch_size": 8, "lr": 0.3, "eval_every": 30, "progress": False,
                     "mixed_batches": True},
        "tasks": {
            "copy": {**task, "instruction": "translate",
                     "source": {"format": "jsonl", "train": str(write_rows(folder / "a.jsonl", copy_rows(20)))}},
            "echo": {**task, "instruction": "repeat",
                     "source": {"format": "jsonl", "train": str(write_rows(folder / "b.jsonl", constant))}},
        },
    }  # fmt: skip
    run = train(folder, config)
    records = [{"text": "the cat sits"}, {"text": "a dog runs in paris"}]
    expected = {}
    for name in ("copy", "echo"):
        source, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-out.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        assert main(["predict", str(run), "--task", name, "--input", str(source), "--output", str(out)]) == 0
        expected[name] = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert expected["copy"] != expected["echo"], f"the two prefixes answer alike: {expected}"
    mixed = [{"task": name, "input": record} for record in records for name in ("echo", "copy")]
    with TestClient(create_app(Engine(run))) as client:
        body = client.post("/v1/predict", json={"inputs": mixed}).json()
    got = [answer["prediction"] for answer in body["predictions"]]
    assert got == [expected[item["task"]][records.index(item["input"])] for item in mixed]
