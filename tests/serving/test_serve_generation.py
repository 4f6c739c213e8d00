"""Generation tasks over HTTP: batched answers and streamed tokens equal `multitune predict`."""

from __future__ import annotations

import json

import pytest

from multitune.cli import main
from tests.serving.conftest import running_server

httpx = pytest.importorskip("httpx")


def test_generation_streams_and_equals_multitune_predict(generation_run, tmp_path):
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
