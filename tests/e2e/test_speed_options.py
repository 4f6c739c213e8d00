"""Speed options end to end on the tiny BERT: gradient accumulation trains to the weights of the whole
batch, length grouping runs, and a compiled backbone computes the eager losses."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.catalogue import validate_config
from multitune.cli import main
from multitune.data.collate import collate
from multitune.models.assemble import compile_backbone
from multitune.recipe.prepare import prepare
from tests.conftest import classification_rows, tiny_config, token_rows


@pytest.fixture
def config_path(tmp_path, tiny_backbone, write_jsonl):
    """The tiny BERT without dropout: one pass and two passes over a batch then compute the same function."""
    backbone = tmp_path / "no-dropout"
    shutil.copytree(tiny_backbone, backbone)
    settings = json.loads((backbone / "config.json").read_text())
    settings.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (backbone / "config.json").write_text(json.dumps(settings))
    a = write_jsonl("sentiment.jsonl", classification_rows(40))
    b = write_jsonl("ner.jsonl", token_rows(40))
    data = tiny_config(backbone, a, b, tmp_path / "runs", steps=4, eval_every=4, checkpoint_every=None)
    data["model"]["dropout"] = 0.0
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _weights(tmp_path, name):
    return load_file(str(tmp_path / "runs" / name / "model.safetensors"))


@pytest.mark.parametrize(
    "balancing",
    [["loss_weighting={name: uncertainty}"], ["training.mixed_batches=true", "gradient_aggregation={name: mgda}"]],
    ids=["uncertainty", "mgda"],
)
def test_accumulation_trains_to_the_whole_batch_weights(config_path, tmp_path, balancing):
    assert main(["train", str(config_path), "run.name=whole", *balancing]) == 0
    assert main(["train", str(config_path), "run.name=parts", "training.gradient_accumulation=2", *balancing]) == 0
    whole, parts = _weights(tmp_path, "whole"), _weights(tmp_path, "parts")
    for name, tensor in whole.items():
        torch.testing.assert_close(parts[name], tensor, rtol=1e-4, atol=1e-5)


def test_length_grouped_training_runs(config_path, tmp_path):
    assert main(["train", str(config_path), "training.group_by_length=true"]) == 0
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["steps"] == 4


@pytest.mark.slow
def test_a_compiled_backbone_computes_the_eager_losses(config_path):
    prepared = prepare(validate_config(yaml.safe_load(config_path.read_text())))
    model = prepared.model.eval()
    batches = [
        collate({n: prepared.encoded[n]["train"][i : i + k] for n in ("sentiment", "ner")}, prepared.pad_id)
        for i, k in [(0, 3), (5, 4)]  # two shapes: dynamic compilation
    ]
    eager = [model.losses(b) for b in batches]
    compile_backbone(model)
    compiled = [model.losses(b) for b in batches]
    for want, got in zip(eager, compiled, strict=True):
        for name in want:
            assert got[name].item() == pytest.approx(want[name].item(), rel=1e-4)
