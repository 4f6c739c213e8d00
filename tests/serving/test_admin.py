"""/v1/admin/tasks: tasks loaded from another run and unloaded while the server answers a steady load."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from multitune.cli import main
from tests.conftest import classification_rows, tiny_config, token_rows
from tests.serving.conftest import running_server, train, write_rows

httpx = pytest.importorskip("httpx")
ADMIN = "admin-s3cret"


def other_run(folder: Path, backbone: Path, max_length: int = 32) -> Path:
    """A run of the same tiny backbone with a task the served run lacks ('topic')."""
    folder.mkdir(parents=True, exist_ok=True)
    a = write_rows(folder / "topic.jsonl", classification_rows(60, seed=2))
    b = write_rows(folder / "tags.jsonl", token_rows(20))
    config = tiny_config(backbone, a, b, folder / "runs")
    config["tasks"] = {"topic": config["tasks"]["sentiment"]}
    config["model"]["max_length"] = max_length
    config["run"]["name"] = f"other-{max_length}"
    return train(folder, config)


@pytest.fixture(scope="module")
def runs(tiny_run, tiny_backbone, tmp_path_factory):
    folder = tmp_path_factory.mktemp("admin")
    return tiny_run, other_run(folder, tiny_backbone), other_run(folder / "wide", tiny_backbone, max_length=48)


def test_a_task_loads_and_unloads_under_load_without_a_failed_request(runs, tmp_path):
    served, other, _ = runs
    records = [{"text": "a good film"}, {"text": "bad plot and worse acting"}]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert main(["predict", str(other), "--task", "topic", "--input", str(source), "--output", str(out)]) == 0
    expected = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with running_server(served, "--admin-token", ADMIN) as url:
        statuses: list[int] = []
        stop = threading.Event()

        def steady() -> None:  # the served run's own task, all the while
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    reply = client.post(f"{url}/v1/tasks/sentiment/predict", json={"inputs": records})
                    statuses.append(reply.status_code)

        clients = [threading.Thread(target=steady) for _ in range(4)]
        for client in clients:
            client.start()
        try:
            loaded = httpx.post(
                f"{url}/v1/admin/tasks", json={"run": str(other), "task": "topic"}, headers=admin, timeout=60
            )
            assert loaded.status_code == 201, loaded.text
            answer = httpx.post(f"{url}/v1/tasks/topic/predict", json={"inputs": records}, timeout=60)
            assert answer.status_code == 200, answer.text
            assert [p["prediction"] for p in answer.json()["predictions"]] == expected  # as `multitune predict`
            mixed = {"inputs": [{"task": "topic", "input": records[0]}, {"task": "sentiment", "input": records[1]}]}
            assert httpx.post(f"{url}/v1/predict", json=mixed, timeout=60).status_code == 200
            listed = httpx.get(f"{url}/v1/admin/tasks", headers=admin, timeout=10).json()["tasks"]
            assert {t["name"]: t["run"] for t in listed}["topic"] == str(other.resolve())
            assert httpx.delete(f"{url}/v1/admin/tasks/topic", headers=admin, timeout=60).json() == {
                "unloaded": "topic"
            }
            gone = httpx.post(f"{url}/v1/tasks/topic/predict", json={"inputs": records}, timeout=60)
            assert gone.status_code == 404 and "no task 'topic'" in gone.json()["detail"]
        finally:
            stop.set()
            for client in clients:
                client.join()
        assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


def reordered_vocabulary(run: Path, into: Path) -> Path:
    """A copy of `run` whose saved tokenizer gives two tokens each other's ids: the same backbone name and
    settings, other encodings."""
    import json
    import shutil

    copy = shutil.copytree(run, into)
    path = copy / "backbone" / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(tokenizer), encoding="utf-8")
    return copy


def test_admin_routes_refuse_what_they_must(runs, tmp_path):
    served, other, wide = runs
    reordered = reordered_vocabulary(other, tmp_path / "reordered")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with running_server(served, "--admin-token", ADMIN) as url:
        body = {"run": str(other), "task": "topic"}
        assert httpx.post(f"{url}/v1/admin/tasks", json=body, timeout=60).status_code == 401
        assert (
            httpx.post(
                f"{url}/v1/admin/tasks", json=body, headers={"Authorization": "Bearer no"}, timeout=60
            ).status_code
            == 401
        )
        for bad, status, words in [
            ({"run": str(other / "nowhere"), "task": "topic"}, 400, "not a finished multitune run"),
            ({"run": str(other), "task": "nope"}, 400, "no task 'nope' in that run"),
            ({"run": str(wide), "task": "topic"}, 400, "not compatible: its model.max_length is 48"),
            ({"run": str(reordered), "task": "topic"}, 400, "not compatible: its tokenizer"),
            ({"run": "/" + "a" * 300, "task": "topic"}, 400, "not a run folder"),  # a name too long
            ({"run": str(served), "task": "sentiment"}, 409, "already served"),
        ]:
            reply = httpx.post(f"{url}/v1/admin/tasks", json=bad, headers=admin, timeout=60)
            assert reply.status_code == status and words in reply.json()["detail"], reply.text
            assert "\n" not in reply.json()["detail"]
        assert httpx.delete(f"{url}/v1/admin/tasks/nope", headers=admin, timeout=10).status_code == 404
        assert httpx.delete(f"{url}/v1/admin/tasks/ner", headers=admin, timeout=10).status_code == 200
        last = httpx.delete(f"{url}/v1/admin/tasks/sentiment", headers=admin, timeout=10)
        assert last.status_code == 409 and "only task served" in last.json()["detail"]
    with running_server(served) as url:  # off unless an admin token is given
        assert httpx.get(f"{url}/v1/admin/tasks", timeout=10).status_code == 404


def test_a_loaded_generation_task_joins_the_openai_routes_and_the_openapi_document(generation_run, tmp_path):
    """Loaded: /v1/models lists it, a chat completion answers it, /openapi.json shows its own route. Unloaded:
    gone from all three, and its routes answer 404 (not 500)."""
    import yaml

    config = yaml.safe_load((generation_run / "config.yaml").read_text())
    config["tasks"] = {"echo": config["tasks"]["copy"]}
    config["run"].update(name="echo", output_dir=str(tmp_path / "runs"))
    config["training"]["steps"] = 2
    other = train(tmp_path, config)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    chat = {"model": "echo", "messages": [{"role": "user", "content": "a dog runs"}], "max_tokens": 3}
    with running_server(generation_run, "--admin-token", ADMIN) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).status_code == 404
        loaded = httpx.post(
            f"{url}/v1/admin/tasks", json={"run": str(other), "task": "echo"}, headers=admin, timeout=60
        )
        assert loaded.status_code == 201, loaded.text
        assert {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]} == {"copy", "echo"}
        answer = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"] == "echo"
        assert "/v1/tasks/echo/generate" in httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
        assert httpx.delete(f"{url}/v1/admin/tasks/echo", headers=admin, timeout=60).status_code == 200
        assert {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]} == {"copy"}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).status_code == 404
        for route in ("generate", "predict"):
            body = {"input": {"text": "a dog"}}
            assert httpx.post(f"{url}/v1/tasks/echo/{route}", json=body, timeout=60).status_code == 404
        assert "/v1/tasks/echo/generate" not in httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
        assert httpx.delete(f"{url}/v1/admin/tasks/copy", headers=admin, timeout=60).status_code == 409  # the last
