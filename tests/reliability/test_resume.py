"""Checkpoints and resume: a killed run loses at most the steps since its last checkpoint and resumes to
exactly where an uninterrupted run would have been."""

import random
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


def write_config(tmp_path, tiny_backbone, write_jsonl, name, **overrides):
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=STEPS, eval_every=8, checkpoint_every=1)
    config["run"]["name"] = name
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
@pytest.mark.parametrize("stateful", [False, True], ids=["equal", "famo-dynamic-pcgrad"])
def test_kill_9_at_random_points_then_resume_is_bit_identical(tmp_path, tiny_backbone, write_jsonl, stateful):
    overrides = STATEFUL if stateful else {}
    reference = write_config(tmp_path, tiny_backbone, write_jsonl, "reference", **overrides)
    crashed = write_config(tmp_path, tiny_backbone, write_jsonl, "crashed", **overrides)
    extra = ["training.mixed_batches=true", "training.batch_size=8"] if stateful else []
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
