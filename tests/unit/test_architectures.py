"""Every sharing architecture: output shapes, gradients reaching exactly the parameters they should,
penalties that pull, and a save/load round trip through a real run."""

import json

import pytest
import torch
import yaml

from multitune.catalogue import validate_config
from multitune.cli import main
from multitune.data.collate import collate
from multitune.errors import ConfigError
from multitune.models.architectures import ARCHITECTURES
from multitune.recipe.components import build_regularizers
from multitune.recipe.prepare import prepare
from tests.conftest import classification_rows, tiny_config, token_rows

SETTINGS = {
    "hard": {},
    "hybrid": {"task_layers": 1},
    "soft": {"penalty": 0.0},
    "cross_stitch": {},
    "mmoe": {"experts": 3, "expert_size": 16},
    "ple": {"shared_experts": 2, "task_experts": 1, "levels": 2, "expert_size": 16},
}


def test_every_registered_architecture_is_covered():
    assert set(ARCHITECTURES.names()) == set(SETTINGS)


@pytest.fixture
def make_config(tmp_path, tiny_backbone, write_jsonl):
    def make(name, **extra):
        a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
        data = tiny_config(tiny_backbone, a, b, tmp_path / "runs")
        data["model"]["architecture"] = {"name": name, **SETTINGS[name], **extra}
        data["model"]["dropout"] = 0.0
        return data

    return make


def batch_of(prepared, *names):
    return collate({n: prepared.encoded[n]["train"][:4] for n in names}, prepared.pad_id)


def snapshot(parameters):
    return [p.detach().clone() for p in parameters]


def changed(before, parameters):
    return [not torch.equal(b, p.detach()) for b, p in zip(before, parameters, strict=True)]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_shapes_and_gradient_isolation(make_config, name):
    prepared = prepare(validate_config(make_config(name)))
    model = prepared.model
    assert model.architecture == name
    batch = batch_of(prepared, "sentiment", "ner")
    outputs = model(batch)
    length = batch.inputs["input_ids"].shape[1]
    assert outputs["sentiment"].shape == (4, 2)
    assert outputs["ner"].shape[:2] == (4, length)

    # one step on task A's rows only: B's own parameters must not move
    model.train()
    a_params, b_params = list(model.task_parameters("sentiment")), list(model.task_parameters("ner"))
    shared = [p for p in model.shared_parameters()]
    before_a, before_b, before_shared = snapshot(a_params), snapshot(b_params), snapshot(shared)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    only_a = batch_of(prepared, "sentiment")
    model.losses(only_a)["sentiment"].backward()
    for reg in build_regularizers(prepared.config.regularization, model):
        reg.apply_()
    optimizer.step()
    assert any(changed(before_a, a_params)), "task A's own parameters did not learn"
    if name not in ("cross_stitch",):  # cross-stitch mixes every task's column into every task by design
        assert not any(changed(before_b, b_params)), "task B's parameters moved on task A's batch"
    if shared:
        assert any(changed(before_shared, shared))
    task_ids = {id(p) for n in ("sentiment", "ner") for p in model.task_parameters(n)}
    assert not task_ids & {id(p) for p in shared}, "a parameter is both shared and task-specific"


def test_hybrid_moves_the_top_layers_into_per_task_copies(make_config):
    model = prepare(validate_config(make_config("hybrid"))).model
    assert len(model.backbone.encoder.layer) == 1  # the tiny backbone has 2 layers; 1 stays shared
    assert set(model.towers) == {"sentiment", "ner"} and len(model.towers["ner"]) == 1
    assert model.towers["ner"][0] is not model.towers["sentiment"][0]


