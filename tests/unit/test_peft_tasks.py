"""Per-task adapters: each row trains its own task's adapter inside one mixed batch, other tasks' adapters
stay untouched, and each LoRA adapter loads with plain peft."""

import json
import math

import pytest
import torch
import yaml

from multitune.catalogue import validate_config
from multitune.cli import main
from multitune.data.collate import collate
from multitune.errors import ConfigError
from multitune.models.adapters import ADAPTERS
from multitune.models.peft_tasks import SHARED
from multitune.recipe.prepare import prepare
from tests.conftest import classification_rows, tiny_config, token_rows


@pytest.fixture
def make_config(tmp_path, tiny_backbone, write_jsonl):
    def make(architecture="hard", **peft):
        a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
        data = tiny_config(tiny_backbone, a, b, tmp_path / "runs")
        data["model"]["architecture"] = {"name": architecture}
        data["model"]["dropout"] = 0.0
        data["model"]["peft"] = {"dropout": 0.0, **peft}
        return data

    return make


def prepared_model(data):
    prepared = prepare(validate_config(data))
    if prepared.model.task_adapters.method == "lora":  # LoRA's B starts at zero: give every adapter a value
        torch.manual_seed(0)
        with torch.no_grad():
            for layer in prepared.model.task_adapters.lora_layers:
                for module in layer.lora_B.values():
                    module.weight.normal_(0, 0.5)
    else:
        with torch.no_grad():
            for p in prepared.model.task_adapters.parameters():
                p.normal_(0, 0.5)
    return prepared


def mixed(prepared):
    return collate({n: prepared.encoded[n]["train"][:3] for n in ("sentiment", "ner")}, prepared.pad_id)


@pytest.mark.parametrize("method", ADAPTERS.names())
def test_a_mixed_batch_routes_each_row_to_its_own_adapter(make_config, method):
    prepared = prepared_model(make_config(method=method))
    model = prepared.model.eval()
    batch = mixed(prepared)
    hidden = model.encode(batch)
    for name in ("sentiment", "ner"):
        alone = batch.only(name)
        own = model.encode(alone)
        rows = hidden[batch.tasks[name].rows][:, : own.shape[1]]
        mask = alone.inputs["attention_mask"].bool()
        assert torch.allclose(rows[mask], own[mask], atol=1e-5)
    alone = batch.only("sentiment")
    renamed = type(alone)(alone.inputs, {"ner": alone.tasks["sentiment"]})
    wrong = model.encode(renamed)  # the same rows through the other task's adapter give other features
    assert not torch.allclose(wrong, model.encode(alone), atol=1e-3)


@pytest.mark.parametrize("method", ADAPTERS.names())
@pytest.mark.parametrize("shared", [False, True])
def test_training_on_one_task_moves_only_its_adapter_and_head(make_config, method, shared):
    prepared = prepared_model(make_config(method=method, shared=shared))
    model = prepared.model.train()
    adapters = model.task_adapters
    base = [p for p in model.backbone.parameters() if not p.requires_grad]
    assert base, "the backbone is frozen under per-task adapters"
    groups = {
        "a": list(model.task_parameters("sentiment")),
        "b": list(model.task_parameters("ner")),
        "base": base,
        "shared": list(adapters.adapter_parameters(SHARED)) if shared else [],
    }
    before = {k: [p.detach().clone() for p in v] for k, v in groups.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate({"sentiment": prepared.encoded["sentiment"]["train"][:4]}, prepared.pad_id)
    model.losses(batch)["sentiment"].backward()
    optimizer.step()

    def moved(key):
        return [not torch.equal(b, p.detach()) for b, p in zip(before[key], groups[key], strict=True)]

    assert all(moved("a")), "every parameter of task A's adapter and head learns"
    assert not any(moved("b")) and not any(moved("base"))
    if shared:
        assert all(moved("shared"))
    shared_ids = {id(p) for p in model.shared_parameters()}
    assert not shared_ids & {id(p) for p in groups["a"] + groups["b"]}


@pytest.mark.parametrize("method", ADAPTERS.names())
@pytest.mark.parametrize("train_backbone", [False, True])
def test_train_backbone_decides_whether_the_backbone_weights_learn(make_config, method, train_backbone):
    prepared = prepared_model(make_config(method=method, train_backbone=train_backbone))
    model = prepared.model.train()
    adapter_ids = {id(p) for p in model.task_adapters.parameters()}
    adapter_ids |= {id(p) for n, p in model.backbone.named_parameters() if "lora_" in n}
    own = [p for p in model.backbone.parameters() if id(p) not in adapter_ids]
    assert own and all(p.requires_grad == train_backbone for p in own)
    before = [p.detach().clone() for p in own]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    batch = collate({"sentiment": prepared.encoded["sentiment"]["train"][:4]}, prepared.pad_id)
    model.losses(batch)["sentiment"].backward()
    optimizer.step()
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, own, strict=True)]
    assert any(moved) == train_backbone


