"""report.html and task relations on the tiny BERT; the report renders in headless Chromium with every image."""

import json
import shutil
import subprocess

import pytest
import yaml

from multitune.cli import main
from tests.conftest import classification_rows, tiny_config, token_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def affinity_run(tmp_path, tiny_backbone, write_jsonl):
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    path = tmp_path / "c.yaml"
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=6, eval_every=3, log_every=1)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["affinity", str(path), "analysis.groups=2"]) == 0
    return tmp_path / "runs" / "tiny"


def test_affinity_is_measured_at_each_validation(affinity_run, capsys):
    relations = json.loads((affinity_run / "affinity.json").read_text())
    assert relations["tasks"] == ["ner", "sentiment"] and relations["samples"] == 2 and relations["steps"] == [3, 6]
    cosine = relations["gradient_cosine"]
    assert cosine[0][0] == pytest.approx(1.0) and cosine[0][1] == pytest.approx(cosine[1][0])
    assert sorted(map(sorted, relations["groups"])) == [["ner"], ["sentiment"]]


def test_report_holds_every_plot(affinity_run):
    page = (affinity_run / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 6  # losses, validation, weights, probabilities, 2 heatmaps
    assert "Scores" in page and "Suggested task groups" in page


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium_with_every_image_loaded(affinity_run, tmp_path):
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (affinity_run / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 'data-images="6"' in result.stdout, result.stderr[-2000:]
    assert 'data-images-loaded="6"' in result.stdout


def test_guard_drops_a_task_that_hurts_the_others(tmp_path, tiny_backbone, write_jsonl, monkeypatch):
    import torch

    import multitune.run

    def synthetic(shared, grads, losses, lr):  # tasks in order ner, noise, sentiment: "noise" hurts the others
        z = torch.full((grads.shape[0], grads.shape[0]), 0.01)
        z[1, [0, 2]] = -0.05
        return z

    monkeypatch.setattr(multitune.run, "lookahead_affinity", synthetic)
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    shuffled = write_jsonl("noise.jsonl", classification_rows(40, seed=5))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=12, eval_every=3, log_every=1)
    config["tasks"]["noise"] = {"type": "classification", "source": {"format": "jsonl", "train": str(shuffled)}}
    config["guard"] = {"enabled": True, "action": "drop", "patience": 1, "min_gain": 1.0, "start": 0.0}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    actions = [h for h in history if "guard" in h]
    assert [(h["step"], h["guard"]["task"], h["guard"]["action"]) for h in actions] == [(6, "noise", "drop")]
    assert "lookahead affinity -5.000e-02, mean over 2 validations" in actions[0]["guard"]["why"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task_scale"]["noise"] == 0.0
    sampled_after = [h for h in history if h.get("losses") and h["step"] > 7 and "noise" in h.get("probabilities", {})]
    assert sampled_after  # logging continues; the dropped task's running loss no longer moves:
    assert len({h["losses"]["noise"] for h in sampled_after}) == 1


def test_tensorboard_scalars(tmp_path, tiny_backbone, write_jsonl):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, b = write_jsonl("a.jsonl", classification_rows(20)), write_jsonl("b.jsonl", token_rows(20))
    path = tmp_path / "c.yaml"
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=4, eval_every=2, log_every=1, tensorboard=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    events = EventAccumulator(str(tmp_path / "runs" / "tiny" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"validation/average_main_score", "validation/sentiment/accuracy", "lr"} <= tags
    assert any(tag.startswith("loss/") for tag in tags)
    assert [e.step for e in events.Scalars("validation/average_main_score")] == [2, 4]
