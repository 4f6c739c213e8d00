"""A non-finite loss or gradient skips that update (logged with the task's name); K in a row stop the run."""

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.cli import main
from multitune.models.heads import ClassificationHead
from multitune.training.checkpoint import checkpoint_dirs, latest_checkpoint
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
        "(last: non-finite loss in task sentiment); checkpoints written before it are intact"
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


def overflow(monkeypatch, bad_calls):
    """Make the given (0-based) optimizer steps overflow one weight to infinity, with finite losses and
    gradients before them: what an enormous learning rate does."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] - 1 in bad_calls:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def all_finite(path):
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


OVERFLOWED = (
    r"multitune: error: training stopped at step 2: 1 of \d+ weight tensors hold NaN or infinity "
    r"\(first: backbone.embeddings.word_embeddings.weight\), so an update overflowed \(is training.lr too "
    r"large\?\); they were not saved, earlier checkpoints are intact"
)


def test_an_update_overflowing_the_weights_stops_the_run_and_nothing_is_saved_from_it(
    tmp_path, tiny_backbone, write_jsonl, monkeypatch, capsys
):
    overflow(monkeypatch, bad_calls={1})  # the update of step 2; validation follows it at step 2
    path = make_config(tmp_path, tiny_backbone, write_jsonl, steps=4, eval_every=2, checkpoint_every=1)
    assert main(["train", str(path)]) == 1
    assert re.fullmatch(OVERFLOWED, capsys.readouterr().err.strip().splitlines()[-1])
    run = tmp_path / "runs" / "tiny"
    assert not (run / "model.safetensors").exists()  # never picked as the best model
    assert [c.name for c in checkpoint_dirs(run)] == ["step-00000001"]
    assert all_finite(run / "checkpoints" / "step-00000001" / "model.safetensors")


def test_an_overflow_in_the_second_stage_saves_no_fine_tuned_copy(
    tmp_path, tiny_backbone, write_jsonl, monkeypatch, capsys
):
    overflow(monkeypatch, bad_calls={5})  # the multi-task stage takes calls 0-3; then sentiment's copy, step 2
    path = make_config(tmp_path, tiny_backbone, write_jsonl, steps=4, eval_every=2)
    config = yaml.safe_load(path.read_text())
    config["training"]["schedule"] = {"name": "two_stage", "finetune_steps": 3}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 1
    assert re.fullmatch(OVERFLOWED, capsys.readouterr().err.strip().splitlines()[-1])
    run = tmp_path / "runs" / "tiny"
    assert all_finite(run / "model.safetensors")  # the multi-task stage's best, before the overflow
    assert not (run / "finetuned" / "sentiment" / "model.safetensors").exists()


def test_a_run_whose_every_step_is_skipped_fails(tmp_path, tiny_backbone, write_jsonl, monkeypatch, capsys):
    poison(monkeypatch, bad_calls=set(range(100)))
    path = make_config(tmp_path, tiny_backbone, write_jsonl, steps=3, max_nonfinite_steps=5)
    config = yaml.safe_load(path.read_text())
    config["tasks"].pop("ner")
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "multitune: error: training stopped at step 3: every step was skipped as non-finite, nothing was trained"
    )
    assert not (tmp_path / "runs" / "tiny" / "model.safetensors").exists()


def test_the_api_refuses_an_overflowed_model(tmp_path, monkeypatch):
    import numpy as np

    from multitune import Task, fit
    from multitune.training.loop import TrainingStopped

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    labels = np.where(x[:, 0] > 0, "pos", "neg")
    overflow(monkeypatch, bad_calls={1})
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    with pytest.raises(TrainingStopped, match=r"training stopped at step 2: 1 of \d+ weight tensors hold NaN"):
        fit(
            backbone,
            [Task("sign", "classification", (x, labels))],
            steps=4,
            eval_every=2,
            batch_size=8,
            progress=False,
            output_dir=tmp_path,
            name="api",
        )
    assert not (tmp_path / "api" / "model.safetensors").exists()


def test_a_diverged_model_from_an_older_version_is_refused_by_every_reader(
    tmp_path, tiny_backbone, write_jsonl, capsys
):
    from safetensors.torch import save_file

    path = make_config(tmp_path, tiny_backbone, write_jsonl, steps=2)
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    weights = load_file(str(run / "model.safetensors"))
    weights["heads.sentiment.out.bias"][0] = float("nan")
    save_file(weights, str(run / "model.safetensors"))
    (tmp_path / "in.jsonl").write_text('{"text": "good movie"}\n', encoding="utf-8")
    capsys.readouterr()
    commands = [
        ["evaluate", str(run)],
        ["predict", str(run), "--task", "sentiment", "--input", str(tmp_path / "in.jsonl")],
        ["export", str(run), "--task", "sentiment", str(tmp_path / "exported")],
    ]
    for command in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.fullmatch(
            rf"multitune: error: {re.escape(str(run / 'model.safetensors'))}: refusing these weights: 1 of \d+ "
            r"weight tensors hold NaN or infinity \(first: heads.sentiment.out.bias\); .*",
            err[0],
        ), err
    assert not (tmp_path / "exported").exists()