def test_a_mixed_batch_gradient_is_the_sum_of_the_single_task_gradients(make_config):
    prepared = prepared_model(make_config(method="lora", shared=True))
    model = prepared.model.eval()
    batch = mixed(prepared)
    params = [p for p in model.parameters() if p.requires_grad]
    joint = torch.autograd.grad(sum(model.losses(batch).values()), params, allow_unused=True)
    single = [torch.zeros_like(p) for p in params]
    for name in ("sentiment", "ner"):
        part = batch.only(name)
        grads = torch.autograd.grad(model.losses(part)[name], params, allow_unused=True)
        single = [s + (g if g is not None else 0) for s, g in zip(single, grads, strict=True)]
    for j, s in zip(joint, single, strict=True):
        assert torch.allclose(j if j is not None else torch.zeros_like(s), s, atol=1e-5)


@pytest.mark.parametrize(
    "method,shared,extra",
    [("lora", False, {}), ("prompt", True, {}), ("prefix", True, {}), ("prefix", False, {"prefix_projection": True})],
)
def test_each_adapter_loads_with_plain_peft(make_config, tmp_path, tiny_backbone, method, shared, extra):
    from peft import PeftModel
    from transformers import AutoModel

    data = make_config(method=method, shared=shared, virtual_tokens=3, **extra)
    data["training"].update({"steps": 8, "lr": 5e-2})
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    from multitune.runs.load import load_run

    _, _, model, _ = load_run(run)
    prepared = prepare(validate_config(data))
    batch = collate({"sentiment": prepared.encoded["sentiment"]["validation"][:4]}, prepared.pad_id)
    ours = model.encode(batch)
    plain = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(tiny_backbone)), str(run / "adapters" / "sentiment")
    )
    plain.eval()
    inputs = {k: v for k, v in batch.inputs.items() if k != "token_type_ids"}  # peft drops them with prompts
    with torch.no_grad():
        theirs = plain(**inputs).last_hidden_state
    theirs = theirs[:, theirs.shape[1] - ours.shape[1] :]  # without the virtual tokens' positions
    assert torch.allclose(ours, theirs, atol=1e-5)
    without = AutoModel.from_pretrained(str(tiny_backbone)).eval()(**inputs).last_hidden_state
    assert not torch.allclose(without, theirs, atol=1e-4), "the adapter was trained"


def test_adapters_refuse_soft_sharing_and_a_parameters_source_with_nothing_shared(make_config, tmp_path):
    with pytest.raises(ConfigError, match="own weights"):
        validate_config(make_config("soft", method="lora"))
    data = make_config(method="lora")
    data["training"]["mixed_batches"] = True
    data["gradient_aggregation"] = {"name": "pcgrad", "source": "parameters"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["train", str(path)]) == 2
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", ADAPTERS.names())
@pytest.mark.parametrize("source", ["representation", "parameters"])
def test_every_adapter_trains_with_each_gradient_source(make_config, tmp_path, method, source):
    """Mixed batches, PCGrad from either gradient source: the parameters source needs a shared adapter
    (per-task adapters alone leave no weights that every task shares)."""
    data = make_config(method=method, shared=source == "parameters", virtual_tokens=2)
    data["training"].update({"steps": 3, "mixed_batches": True, "eval_every": 3})
    data["gradient_aggregation"] = {"name": "pcgrad", "source": source}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and all(math.isfinite(t["main_score"]) for t in metrics["tasks"].values())