def test_soft_sharing_penalty_pulls_the_backbones_together(make_config):
    prepared = prepare(validate_config(make_config("soft", penalty=1.0)))
    model = prepared.model
    a, b = (list(model.backbone[n].parameters()) for n in ("sentiment", "ner"))
    with torch.no_grad():
        for p in a:
            p.add_(0.1 * torch.randn_like(p))

    def distance():
        return sum(float((x - y).detach().pow(2).sum()) for x, y in zip(a, b, strict=True))

    start = distance()
    [pull] = build_regularizers(prepared.config.regularization, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        value = pull.apply_()
        optimizer.step()
    assert value > 0 and distance() < 0.5 * start


def test_l2_sp_pulls_toward_the_pretrained_weights(make_config):
    data = make_config("hard")
    data["regularization"] = {"l2_sp_alpha": 1.0, "l2_sp_beta": 0.0}
    prepared = prepare(validate_config(data))
    model = prepared.model
    [l2sp] = build_regularizers(prepared.config.regularization, model)
    start = snapshot(model.backbone.parameters())
    heads = snapshot(model.heads.parameters())
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05)
    assert l2sp.apply_() > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.step()
    after = list(model.backbone.parameters())
    assert all(torch.allclose(p, s + 0.025, atol=1e-6) for p, s in zip(after, start, strict=True))
    assert not any(changed(heads, list(model.heads.parameters())))  # beta = 0: heads untouched


@pytest.mark.parametrize(
    "settings,field",
    [
        ({"name": "hybrid", "task_layers": 9}, "model.architecture.task_layers"),
        ({"name": "mmoe", "experts": 0}, "model.architecture.experts"),
        ({"name": "mmoe", "gates": 2}, "model.architecture.gates"),
        ({"name": "stitched"}, "model.architecture.name"),
    ],
)
def test_bad_architecture_settings_name_the_key(make_config, settings, field):
    data = make_config("hard")
    data["model"]["architecture"] = settings
    with pytest.raises(ConfigError) as error:
        prepare(validate_config(data))
    assert error.value.field == field


def test_soft_sharing_refuses_the_parameters_gradient_source(make_config):
    data = make_config("soft")
    data["gradient_aggregation"] = {"name": "pcgrad", "source": "parameters"}
    data["training"]["mixed_batches"] = True
    with pytest.raises(ConfigError, match="shares no parameters"):
        validate_config(data)


@pytest.mark.parametrize("group", ["analysis", "guard"])
def test_task_relations_need_shared_trainable_parameters_beside_per_task_adapters(make_config, group, tmp_path):
    data = make_config("hard")
    data["model"]["peft"] = {"method": "lora", "r": 2}
    data[group] = {"task_affinity": True} if group == "analysis" else {"enabled": True}
    with pytest.raises(ConfigError, match="per-task adapters on a frozen backbone share none"):
        validate_config(data)
    data["model"]["peft"]["shared"] = True  # a shared adapter is what every task trains: measured on it
    data["training"]["mixed_batches"] = True
    path = tmp_path / "relations.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["train", str(path)]) == 0


@pytest.mark.parametrize("name", ["hybrid", "soft", "mmoe", "ple", "cross_stitch"])
def test_a_run_trains_saves_and_evaluates_identically(make_config, tmp_path, name, capsys):
    data = make_config(name)
    data["training"]["mixed_batches"] = True
    if name != "soft":
        data["gradient_aggregation"] = {"name": "pcgrad", "source": "parameters"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", str(run), "--split", "test"]) == 0
    again = json.loads((run / "evaluation_test.json").read_text())
    for task in ("sentiment", "ner"):
        assert again["tasks"][task]["metrics"] == metrics["tasks"][task]["metrics"]


@pytest.mark.parametrize("source", ["representation", "parameters"])
def test_gradient_checkpointing_gives_the_same_gradients(make_config, source):
    from multitune.balancing.backward import balanced_backward
    from tests.conftest import balancer_for

    grads = []
    for checkpointing in (False, True):
        data = make_config("hard")
        data["training"].update(gradient_checkpointing=checkpointing, mixed_batches=True)
        data["gradient_aggregation"] = {"name": "pcgrad", "source": source}
        config = validate_config(data)
        prepared = prepare(config)
        model = prepared.model.train()
        for module in model.modules():  # the tiny backbone's own dropout: off, so both passes see one function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.backbone.modules()) == checkpointing
        balanced_backward(model, batch_of(prepared, "sentiment", "ner"), balancer_for(config, ["sentiment", "ner"]), 0)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.allclose(plain, recomputed, atol=1e-6)
