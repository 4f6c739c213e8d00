"""No silent stretches: evaluation, prediction and generation show a bar of rows on a terminal (as training
does), and none with `training.progress: false` or when stderr is not a terminal; `multitune compare` says
which model trains (k of n) with an estimate of the time left, and shows each training's bars live."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from multitune.cli import main
from tests.conftest import REPO, classification_rows, tiny_config, token_rows
from tests.serving.conftest import write_rows


def in_terminal(command: list[str], cwd: Path) -> str:
    """Run `multitune COMMAND` with stdout and stderr on a 100-column pseudo-terminal; everything it wrote."""
    reader, writer = pty.openpty()
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "multitune", *command],
        stdin=subprocess.DEVNULL,
        stdout=writer,
        stderr=writer,
        cwd=cwd,
        env=env,
    )
    os.close(writer)
    out = b""
    while True:
        try:
            data = os.read(reader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(reader)
    assert child.wait(timeout=600) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


@pytest.fixture
def config_path(tmp_path, tiny_backbone):
    rows = classification_rows(60)
    a = write_rows(tmp_path / "a.jsonl", rows[:44])
    b = write_rows(tmp_path / "b.jsonl", token_rows(40))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=4, eval_every=2)
    config["tasks"]["sentiment"]["source"]["test"] = str(write_rows(tmp_path / "t.jsonl", rows[44:]))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_evaluation_and_prediction_draw_bars_on_a_terminal(config_path, tmp_path):
    shown = in_terminal(["train", str(config_path), "training.progress=true"], tmp_path)
    assert "train:" in shown  # the training bar, as before
    for label in ("validation sentiment", "validation ner", "test sentiment"):  # validations, the final test
        assert f"{label}:" in shown and "rows/s" in shown, label
    run = tmp_path / "runs" / "tiny"
    assert "test sentiment:" in in_terminal(["evaluate", str(run)], tmp_path)
    records = tmp_path / "in.jsonl"
    records.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a good movie", "bad")), encoding="utf-8")
    shown = in_terminal(["predict", str(run), "--task", "sentiment", "--input", str(records)], tmp_path)
    assert "predict sentiment:" in shown and '"prediction"' in shown


def test_no_bars_without_progress_or_without_a_terminal(config_path, tmp_path):
    quiet = in_terminal(["train", str(config_path), "run.name=quiet"], tmp_path)  # the config says progress: false
    assert "rows" not in quiet and "train:" not in quiet and "saved to" in quiet
    piped = subprocess.run(
        [sys.executable, "-m", "multitune", "train", str(config_path), "run.name=piped", "training.progress=true"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "rows" not in piped.stderr  # a log file gets no redrawn evaluation bars


def test_generation_reports_each_batch():
    """generate_predictions tells `advance` of every batch: 7 prompts in batches of 3 are 3 + 3 + 1 rows."""
    from torch import nn

    from multitune.evaluation.generation import generate_predictions

    class Echo(nn.Module):
        def generate_texts(self, prompts, max_new_tokens, pad_id, task=None):
            return [str(len(p)) for p in prompts]

    rows = [SimpleNamespace(input_ids=list(range(n + 1)), prompt_length=None) for n in range(7)]
    task = SimpleNamespace(name="echo", config=SimpleNamespace(max_new_tokens=2, type="generation"))
    done: list[int] = []
    predictions = generate_predictions(Echo(), task, rows, 3, 0, done.append)  # type: ignore[arg-type]
    assert done == [3, 3, 1]
    assert [p["prediction"] for p in predictions] == [str(n + 1) for n in range(7)]


def test_compare_says_which_model_trains_with_the_time_left(config_path, tmp_path, capsys):
    assert main(["compare", str(config_path)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("compare: [")]
    assert lines[0] == "compare: [1/3] multi-task model 'tiny', 4 steps"
    assert lines[1].startswith("compare: [1/3] trained in ")
    multi = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    first, second = sorted(json.loads((tmp_path / "runs" / "tiny" / "comparison.json").read_text())["tasks"])
    assert first == "ner" and second == "sentiment"
    steps = {task: -(-multi["task_rows"][task] // 4) for task in (first, second)}  # ceil(rows / batch size)
    assert lines[2].startswith(f"compare: [2/3] single-task baseline 'ner', {steps['ner']} steps; about ")
    assert lines[2].endswith(" left in all")
    assert lines[4].startswith(f"compare: [3/3] single-task baseline 'sentiment', {steps['sentiment']} steps; about ")
    assert len(lines) == 6
    assert main(["compare", str(config_path)]) == 0  # the baselines again: from the cache
    again = [line for line in capsys.readouterr().err.splitlines() if line.startswith("compare: [")]
    assert again[2:] == [
        "compare: [2/3] single-task baseline 'ner': reused from the cache",
        "compare: [3/3] single-task baseline 'sentiment': reused from the cache",
    ]


@pytest.mark.slow
def test_compare_on_a_terminal_shows_each_training_live(config_path, tmp_path):
    shown = in_terminal(["compare", str(config_path), "training.progress=true"], tmp_path)
    order = [shown.index(words) for words in ("[1/3] multi-task", "train:", "[2/3] single-task", "[3/3]")]
    assert order == sorted(order)
    assert shown.count("train:") >= 3 and "test sentiment:" in shown  # every training's bars, passed through
