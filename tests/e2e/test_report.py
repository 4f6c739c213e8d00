"""report.html and task relations on the tiny BERT; the report renders in headless Chromium with every image."""

import json
import shutil
import subprocess

import pytest
import yaml

from multitune.cli import main
from multitune.core.history import read_history
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
    # losses, validation, token shares against probabilities, 2 heatmaps; equal weights and temperature
    # sampling of equal-sized tasks are flat
    assert page.count('src="data:image/png;base64,') == 5
    assert "Share of training tokens per task against its sampling probability" in page
    assert "Loss weights stayed constant: ner 1, sentiment 1." in page
    assert "Sampling probabilities stayed constant: ner 0.5, sentiment 0.5." in page
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
    assert 'data-images="5"' in result.stdout, result.stderr[-2000:]
    assert 'data-images-loaded="5"' in result.stdout


def test_guard_drops_a_task_that_hurts_the_others(tmp_path, tiny_backbone, write_jsonl, monkeypatch):
    import torch

    import multitune.recipe.probes

    def synthetic(shared, grads, losses, lr):  # tasks in order ner, noise, sentiment: "noise" hurts the others
        z = torch.full((grads.shape[0], grads.shape[0]), 0.01)
        z[1, [0, 2]] = -0.05
        return z

    monkeypatch.setattr(multitune.recipe.probes, "lookahead_affinity", synthetic)
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    shuffled = write_jsonl("noise.jsonl", classification_rows(40, seed=5))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=12, eval_every=3, log_every=1)
    config["tasks"]["noise"] = {"type": "classification", "source": {"format": "jsonl", "train": str(shuffled)}}
    config["guard"] = {"enabled": True, "action": "drop", "patience": 1, "min_gain": 1.0, "start": 0.0}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "tiny"
    history = read_history(run / "history.jsonl")
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


# --- the report's parts, on run folders written by hand -------------------------------------------------


def write_run(folder, history, metrics=None, **files):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    for name, value in files.items():
        text = value if isinstance(value, str) else json.dumps(value)
        (folder / name.replace("_json", ".json").replace("_yaml", ".yaml")).write_text(text, encoding="utf-8")
    return folder


def figure(folder, title):
    from multitune.evaluation.report import report_figures

    found = dict(report_figures(folder)[0])
    assert title in found, list(found)
    found[title].canvas.draw()
    return found[title].axes[0]


def test_step_axes_have_whole_numbers_and_a_lone_point_shows(tmp_path):
    run = write_run(
        tmp_path / "run",
        [
            {"step": 1, "losses": {"a": 1.0, "b": 2.0}},
            {"step": 2, "losses": {"a": 0.8, "b": 1.5}},
            {"step": 2, "validation": {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.25}}},
        ],
    )
    losses = figure(run, "Training loss per task (running mean)")
    low, high = losses.get_xlim()
    ticks = [t for t in losses.get_xticks() if low <= t <= high]
    assert ticks == [1.0, 2.0]  # matplotlib's own choice for steps 1..2 was 1.0, 1.2, ..., 2.0
    scores = figure(run, "Validation main metric per task")
    for line in scores.get_lines():  # one validation: each curve is a single point, drawn as a visible dot
        assert len(line.get_xdata()) == 1 and line.get_marker() == "o" and line.get_markersize() >= 6
    low, high = scores.get_xlim()
    assert [t for t in scores.get_xticks() if low <= t <= high] == [2.0]


def test_legends_sit_beside_the_curves(tmp_path):
    history = [{"step": s, "losses": {f"task{i}": 1.0 / (s + i) for i in range(6)}} for s in range(1, 40)]
    axes = figure(write_run(tmp_path / "run", history), "Training loss per task (running mean)")
    renderer = axes.figure.canvas.get_renderer()
    legend = axes.get_legend().get_window_extent(renderer)
    plot = axes.get_window_extent(renderer)
    assert legend.x0 >= plot.x1  # beside the plot area, so no curve is under it
    whole = axes.figure.bbox
    assert whole.x0 <= legend.x0 and legend.x1 <= whole.x1 and whole.y0 <= legend.y0 and legend.y1 <= whole.y1


