"""Checkpoint folders appear and disappear atomically: a crash at any file operation never leaves a listed
checkpoint that fails to load."""

import contextlib
import os
from pathlib import Path

import pytest
from torch import nn

from multitune.training import checkpoint as ckpt


class Crash(BaseException):
    pass


def loads(run_dir: Path) -> bool:
    dirs = ckpt.checkpoint_dirs(run_dir)
    return all((c / ckpt.WEIGHTS_FILE).exists() and ckpt.load_trainer_state(c) is not None for c in dirs)


@pytest.mark.parametrize("crash_at", range(1, 9))
@pytest.mark.parametrize("operation", ["unlink", "rmdir"])
def test_a_crash_while_pruning_never_leaves_a_broken_listed_checkpoint(tmp_path, monkeypatch, crash_at, operation):
    model = nn.Linear(3, 2)
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    calls = {"n": 0}
    original = getattr(Path, operation)

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, operation, failing)
    with contextlib.suppress(Crash):
        ckpt.save_checkpoint(tmp_path, 3, model, {"step": 3}, keep=1)  # prunes steps 1 and 2
    monkeypatch.setattr(Path, operation, original)
    assert loads(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path) is not None
    ckpt.remove_leftovers(tmp_path)
    assert not [p for p in (tmp_path / ckpt.CHECKPOINTS).iterdir() if p.name.startswith(".")]


def test_saving_the_same_step_again_replaces_it_whole(tmp_path):
    model = nn.Linear(3, 2)
    ckpt.save_checkpoint(tmp_path, 5, model, {"step": 5, "tag": "first"}, keep=3)
    ckpt.save_checkpoint(tmp_path, 5, model, {"step": 5, "tag": "second"}, keep=3)
    [only] = ckpt.checkpoint_dirs(tmp_path)
    assert ckpt.load_trainer_state(only)["tag"] == "second"
    assert sorted(os.listdir(tmp_path / ckpt.CHECKPOINTS)) == [only.name]


def test_a_later_damaged_checkpoint_never_outlives_the_good_ones(tmp_path):
    """Resume skipped a damaged step-10 and went on from step 8: saving step 9 must retire step 10 (another
    timeline), not prune the good checkpoints in its favour."""
    model = nn.Linear(3, 2)
    for step in (8, 10):
        ckpt.save_checkpoint(tmp_path, step, model, {"step": step}, keep=2)
    (ckpt.checkpoint_dirs(tmp_path)[-1] / "trainer.pt").write_bytes(b"torn")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000008"
    ckpt.save_checkpoint(tmp_path, 9, model, {"step": 9}, keep=1)
    assert [c.name for c in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000009"]
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path)) == {"step": 9}
