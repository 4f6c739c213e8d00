"""history.jsonl writes each task's loss weight and sampling probability only when they change; readers fill
them back in, so what a reader sees is what the loop logged."""

from __future__ import annotations

import json

from multitune import fit
from multitune.core.history import HistoryLines, filled, read_history
from tests.unit.test_api import QUIET, mlp, synthetic_tasks


def training(step: int, weights: dict[str, float], probabilities: dict[str, float], **more) -> dict:
    """A loop's training log entry."""
    losses = dict.fromkeys(weights, 0.5)
    return {"step": step, "loss": 1.0, "losses": losses, "weights": weights, "probabilities": probabilities, **more}


def test_unchanged_mappings_are_left_out_and_filled_back():
    fixed, moved = {"a": 1.0, "b": 1.0}, {"a": 0.7, "b": 0.3}
    entries = [
        training(1, fixed, {"a": 0.5, "b": 0.5}),
        training(2, fixed, {"a": 0.5, "b": 0.5}),
        {"step": 2, "validation": {"a": {"accuracy": 0.5}}, "average_main_score": 0.5},
        training(3, fixed, moved),
        training(4, {"a": 2.0, "b": 1.0}, moved),
        {"step": 4, "early_stopping": {"task": "a"}},
    ]
    writer = HistoryLines()
    lines = [writer.line(entry) for entry in entries]
    assert [sorted(k for k in ("weights", "probabilities") if k in line) for line in lines] == [
        ["probabilities", "weights"],
        [],
        [],
        ["probabilities"],
        ["weights"],
        [],
    ]
    assert lines[2] == entries[2] and lines[5] == entries[5]  # validations and events as they are
    assert entries[1]["weights"] == fixed  # the entry the loop holds is not changed
    assert filled(json.loads(json.dumps(line)) for line in lines) == entries


def test_a_later_stage_carries_its_own_values_and_validation_lines_get_none():
    first = training(1, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.5})
    refine = training(1, {"a": 1.0}, {"a": 1.0}, stage="finetune")
    again = training(2, {"a": 1.0}, {"a": 1.0}, stage="finetune")
    writer = HistoryLines()
    lines = [writer.line(e) for e in (first, refine, again)]
    assert "weights" in lines[1]  # a stage's first line holds its values, even where they equal another's
    assert "weights" not in lines[2]
    assert filled(lines)[2]["weights"] == {"a": 1.0}
    assert "weights" not in filled([first, {"step": 1, "validation": {}}])[1]


def test_a_resumed_writer_continues_from_the_lines_in_the_file(tmp_path):
    entries = [training(s, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.5}) for s in (1, 2, 3)]
    path = tmp_path / "history.jsonl"
    writer = HistoryLines()
    path.write_text("".join(json.dumps(writer.line(e)) + "\n" for e in entries[:2]), encoding="utf-8")
    resumed = HistoryLines()
    resumed.seen(read_history(path))
    assert resumed.line(entries[2]) == {k: v for k, v in entries[2].items() if k not in ("weights", "probabilities")}


def test_read_history_skips_torn_lines_and_what_is_no_object(tmp_path):
    path = tmp_path / "history.jsonl"
    good = training(1, {"a": 1.0}, {"a": 1.0})
    path.write_text(
        json.dumps(good) + '\n[1, 2]\n"text"\n{"kept": "shared"}\n' + json.dumps(good)[:-9], encoding="utf-8"
    )
    assert read_history(path) == [good, {"kept": "shared"}]
    assert read_history(tmp_path / "missing.jsonl") == []


def test_a_run_with_a_fixed_weighting_writes_the_weights_once_and_reads_back_what_it_logged(tmp_path):
    fitted = fit(mlp(), synthetic_tasks(), steps=6, log_every=1, output_dir=tmp_path, name="h", **QUIET)
    lines = [json.loads(line) for line in (fitted.run_dir / "history.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "losses" in line]
    assert len(logged) == 6
    assert ["weights" in line for line in logged] == [True] + [False] * 5  # equal weighting, uniform sampler
    assert ["probabilities" in line for line in logged] == [True] + [False] * 5
    assert read_history(fitted.run_dir / "history.jsonl") == fitted.history  # fit keeps every entry whole
    assert all(set(e["weights"]) == {t.name for t in synthetic_tasks()} for e in fitted.history if "losses" in e)
