"""Checkpoints and resume: a killed run loses at most the steps since its last checkpoint and resumes to
exactly where an uninterrupted run would have been."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from multitune.cli import main
from multitune.training.checkpoint import checkpoint_dirs, latest_checkpoint, load_trainer_state
from tests.conftest import classification_rows, tiny_config, token_rows

STEPS = 24


def write_config(tmp_path, tiny_backbone, write_jsonl, name, streamed=False, **overrides):
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=STEPS, eval_every=8, checkpoint_every=1)
    config["run"]["name"] = name
    if streamed:  # train splits read as they are drawn, through a buffer smaller than the split
        validation = {"sentiment": classification_rows(8, seed=1), "ner": token_rows(8, seed=1)}
        for task, rows in validation.items():
            path = write_jsonl(f"{task}_val.jsonl", rows)
            config["tasks"][task]["source"].update(validation=str(path), streaming=True, shuffle_buffer=7)
    for key, value in overrides.items():
        config[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dirs(run_dir)[-1] / "model.safetensors"))


def assert_every_checkpoint_loads(run_dir: Path) -> None:
    for checkpoint in checkpoint_dirs(run_dir):
        load_trainer_state(checkpoint)
        load_file(str(checkpoint / "model.safetensors"))


def history(run_dir: Path) -> list[str]:
    return (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines()


def newest_step(run_dir: Path) -> int:
    dirs = checkpoint_dirs(run_dir)
    return int(dirs[-1].name.split("-")[1]) if dirs else 0


# every stateful piece at once; mixed batches (set on the command line) let pcgrad see several tasks
STATEFUL = {
    "loss_weighting": {"name": "famo"},
    "sampling": {"name": "dynamic"},
    "gradient_aggregation": {"name": "pcgrad", "source": "parameters"},
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stateful", "streamed"),
    [(False, False), (True, False), (False, True)],
    ids=["equal", "famo-dynamic-pcgrad", "streamed"],
)
def test_kill_9_at_random_points_then_resume_is_bit_identical(tmp_path, tiny_backbone, write_jsonl, stateful, streamed):
    overrides = STATEFUL if stateful else {}
    reference = write_config(tmp_path, tiny_backbone, write_jsonl, "reference", streamed, **overrides)
    crashed = write_config(tmp_path, tiny_backbone, write_jsonl, "crashed", streamed, **overrides)
    extra = ["training.log_every=1"] + (["training.mixed_batches=true", "training.batch_size=8"] if stateful else [])
    assert main(["train", str(reference), *extra]) == 0

    run_dir = tmp_path / "runs" / "crashed"
    command = [sys.executable, "-m", "multitune", "train", str(crashed), "run.resume=auto", *extra]
    rng = random.Random(7)
    kills = 0
    while kills < 6:
        before = newest_step(run_dir)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = before + rng.randint(1, 3)
        deadline = time.time() + 120
        while newest_step(run_dir) < target and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))  # land anywhere: mid-step, mid-checkpoint, mid-validation
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        assert latest_checkpoint(run_dir) is not None
        assert_every_checkpoint_loads(run_dir)
    assert kills >= 5, "the run finished before it could be killed five times"
    assert main(["train", str(crashed), "run.resume=auto", *extra]) == 0
    assert newest_step(run_dir) == STEPS
    expected, got = final_weights(tmp_path / "runs" / "reference"), final_weights(run_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from the uninterrupted run"
    assert history(run_dir) == history(tmp_path / "runs" / "reference")  # line for line, running losses too


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_and_resume_finishes(tmp_path, tiny_backbone, write_jsonl, signal_number):
    path = write_config(tmp_path, tiny_backbone, write_jsonl, "term")
    run_dir = tmp_path / "runs" / "term"
    process = subprocess.Popen(
        [sys.executable, "-m", "multitune", "train", str(path), "training.checkpoint_every=100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (run_dir / "history.jsonl").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    assert "interrupted at step" in err and "Traceback" not in err
    step = newest_step(run_dir)
    assert 0 < step < STEPS and latest_checkpoint(run_dir) is not None
    assert main(["resume", str(run_dir)]) == 0
    assert newest_step(run_dir) == STEPS


def test_keep_last_k_and_resume_rejects_a_changed_config(tmp_path, tiny_backbone, write_jsonl, capsys):
    path = write_config(tmp_path, tiny_backbone, write_jsonl, "keep")
    assert main(["train", str(path), "training.steps=6", "training.keep_checkpoints=2"]) == 0
    run_dir = tmp_path / "runs" / "keep"
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-00000005", "step-00000006"]
    assert main(["train", str(path), "training.steps=6", "run.resume=auto", "training.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "field 'training.lr': the config differs from the run being resumed" in err


def test_resume_skips_a_damaged_newest_checkpoint_and_reaches_the_same_weights(tmp_path, tiny_backbone, write_jsonl):
    reference = write_config(tmp_path, tiny_backbone, write_jsonl, "whole")
    assert main(["train", str(reference), "training.steps=6", "training.keep_checkpoints=3"]) == 0
    damaged = write_config(tmp_path, tiny_backbone, write_jsonl, "damaged")
    assert main(["train", str(damaged), "training.steps=6", "training.keep_checkpoints=3"]) == 0
    run_dir = tmp_path / "runs" / "damaged"
    newest = checkpoint_dirs(run_dir)[-1]
    weights = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a torn write on a crashing disk
    assert latest_checkpoint(run_dir) == checkpoint_dirs(run_dir)[-2]
    assert main(["train", str(damaged), "training.steps=6", "training.keep_checkpoints=3", "run.resume=auto"]) == 0
    assert_every_checkpoint_loads(run_dir)
    expected, got = final_weights(tmp_path / "runs" / "whole"), final_weights(run_dir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_crash_past_a_checkpoint_with_a_torn_history_line_resumes_to_the_uninterrupted_history(
    tmp_path, tiny_backbone, write_jsonl
):
    """Killed after the checkpoint of step 13, mid-way through writing a history line of step 22: resume cuts
    the history back to that checkpoint, and the run ends with the uninterrupted run's history and weights.
    Files of the user's in the run directory, named like multitune's temporary ones, survive."""
    settings = ["training.log_every=1", "training.keep_checkpoints=30"]
    reference = write_config(tmp_path, tiny_backbone, write_jsonl, "reference", **STATEFUL)
    crashed = write_config(tmp_path, tiny_backbone, write_jsonl, "crashed", **STATEFUL)
    for path in (reference, crashed):
        assert main(["train", str(path), *settings, "training.mixed_batches=true", "training.batch_size=8"]) == 0
    run_dir = tmp_path / "runs" / "crashed"
    for later in checkpoint_dirs(run_dir)[13:]:
        shutil.rmtree(later)  # as if never written: the process died after step 13's checkpoint
    with (run_dir / "history.jsonl").open("a", encoding="utf-8") as torn:
        torn.write('{"step": 22, "loss": 0.61, "losses": {"sentiment": 0.5')  # no end, no newline
    notes = {run_dir / ".my-notes.tmp": "mine", run_dir / "checkpoints" / ".step-99.partial" / "notes.txt": "mine"}
    for path, text in notes.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert main(["resume", str(run_dir)]) == 0
    assert history(run_dir) == history(tmp_path / "runs" / "reference")
    expected, got = final_weights(tmp_path / "runs" / "reference"), final_weights(run_dir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert all(path.read_text(encoding="utf-8") == text for path, text in notes.items())
    assert not (run_dir / ".multitune-scratch").exists()  # a run that ends leaves no record of temporary files


def interrupted(run_dir: Path) -> None:
    """As if the run had stopped after its last checkpoint, before its final evaluation wrote metrics.json."""
    (run_dir / "metrics.json").unlink()


def test_resume_on_a_complete_run_says_so_and_changes_nothing(tmp_path, tiny_backbone, write_jsonl, capsys):
    path = write_config(tmp_path, tiny_backbone, write_jsonl, "done")
    assert main(["train", str(path), "training.steps=3"]) == 0
    run_dir = tmp_path / "runs" / "done"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    for argv in (["resume", str(run_dir)], ["train", str(path), "training.steps=3", "run.resume=auto"]):
        assert main(argv) == 0
        assert capsys.readouterr().err.splitlines() == [
            f"{run_dir} is complete (its metrics.json holds the final scores): nothing to resume;"
            f" `multitune evaluate {run_dir}` scores it again"
        ]
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    shutil.rmtree(checkpoint_dirs(run_dir)[-1])  # the last checkpoint lost: the run is continued from the one before
    assert main(["resume", str(run_dir)]) == 0
    assert "resuming" in capsys.readouterr().err and newest_step(run_dir) == 3


def edit_rows(path: Path, edit) -> None:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    path.write_text("".join(json.dumps(row) + "\n" for row in edit(rows)), encoding="utf-8")


DATA_CHANGES = {  # edit of the classification task's rows -> what resume says
    "a new class": (
        lambda rows: [*rows, {"text": "so so movie", "label": "meh"}],
        "field 'label': task 'sentiment': its labels changed since the run being resumed started (new: meh): its "
        "head was trained on the old ones; start a new run or restore the data",
    ),
    "a renamed class": (
        lambda rows: [{**row, "label": "positive" if row["label"] == "pos" else "neg"} for row in rows],
        "field 'label': task 'sentiment': its labels changed since the run being resumed started (new: positive; "
        "gone: pos): its head was trained on the old ones; start a new run or restore the data",
    ),
    "an edited row": (
        lambda rows: [*rows[:5], {**rows[5], "text": rows[5]["text"] + " indeed"}, *rows[6:]],
        "task 'sentiment': its rows changed since the run being resumed started (40 rows then, 40 now): resuming "
        "would continue on other data; start a new run or restore the data",
    ),
    "a removed row": (
        lambda rows: rows[:3] + rows[4:],
        "task 'sentiment': its rows changed since the run being resumed started (40 rows then, 39 now): resuming "
        "would continue on other data; start a new run or restore the data",
    ),
    "a row inserted before others": (
        lambda rows: [rows[1], *rows],
        "task 'sentiment': its rows changed since the run being resumed started (40 rows then, 41 now): resuming "
        "would continue on other data; start a new run or restore the data",
    ),
}


def test_resume_refuses_data_whose_labels_or_rows_changed_and_goes_on_with_appended_rows(
    tmp_path, tiny_backbone, write_jsonl, capsys
):
    """sentiment's validation split is carved from its train file: rows appended there are refused, as a
    carve of the longer file would hold out other rows, some already trained on; ner has a validation file
    of its own: rows appended to its train file are a warning."""
    path = write_config(tmp_path, tiny_backbone, write_jsonl, "data")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    held_out = write_jsonl("b_validation.jsonl", token_rows(8, seed=5))
    config["tasks"]["ner"]["source"]["validation"] = str(held_out)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path), "training.steps=2"]) == 0
    run_dir, data, tags = tmp_path / "runs" / "data", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    interrupted(run_dir)
    original = data.read_text(encoding="utf-8")
    capsys.readouterr()
    for what, (edit, message) in DATA_CHANGES.items():
        edit_rows(data, edit)
        assert main(["resume", str(run_dir)]) == 2, what
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"multitune: error: {data}: {message}", what
        data.write_text(original, encoding="utf-8")

    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    edit_rows(data, lambda rows: rows + classification_rows(4, seed=9))  # appended to a carved task's file
    assert main(["resume", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"multitune: error: {data}: task 'sentiment': 4 rows added since the run being resumed started, but its "
        "validation split is carved from train: carving the longer file would move rows between train and "
        "validation (validating on rows already trained on); start a new run, restore the data, or give the task "
        "a validation source"
    ]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    data.write_text(original, encoding="utf-8")

    edit_rows(tags, lambda rows: rows + token_rows(3, seed=9))  # appended beside a validation file: a warning
    assert main(["resume", str(run_dir)]) == 0
    interrupted(run_dir)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [
        f"warning: task 'ner': 3 rows added to {tags} since the run started; resuming with them (the run "
        "no longer repeats an uninterrupted one)"
    ]
    assert main(["resume", str(run_dir)]) == 0  # the run goes on with those rows: no warning again
    interrupted(run_dir)
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith(("warning", "note"))]

    manifest = json.loads((run_dir / "tasks.json").read_text(encoding="utf-8"))
    for entry in manifest.values():  # a run from a version without fingerprints
        del entry["fingerprint"]
    (run_dir / "tasks.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert main(["resume", str(run_dir)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note")]
    assert notes == [
        f"note: {run_dir / 'tasks.json'} has no data fingerprints (a run from an older version): resuming without "
        "checking that the rows of ner, sentiment are unchanged"  # the tasks in the saved config's order
    ]
