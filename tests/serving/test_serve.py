"""The real server process over loopback HTTP: answers equal `multitune predict`, bad input is a 4xx, auth."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multitune.cli import main
from tests.serving.conftest import TOKEN, running_server

httpx = pytest.importorskip("httpx")

AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = [{"text": "a good movie"}, {"text": "bad"}, {"text": "the film was great and good"}, {"text": "terrible"}]
TOKENS = [{"tokens": ["john", "runs", "in", "paris"]}, {"tokens": ["mary", "likes", "london", "a", "lot"]}]


@pytest.fixture(scope="module")
def server(tiny_run: Path) -> Iterator[str]:
    with running_server(
        tiny_run, "--max-inputs", "8", "--max-chars", "200", env={"MULTITUNE_SERVE_TOKEN": TOKEN}
    ) as url:
        yield url


def cli_predict(run: Path, task: str, records: list[dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    source, out = tmp_path / f"{task}-in.jsonl", tmp_path / f"{task}-out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert main(["predict", str(run), "--task", task, "--input", str(source), "--output", str(out)]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def same(served: dict[str, Any], expected: dict[str, Any]) -> None:
    assert served["prediction"] == expected["prediction"]
    if "probabilities" in expected:
        assert served["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)


def test_predictions_equal_multitune_predict(server, tiny_run, tmp_path):
    expected = {"sentiment": cli_predict(tiny_run, "sentiment", TEXTS, tmp_path)}
    expected["ner"] = cli_predict(tiny_run, "ner", TOKENS, tmp_path)
    for task, records in (("sentiment", TEXTS), ("ner", TOKENS)):
        response = httpx.post(f"{server}/v1/tasks/{task}/predict", json={"inputs": records}, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["task"] == task and len(body["predictions"]) == len(records)
        for served, want in zip(body["predictions"], expected[task], strict=True):
            same(served, want)
    one = httpx.post(f"{server}/v1/tasks/sentiment/predict", json={"input": TEXTS[0]}, headers=AUTH).json()
    same(one["predictions"][0], expected["sentiment"][0])

    # several tasks in one request: one backbone forward serves both, answers in request order
    mixed = [
        {"task": "ner", "input": TOKENS[0]},
        {"task": "sentiment", "input": TEXTS[1]},
        {"task": "ner", "input": TOKENS[1]},
    ]
    body = httpx.post(f"{server}/v1/predict", json={"inputs": mixed}, headers=AUTH).json()
    assert [p["task"] for p in body["predictions"]] == ["ner", "sentiment", "ner"]
    same(body["predictions"][0], expected["ner"][0])
    same(body["predictions"][1], expected["sentiment"][1])
    same(body["predictions"][2], expected["ner"][1])
    health = httpx.get(f"{server}/healthz").json()
    assert health["tasks_per_batch"].get("2", 0) >= 1  # a batch held rows of both tasks


def test_concurrent_requests_of_both_tasks_are_batched_and_answered_alike(server):
    async def fire() -> list[Any]:
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=30) as client:
            calls = [
                client.post(f"/v1/tasks/{task}/predict", json={"input": record})
                for _ in range(10)
                for task, record in (("sentiment", TEXTS[0]), ("ner", TOKENS[0]), ("sentiment", TEXTS[3]))
            ]
            return list(await asyncio.gather(*calls))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    answers = [r.json()["predictions"][0]["prediction"] for r in responses]
    assert answers[0::3] == [answers[0]] * 10 and answers[1::3] == [answers[1]] * 10
    health = httpx.get(f"{server}/healthz").json()
    assert health["rows"] >= 30 and health["batches"] < health["rows"]  # requests shared model calls


def test_64_clients_in_a_closed_loop_get_every_answer_within_the_bound(server):
    """64 clients, each sending its next request as soon as the last is answered, for a bounded time: every good
    request is a 200 with the same answer as alone, every bad one a 4xx, none waits past the bound, and the
    server still answers afterwards."""
    import time

    alone = {
        (task, json.dumps(record)): httpx.post(
            f"{server}/v1/tasks/{task}/predict", json={"input": record}, headers=AUTH, timeout=30
        ).json()["predictions"][0]["prediction"]
        for task, record in [("sentiment", TEXTS[0]), ("ner", TOKENS[1]), ("sentiment", TEXTS[2])]
    }
    bad = [("sentiment", {"txet": "typo"}), ("ner", {"tokens": "not a list"}), ("nope", TEXTS[0])]
    seen: list[tuple[int, float, bool]] = []  # status, seconds, whether the request was a good one
    wrong: list[str] = []

    async def client(k: int, until: float) -> None:
        good = list(alone)
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=60) as http:
            i = k
            while time.monotonic() < until:
                i += 1
                is_good = i % 8 != 0  # one request in eight is bad input
                task, record = (
                    (good[i % len(good)][0], json.loads(good[i % len(good)][1])) if is_good else bad[i % len(bad)]
                )
                started = time.monotonic()
                reply = await http.post(f"/v1/tasks/{task}/predict", json={"input": record})
                seen.append((reply.status_code, time.monotonic() - started, is_good))
                if is_good and reply.status_code == 200:
                    answer = reply.json()["predictions"][0]["prediction"]
                    if answer != alone[(task, json.dumps(record))]:
                        wrong.append(f"{task} {record}: {answer}")

    async def fire() -> None:
        until = time.monotonic() + 6.0
        await asyncio.gather(*(client(k, until) for k in range(64)))

    asyncio.run(fire())
    good = [(status, seconds) for status, seconds, is_good in seen if is_good]
    refused = [status for status, _, is_good in seen if not is_good]
    assert len(good) >= 64 and refused, (len(good), len(refused))
    assert {status for status, _ in good} == {200}, sorted({status for status, _ in good})
    assert all(400 <= status < 500 for status in refused), sorted(set(refused))
    assert not wrong, wrong[:3]
    assert max(seconds for _, seconds in good) < 30.0  # no request waits unboundedly behind the others
    assert httpx.get(f"{server}/healthz", timeout=10).status_code == 200


def test_tasks_and_openapi(server):
    tasks = httpx.get(f"{server}/v1/tasks", headers=AUTH).json()
    described = {t["name"]: t for t in tasks["tasks"]}
    assert described["sentiment"]["type"] == "classification"
    assert set(described["sentiment"]["labels"]) == {"pos", "neg"}
    assert described["ner"]["input_fields"] == ["tokens"] and "O" in described["ner"]["labels"]
    assert described["sentiment"]["metrics"]["main_metric"] == "accuracy"
    schema = httpx.get(f"{server}/openapi.json", headers=AUTH).json()
    assert {"/v1/tasks/{task}/predict", "/v1/predict", "/v1/tasks", "/healthz"} <= set(schema["paths"])


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/tasks/nope/predict", {"input": {"text": "a"}}, 404, "no task 'nope'"),
        ("/v1/tasks/sentiment/predict", {"inputs": []}, 422, "inputs"),
        ("/v1/tasks/sentiment/predict", {"inputs": [{"text": "a"}] * 9}, 422, "at most 8"),
        ("/v1/tasks/sentiment/predict", {"input": {"text": "x" * 201}}, 422, "at most 200 are allowed"),
        ("/v1/tasks/sentiment/predict", {"input": {"txt": "a"}}, 422, "input: field 'text': missing"),
        ("/v1/tasks/sentiment/predict", {"input": {"text": "a"}, "inputs": [{"text": "b"}]}, 422, "either"),
        ("/v1/tasks/sentiment/predict", {"input": {"text": "a"}, "extra": 1}, 422, "extra"),
        ("/v1/tasks/ner/predict", {"input": {"tokens": 3}}, 422, "tokens"),
        ("/v1/predict", {"inputs": [{"task": "nope", "input": {"text": "a"}}]}, 422, "inputs.0.task: no task 'nope'"),
        ("/v1/tasks/sentiment/generate", {"input": {"text": "a"}}, 422, "not a generation task"),
    ],
)
def test_bad_input_is_a_4xx_with_one_line(server, path, body, status, words):
    response = httpx.post(f"{server}{path}", json=body, headers=AUTH)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail


def test_malformed_and_oversized_bodies(server):
    bad = httpx.post(
        f"{server}/v1/tasks/sentiment/predict",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert bad.status_code == 422 and "JSON" in bad.json()["detail"]
    huge = httpx.post(f"{server}/v1/tasks/sentiment/predict", content=b"x" * 3_000_000, headers=AUTH)
    assert huge.status_code == 413


def test_auth_is_required_on_v1_only(server):
    assert httpx.get(f"{server}/healthz").status_code == 200
    missing = httpx.post(f"{server}/v1/tasks/sentiment/predict", json={"input": {"text": "a"}})
    assert missing.status_code == 401 and "bearer token" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(f"{server}/v1/tasks", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{server}/v1/tasks", headers=AUTH).status_code == 200


def test_a_token_record_longer_than_max_length_is_tagged_in_windows(server, tiny_run, tmp_path):
    """max_length 32: 30 one-piece words per window, the next window 15 words on; a word is tagged by the window
    where it has the most context (worked out in tests/unit/test_windows.py): words 0-22 from words 0-29, 23-37
    from words 15-44, 38-49 from words 30-49. Each window alone is a short record: its tags are the reference."""
    words = ["john", "in", "paris", "a", "dog"] * 10  # 50 words, one sub-token each, 150 characters
    whole = cli_predict(tiny_run, "ner", [{"tokens": words}], tmp_path)[0]["prediction"]
    first, second, third = (
        p["prediction"]
        for p in cli_predict(
            tiny_run, "ner", [{"tokens": words[0:30]}, {"tokens": words[15:45]}, {"tokens": words[30:]}], tmp_path
        )
    )
    expected = first[:23] + second[8:23] + third[8:]
    assert len(expected) == 50 and whole == expected
    assert expected[30:] != ["O"] * 20  # past the cut-off, where every word used to be tagged "O"
    served = httpx.post(f"{server}/v1/tasks/ner/predict", json={"input": {"tokens": words}}, headers=AUTH)
    assert served.status_code == 200, served.text
    assert served.json()["predictions"][0]["prediction"] == expected
    mixed = [{"task": "ner", "input": {"tokens": words}}, {"task": "ner", "input": {"tokens": words[:5]}}]
    body = httpx.post(f"{server}/v1/predict", json={"inputs": mixed}, headers=AUTH).json()
    assert body["predictions"][0]["prediction"] == expected
    assert (
        body["predictions"][1]["prediction"]
        == cli_predict(tiny_run, "ner", [{"tokens": words[:5]}], tmp_path)[0]["prediction"]
    )


def test_evaluation_tags_a_sentence_longer_than_max_length_in_windows(tiny_run, tmp_path):
    """Validation and test scoring tag a long sentence as predict does, not with its words past the cut-off
    scored as "O": token accuracy on a 50-word test sentence equals that of `multitune predict`'s tags."""
    import shutil

    import yaml

    from multitune.runs.evaluate import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    words = ["john", "in", "paris", "a", "dog"] * 10
    gold = ["B-per" if w == "john" else "B-loc" if w == "paris" else "O" for w in words]
    test_file = tmp_path / "long.jsonl"
    short = {"tokens": ["mary", "in", "london"], "tags": ["B-per", "O", "B-loc"]}  # one window: both kinds at once
    test_file.write_text(json.dumps({"tokens": words, "tags": gold}) + "\n" + json.dumps(short) + "\n", "utf-8")
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["tasks"]["ner"]["source"]["test"] = str(test_file)
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    tags, short_tags = (
        p["prediction"] for p in cli_predict(run, "ner", [{"tokens": words}, {"tokens": short["tokens"]}], tmp_path)
    )
    assert tags[30:] != ["O"] * 20  # the model tags words past the cut-off: truncation would change the score
    pairs = [*zip(tags, gold, strict=True), *zip(short_tags, short["tags"], strict=True)]
    expected = sum(p == g for p, g in pairs) / len(pairs)
    result = evaluate_run(run, "test")["tasks"]["ner"]
    assert result["split"] == "test" and result["n"] == 2
    assert result["metrics"]["token_accuracy"] == pytest.approx(expected, abs=1e-6)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_each_response_by_route_and_status_in_prometheus_format(server: str) -> None:
    """Four answered predictions, one bad record, one request without the token, one unknown path: each
    counter moves by exactly that, the latency histogram counts them, and the batches hold the rows."""
    before = scrape(server)
    own = f"{server}/v1/tasks/sentiment/predict"
    for record in TEXTS:
        assert httpx.post(own, json={"input": record}, headers=AUTH).status_code == 200
    assert httpx.post(own, json={"input": {"wrong": 1}}, headers=AUTH).status_code == 422
    bad_json = {**AUTH, "content-type": "application/json"}  # refused by the body guard, before routing
    assert httpx.post(own, content=b'{"input": ', headers=bad_json).status_code == 422
    assert httpx.post(own, json={"input": TEXTS[0]}).status_code == 401
    assert httpx.get(f"{server}/nowhere").status_code == 404
    for made_up in ("FOOBAR", "QWERTY"):  # methods no route has: counted, under one label value
        assert httpx.request(made_up, f"{server}/x").status_code in (404, 405)
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    route = {"route": "/v1/tasks/sentiment/predict", "method": "POST"}
    assert moved("multitune_requests_total", **route, status="200") == 4
    assert moved("multitune_requests_total", **route, status="422") == 2  # the guard's refusal: its route too
    assert moved("multitune_requests_total", **route, status="401") == 1
    assert moved("multitune_requests_total", route="unmatched", method="GET", status="404") == 1
    made_up = [key for key in after if ("method", "FOOBAR") in key[1] or ("method", "QWERTY") in key[1]]
    counted = [dict(labels) for name, labels in after if name == "multitune_requests_total"]
    other = [labels for labels in counted if labels["method"] == "other"]
    assert not made_up and sum(moved("multitune_requests_total", **labels) for labels in other) == 2
    assert moved("multitune_request_duration_seconds_count", route="/v1/tasks/sentiment/predict") == 7
    assert moved("multitune_batch_rows_sum") == 4  # one row per answered prediction, in however many batches
    assert 1 <= moved("multitune_batch_rows_count") <= 4
    assert after[("multitune_queue_depth", ())] == 0