def test_weight_and_sampling_plots_only_when_they_vary(tmp_path):
    from multitune.evaluation.report import build_report

    flat = [
        {
            "step": s,
            "losses": {"a": 1.0, "b": 1.0},
            "weights": {"a": 1.0, "b": 2.0},
            "probabilities": {"a": 0.3, "b": 0.7},
        }
        for s in (1, 2, 3)
    ]
    page = build_report(write_run(tmp_path / "flat", flat))
    assert "Loss weights over time" not in page and "Sampling probabilities over time" not in page
    assert "Loss weights stayed constant: a 1, b 2." in page
    assert "Sampling probabilities stayed constant: a 0.3, b 0.7." in page
    moving = [{**h, "weights": {"a": 1.0, "b": 2.0 + h["step"]}, "probabilities": {"a": 0.3, "b": 0.7}} for h in flat]
    page = build_report(write_run(tmp_path / "moving", moving))
    assert "<h2>Loss weights over time</h2>" in page and "Sampling probabilities stayed constant" in page
    assert page.count('src="data:image/png;base64,') == 2  # losses and weights


def test_comparison_table_config_and_data_are_on_the_page(tmp_path):
    from multitune.evaluation.report import build_report

    metrics = {
        "tasks": {
            "a": {
                "split": "test",
                "n": 4,
                "metrics": {"accuracy": 0.88},
                "main_metric": "accuracy",
                "main_score": 0.88,
                "higher_is_better": True,
            },
        },
        "average_main_score": 0.88,
        "steps": 2,
        "train_seconds": 1.5,
        "best_step": 2,
    }
    comparison = {
        "tasks": {
            "a": {"metric": "accuracy", "single": 0.80, "multi": 0.88, "higher_is_better": True},
            "b": {"metric": "rmse", "single": 2.0, "multi": 2.5, "higher_is_better": False},
            "c": {"metric": "mcc", "single": 0.0, "multi": 0.3, "higher_is_better": True},
        },
        "delta_m_percent": -7.5,
        "verdict": "multi-task is worse on average",
    }
    tasks = {
        "a": {
            "type": "classification",
            "labels": ["neg", "pos"],
            "rows": {"train": 54, "validation": 6},
            "fingerprint": {"/data/somewhere/a.jsonl": {"rows": 60}},
        },
    }
    config = "run:\n  name: demo <1>\nmodel:\n  backbone: tiny\n"
    run = write_run(tmp_path / "run", [], metrics, comparison_json=comparison, tasks_json=tasks, config_yaml=config)
    page = build_report(run)
    header = "<th>task</th><th>metric</th><th>single-task</th><th>multi-task</th><th>change</th>"
    assert header in page
    # +10% (0.80 -> 0.88, higher is better), -25% (2.0 -> 2.5, lower is better), no relative change from 0
    assert "<td>0.8800</td><td>+10.0%</td>" in page and "<td>2.5000</td><td>-25.0%</td>" in page
    assert "<td>n/a (single-task score 0)</td>" in page
    assert "<h2>Config</h2><pre>run:\n  name: demo &lt;1&gt;\nmodel:\n  backbone: tiny\n</pre>" in page
    row = "<td>a</td><td>classification</td><td>train 54, validation 6</td><td>neg, pos</td><td>a.jsonl</td>"
    assert "<h2>Data</h2>" in page and row in page


def test_hundreds_of_tasks_plot_the_ones_trained_most_and_say_so(tmp_path):
    from multitune.evaluation.report import MAX_PLOTTED, report_figures

    names = [f"t{i:02d}" for i in range(MAX_PLOTTED + 3)]
    history = [{"step": s, "losses": {n: 1.0 / (s + i) for i, n in enumerate(names)}} for s in (1, 2, 3)]
    history.append({"step": 3, "validation": {n: {"accuracy": i / 20} for i, n in enumerate(names)}})
    metrics = {
        "tasks": {n: {"main_metric": "accuracy"} for n in names},
        "task_rows": {n: 100 * i for i, n in enumerate(names)},
    }
    run = write_run(tmp_path / "run", history, metrics)
    expected = names[3:]  # the most rows: t03 .. t14
    losses = figure(run, "Training loss per task (running mean)")
    assert sorted(line.get_label() for line in losses.get_lines()) == expected
    scores = figure(run, "Validation main metric per task")
    assert sorted(line.get_label() for line in scores.get_lines()) == [f"{n} (accuracy)" for n in expected]
    notes = report_figures(run)[1]
    assert any(note.startswith(f"{len(names)} tasks: the plots show the {MAX_PLOTTED}") for note in notes)
