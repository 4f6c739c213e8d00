"""End to end on a tiny randomly initialised BERT: train two tasks, then evaluate and predict from the run."""

import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from multitune.cli import main
from tests.conftest import classification_rows, tiny_config, token_rows


@pytest.fixture
def config_file(tmp_path, tiny_backbone, write_jsonl):
    def make(**training) -> Path:
        a = write_jsonl("sentiment.jsonl", classification_rows(60))
        b = write_jsonl("ner.jsonl", token_rows(60))
        path = tmp_path / "tiny.yaml"
        path.write_text(
            yaml.safe_dump(tiny_config(tiny_backbone, a, b, tmp_path / "runs", **training)), encoding="utf-8"
        )
        return path

    return make


def test_train_writes_metrics_and_a_loadable_run(config_file, tmp_path, capsys, monkeypatch):
    assert main(["train", str(config_file())]) == 0
    run = tmp_path / "runs" / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"tasks", "average_main_score", "train_seconds", "steps"}
    assert metrics["steps"] == 6 and metrics["train_seconds"] > 0
    for name, main_metric in (("sentiment", "accuracy"), ("ner", "entity_f1")):
        entry = metrics["tasks"][name]
        assert entry["split"] == "validation" and entry["n"] == 6 and entry["main_metric"] == main_metric
        assert entry["main_score"] == entry["metrics"][main_metric]
    mean = (metrics["tasks"]["sentiment"]["main_score"] + metrics["tasks"]["ner"]["main_score"]) / 2
    assert metrics["average_main_score"] == pytest.approx(mean, abs=1e-6)
    for name in ("config.yaml", "tasks.json", "model.safetensors", "history.jsonl", "backbone/config.json"):
        assert (run / name).exists(), name
    table = capsys.readouterr().out
    assert "sentiment" in table and "average" in table
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "validation" in h] == [3, 6]

    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "validation"]) == 0
    evaluated = json.loads((run / "evaluation_validation.json").read_text())
    assert evaluated["tasks"]["sentiment"]["metrics"] == metrics["tasks"]["sentiment"]["metrics"]

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a good movie"}\n{"text": "bad"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(run), "--task", "sentiment", "--input", str(inputs), "--output", str(out)]) == 0
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["text"] for p in predictions] == ["a good movie", "bad"]
    assert all(
        p["prediction"] in ("pos", "neg") and sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        for p in predictions
    )

    inputs.write_text('{"tokens": ["john", "runs", "in", "paris"]}\n', encoding="utf-8")
    assert main(["predict", str(run), "--task", "ner", "--input", str(inputs), "--output", str(out)]) == 0
    assert len(json.loads(out.read_text())["prediction"]) == 4

    # JSONL from stdin to stdout, the default; the same predictions as from a file
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "a good movie"}\n{"text": "bad"}\n'))
    capsys.readouterr()
    assert main(["predict", str(run), "--task", "sentiment"]) == 0
    from_stdin = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert from_stdin == predictions
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "fine"}\n{"text": \n'))
    assert main(["predict", str(run), "--task", "sentiment"]) == 2
    assert capsys.readouterr().err.strip().startswith("multitune: error: <stdin>:2: invalid JSON")


def test_a_second_run_never_touches_the_first(config_file, tmp_path):
    path = config_file()
    assert main(["train", str(path)]) == 0
    first = (tmp_path / "runs" / "tiny" / "model.safetensors").read_bytes()
    assert main(["train", str(path), "training.mixed_batches=true"]) == 0
    assert (tmp_path / "runs" / "tiny-2" / "metrics.json").exists()
    assert (tmp_path / "runs" / "tiny" / "model.safetensors").read_bytes() == first


def test_same_config_and_seed_give_the_same_metrics(config_file, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    path = config_file(steps=6, eval_every=2)
    assert main(["train", str(path)]) == 0
    # the second run in a fresh process: nothing carried over in memory can make them agree
    subprocess.run([sys.executable, "-m", "multitune", "train", str(path)], check=True, capture_output=True)
    first, second = tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny-2"
    assert (
        json.loads((first / "metrics.json").read_text())["tasks"]
        == json.loads((second / "metrics.json").read_text())["tasks"]
    )

    def validations(run):
        lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        return [(h["step"], h["validation"]) for h in lines if "validation" in h]

    assert len(validations(first)) == 3 and validations(first) == validations(second)
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_batches_train_every_task_each_step(config_file, tmp_path):
    assert (
        main(["train", str(config_file(batch_size=12)), "training.mixed_batches=true", "sampling={name: uniform}"]) == 0
    )
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert sum(metrics["task_steps"].values()) > metrics["steps"]  # several tasks share a step
