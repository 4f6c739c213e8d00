"""A non-finite loss or gradient skips that update (logged with the task's name); K in a row stop the run."""

import json

import torch
import yaml
from safetensors.torch import load_file

from multitune.cli import main
from multitune.models.heads import ClassificationHead
from multitune.training.checkpoint import latest_checkpoint
from tests.conftest import classification_rows, tiny_config, token_rows


def make_config(tmp_path, tiny_backbone, write_jsonl, **training):
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", **training)
    config["sampling"] = {"name": "round_robin"}  # tasks in turn: ner (step 1), sentiment (step 2), ...
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def poison(monkeypatch, bad_calls):
    """Make the classification loss NaN on the given (0-based) calls during training."""
    original = ClassificationHead.loss
    calls = {"n": 0}

    def loss(self, outputs, labels):
        value = original(self, outputs, labels)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] - 1 in bad_calls:
                return value * float("nan")
        return value

    monkeypatch.setattr(ClassificationHead, "loss", loss)


def test_one_nan_step_is_skipped_and_logged(tmp_path, tiny_backbone, write_jsonl, monkeypatch):
    poison(monkeypatch, bad_calls={1})
    path = make_config(tmp_path, tiny_backbone, write_jsonl, steps=8, log_every=1)
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    skipped = [h for h in history if "skipped" in h]
    assert skipped == [{"step": 4, "skipped": "non-finite loss in task sentiment"}]  # sentiment's 2nd step
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 8
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "model.safetensors")).values())


def test_k_nonfinite_steps_in_a_row_stop_the_run_with_a_clear_message(
    tmp_path, tiny_backbone, write_jsonl, monkeypatch, capsys
):
    poison(monkeypatch, bad_calls=set(range(2, 100)))  # every sentiment step from the 3rd on
    path = make_config(tmp_path, tiny_backbone, write_jsonl, steps=40, checkpoint_every=2, max_nonfinite_steps=3)
    config = yaml.safe_load(path.read_text())
    config["sampling"] = {"name": "uniform"}
    config["tasks"].pop("ner")
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the run directory line
    assert err == (
        "multitune: error: training stopped at step 5: 3 non-finite steps in a row "
        "(last: non-finite loss in task sentiment); the last good checkpoint is intact"
    )
    checkpoint = latest_checkpoint(tmp_path / "runs" / "tiny")
    assert checkpoint is not None and checkpoint.name == "step-00000004"
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_gradient_overflow_without_a_nan_loss_is_caught(tmp_path, tiny_backbone, write_jsonl, monkeypatch):
    def loss(self, outputs, labels):
        value = torch.nn.functional.cross_entropy(outputs.float(), labels)
        if torch.is_grad_enabled():
            return value + (outputs.sum() * 0).abs().sqrt()  # d sqrt(x)/dx at 0 is inf, value stays finite
        return value

    monkeypatch.setattr(ClassificationHead, "loss", loss)
    path = make_config(tmp_path, tiny_backbone, write_jsonl, steps=2, log_every=1, max_nonfinite_steps=5)
    assert main(["train", str(path)]) == 0
    history = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "history.jsonl").read_text().splitlines()]
    skipped = [h["skipped"] for h in history if "skipped" in h]
    assert skipped == ["non-finite gradient (tasks in the step: sentiment)"]  # ner's step is fine
