"""Training end to end with loss weightings and gradient aggregation on the tiny BERT."""

import json

import pytest
import yaml

from multitune.cli import main
from tests.conftest import classification_rows, tiny_config, token_rows


@pytest.fixture
def config_path(tmp_path, tiny_backbone, write_jsonl):
    a = write_jsonl("sentiment.jsonl", classification_rows(40))
    b = write_jsonl("ner.jsonl", token_rows(40))
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=4, eval_every=4)), encoding="utf-8"
    )
    return path


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss_weighting={name: uncertainty}"],
        ["loss_weighting={name: gradnorm}", "sampling={name: round_robin}"],
        ["loss_weighting={name: famo}", "sampling={name: dynamic}"],
        ["sampling={name: all_tasks}", "gradient_aggregation={name: pcgrad}"],
        ["sampling={name: all_tasks}", "gradient_aggregation={name: nash_mtl, source: parameters}"],
        [
            "sampling={name: all_tasks}",
            "gradient_aggregation={name: upgrad, source: parameters, buffer_dtype: bfloat16}",
        ],
        [
            "training.mixed_batches=true",
            "loss_weighting={name: dwa, period: 2}",
            "gradient_aggregation={name: graddrop}",
        ],
    ],
    ids=["uncertainty", "gradnorm", "famo-dynamic", "pcgrad-repr", "nash-params", "upgrad-bf16", "dwa-graddrop-mixed"],
)
def test_balanced_training_runs_and_logs_weights(config_path, tmp_path, overrides):
    assert main(["train", str(config_path), *overrides]) == 0
    run = tmp_path / "runs" / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and set(metrics["tasks"]) == {"sentiment", "ner"}
    logged = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if '"weights"' in line]
    assert all(set(entry["weights"]) == {"sentiment", "ner"} for entry in logged)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["gradient_aggregation={name: pcgrad}"],
            "feeds one task per step: use sampling.name=all_tasks or training.mixed_batches=true",
        ),
        (
            ["sampling={name: all_tasks}", "gradient_aggregation={name: graddrop, source: parameters}"],
            "'graddrop' is defined only for the representation source",
        ),
        (
            ["sampling={name: all_tasks}", "gradient_aggregation={name: mgda, solver: x}"],
            "unknown parameter for gradient aggregator 'mgda'",
        ),
        (
            ["sampling={name: all_tasks}", "gradient_aggregation={name: pcgrad}", "training.mixed_precision=fp16"],
            "needs bf16",
        ),
    ],
)
def test_gradient_method_config_errors(config_path, capsys, overrides, message):
    assert main(["train", str(config_path), *overrides]) == 2
    assert message in capsys.readouterr().err
