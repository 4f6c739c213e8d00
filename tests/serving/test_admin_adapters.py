"""A task of another per-task-LoRA run loaded as its head and adapter only, onto the backbone a server already
holds (no second model), answered exactly as its own run answers it, in one forward with the served tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from multitune.core.files import WEIGHTS_FILE
from multitune.serving.engine import Engine
from tests.conftest import classification_rows, tiny_config, token_rows
from tests.serving.conftest import train, write_rows

RECORDS = [{"text": "a good film"}, {"text": "bad plot and worse acting"}, {"text": "good good bad"}]


def lora_run(folder: Path, backbone: Path, tasks: dict[str, Any], peft: dict[str, Any], seed: int) -> Path:
    folder.mkdir(parents=True)
    a = write_rows(folder / "a.jsonl", classification_rows(60, seed=seed))
    b = write_rows(folder / "b.jsonl", token_rows(40, seed=seed))
    config = tiny_config(backbone, a, b, folder / "runs", lr=5e-2)
    config["tasks"] = {new: config["tasks"][old] for new, old in tasks.items()}
    config["model"]["peft"] = peft
    config["run"].update(name=folder.name, seed=seed)
    return train(folder, config)


@pytest.fixture(scope="module")
def runs(tiny_backbone, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adopt")
    lora = {"method": "lora", "r": 4, "alpha": 8}
    served = lora_run(folder / "served", tiny_backbone, {"sentiment": "sentiment", "ner": "ner"}, lora, 3)
    other = lora_run(folder / "other", tiny_backbone, {"topic": "sentiment", "tags": "ner"}, lora, 5)
    wider = lora_run(folder / "wider", tiny_backbone, {"topic": "sentiment"}, {**lora, "r": 8}, 5)
    return served, other, wider


def answers(engine: Engine, parts: list[tuple[str, list[dict[str, Any]]]]) -> list[list[dict[str, Any]]]:
    return engine.run([(task, engine.encode(task, records)) for task, records in parts])


def same(mine: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> None:
    assert [a["prediction"] for a in mine] == [b["prediction"] for b in theirs]
    for a, b in zip(mine, theirs, strict=True):
        if "probabilities" in a:
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_a_task_joins_the_served_backbone_as_its_head_and_adapter(runs):
    served, other, _ = runs
    own = Engine(other)  # the other run answering its own task
    alone = Engine(served)
    engine = Engine(served, batch_size=16)
    host = engine.models[0]
    loaded = engine.loadable(other, "topic")
    assert loaded.host == 0
    engine.register(loaded)
    assert len(engine.models) == 1 and engine.adopted == {"topic"}  # no second model
    assert "topic" in host.heads and all("topic" in layer.lora_A for layer in host.task_adapters.lora_layers)

    expected = answers(own, [("topic", RECORDS)])[0]
    same(answers(engine, [("topic", RECORDS)])[0], expected)
    # its adapter is in use: with its LoRA update zeroed, the same head answers otherwise
    kept = [layer.lora_B["topic"].weight.detach().clone() for layer in host.task_adapters.lora_layers]
    for layer in host.task_adapters.lora_layers:
        layer.lora_B["topic"].weight.data.zero_()
    without = answers(engine, [("topic", RECORDS)])[0]
    gaps = [abs(a["probabilities"]["neg"] - b["probabilities"]["neg"]) for a, b in zip(without, expected, strict=True)]
    assert max(gaps) > 1e-4, gaps  # ten times the 1e-5 agreement above (the adapter trained only a few steps)
    for layer, weight in zip(host.task_adapters.lora_layers, kept, strict=True):
        layer.lora_B["topic"].weight.data.copy_(weight)

    engine.stats.tasks_per_batch.clear()
    mixed = answers(engine, [("topic", RECORDS), ("sentiment", RECORDS), ("ner", [{"tokens": ["Paris", "is"]}])])
    assert max(engine.stats.tasks_per_batch) == 3  # a forward answers rows of the three tasks together
    same(mixed[0], expected)
    same(mixed[1], answers(alone, [("sentiment", RECORDS)])[0])
    assert mixed[2] == answers(alone, [("ner", [{"tokens": ["Paris", "is"]}])])[0]

    engine.unload("topic")  # its head and adapter leave; the served tasks answer as before
    assert "topic" not in host.heads and not any("topic" in layer.lora_A for layer in host.task_adapters.lora_layers)
    assert engine.adopted == set() and engine.models[0] is host
    same(answers(engine, [("sentiment", RECORDS)])[0], answers(alone, [("sentiment", RECORDS)])[0])
    engine.register(engine.loadable(other, "topic"))  # and it can come back
    same(answers(engine, [("topic", RECORDS)])[0], expected)


def test_a_task_that_cannot_join_is_loaded_with_its_own_model(runs, tmp_path):
    served, other, wider = runs
    engine = Engine(served)
    loaded = engine.loadable(wider, "topic")  # another rank: its adapter does not stack with the served ones
    assert loaded.host is None
    engine.register(loaded)
    assert len(engine.models) == 2 and engine.adopted == set()
    same(answers(engine, [("topic", RECORDS)])[0], answers(Engine(wider), [("topic", RECORDS)])[0])

    # other backbone weights (a run that trained them): its own model too
    import shutil

    changed = Path(shutil.copytree(other, tmp_path / "changed"))
    from safetensors.torch import load_file, save_file

    weights = changed / WEIGHTS_FILE
    state = load_file(weights)
    key = next(k for k in state if "backbone" in k and "lora_" not in k and k.endswith("weight"))
    state[key] = state[key] + 0.01
    save_file(state, weights)
    assert engine.loadable(changed, "topic").host is None
    engine.unload("topic")
    assert engine.loadable(other, "topic").host == 0  # the served model's


def test_a_generation_task_joins_a_served_lm_as_its_adapter(tmp_path_factory, tmp_path):
    from tests.serving.conftest import trained_generation_run

    served = trained_generation_run(tmp_path_factory, {"method": "lora", "r": 4})
    config = yaml.safe_load((served / "config.yaml").read_text())
    config["tasks"] = {"echo": config["tasks"]["copy"]}
    config["run"].update(name="echo", output_dir=str(tmp_path / "runs"), seed=7)
    config["training"]["steps"] = 4
    other = train(tmp_path, config)

    own, engine = Engine(other), Engine(served)
    engine.register(engine.loadable(other, "echo"))
    assert len(engine.models) == 1 and engine.generation_tasks() == ["copy", "echo"]
    row = engine.encode("echo", [{"input": "a b c"}])[0]
    assert engine.generate_one("echo", row) == own.generate_one("echo", own.encode("echo", [{"input": "a b c"}])[0])
    base = engine.encode_base(None, "a b c")
    before = engine.generate_one("base", base, max_new_tokens=5)
    engine.unload("echo")
    assert engine.generation_tasks() == ["copy"] and "echo" not in engine.models[0].generation_tasks
    assert engine.generate_one("base", base, max_new_tokens=5) == before  # the pretrained model throughout


def test_the_admin_routes_load_a_task_as_its_adapter_and_list_it_so(runs):
    httpx = pytest.importorskip("httpx")
    from tests.serving.conftest import running_server

    served, other, wider = runs
    admin = {"Authorization": "Bearer adm1n"}
    expected = answers(Engine(other), [("topic", RECORDS)])[0]
    with running_server(served, "--admin-token", "adm1n") as url:
        for run in (other, wider):
            body = {"run": str(run), "task": "topic"}
            assert httpx.post(f"{url}/v1/admin/tasks", json=body, headers=admin, timeout=60).status_code == 201
            listed = {
                t["name"]: t for t in httpx.get(f"{url}/v1/admin/tasks", headers=admin, timeout=10).json()["tasks"]
            }
            assert listed["topic"]["adapter_only"] is (run == other) and not listed["sentiment"]["adapter_only"]
            if run == other:
                reply = httpx.post(f"{url}/v1/tasks/topic/predict", json={"inputs": RECORDS}, timeout=60)
                same(reply.json()["predictions"], expected)
            assert httpx.delete(f"{url}/v1/admin/tasks/topic", headers=admin, timeout=60).status_code == 200
