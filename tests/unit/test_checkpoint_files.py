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
    ckpt.track(tmp_path)  # as a run does: its temporary folders are recorded, so the next process knows them
    with contextlib.suppress(Crash):
        ckpt.save_checkpoint(tmp_path, 3, model, {"step": 3}, keep=1)  # prunes steps 1 and 2
    ckpt.untrack(tmp_path)  # the process dies here: no cleanup of its own
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


# --- deleting only what multitune made ----------------------------------------------------------

KILLED = """
import os, sys
from pathlib import Path
import torch
from torch import nn
from multitune.training import checkpoint as ckpt

run, where = Path(sys.argv[1]), sys.argv[2]
ckpt.track(run)  # what a run does
if where == "checkpoint":
    def killed(state, path):
        Path(path).write_bytes(b"half a trainer state")
        os._exit(9)  # SIGKILL-like: no cleanup of any kind runs
    torch.save = killed
    ckpt.save_checkpoint(run, 2, nn.Linear(3, 2), {"step": 2}, keep=2)
else:
    def killed(tmp):
        tmp.write_text("half a file")
        os._exit(9)
    ckpt.atomic_write(run / "metrics.json", killed)
"""


def foreign_files(run: Path) -> dict[Path, str]:
    """A user's files in a run directory, named like multitune's temporary files and checkpoints."""
    files = {
        run / ".my-notes.tmp": "notes",
        run / ".metrics.json.abcd1234.tmp": "a user's file in our temporary files' form",
        run / "checkpoints" / ".step-99.partial" / "notes.txt": "kept",
        run / "checkpoints" / ".step-00000002.partial" / "trainer.pt": "not multitune's",
        run / "checkpoints" / ".step-00000001.discarded" / "model.safetensors": "not multitune's either",
        run / "checkpoints" / "step-notes" / "model.safetensors": "a folder named like a checkpoint",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return files


def test_cleanup_after_a_kill_deletes_what_the_killed_process_recorded_and_nothing_else(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    ckpt.save_checkpoint(run, 1, nn.Linear(3, 2), {"step": 1}, keep=2)
    foreign = foreign_files(run)
    before = set(run.rglob("*"))
    for where in ("checkpoint", "write"):
        assert subprocess.run([sys.executable, "-c", KILLED, str(run), where]).returncode == 9
    left = {p for p in set(run.rglob("*")) - before if p.name != ckpt.SCRATCH}
    # the killed processes left a partial checkpoint folder (with its file) and a temporary file
    assert sorted(p.name.split(".")[1] for p in left if p.parent.name in ("run", "checkpoints")) == [
        "metrics",
        "step-00000002",
    ]
    ckpt.remove_leftovers(run)
    assert set(run.rglob("*")) == before  # theirs gone, the record too; every user file still there
    assert all(path.read_text(encoding="utf-8") == text for path, text in foreign.items())
    ckpt.save_checkpoint(run, 3, nn.Linear(3, 2), {"step": 3}, keep=1)  # prunes step 1, not `step-notes`
    assert [c.name for c in ckpt.checkpoint_dirs(run)] == ["step-00000003"]
    assert all(path.read_text(encoding="utf-8") == text for path, text in foreign.items())


def test_a_users_file_inside_a_pruned_checkpoint_survives(tmp_path):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, nn.Linear(3, 2), {"step": step}, keep=2)
    notes = ckpt.checkpoint_dirs(tmp_path)[0] / "why-this-step.txt"
    notes.write_text("mine", encoding="utf-8")
    ckpt.save_checkpoint(tmp_path, 3, nn.Linear(3, 2), {"step": 3}, keep=2)  # prunes step 1
    assert [c.name for c in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000003"]
    [kept] = [p for p in (tmp_path / ckpt.CHECKPOINTS).rglob("why-this-step.txt")]
    assert kept.read_text(encoding="utf-8") == "mine" and sorted(p.name for p in kept.parent.iterdir()) == [kept.name]


# --- non-finite weights -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_never_written_nor_loaded(tmp_path, bad):
    import torch
    from safetensors.torch import save_file

    from multitune.errors import MultitunError

    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.bias[1] = bad
    message = r"1 of 2 weight tensors hold NaN or infinity \(first: bias\)"
    with pytest.raises(ckpt.NonFiniteWeights, match=rf"model.safetensors: not saved: {message}"):
        ckpt.save_weights(model, tmp_path / "model.safetensors")
    assert not list(tmp_path.iterdir())
    ckpt.save_checkpoint(tmp_path, 1, nn.Linear(3, 2), {"step": 1}, keep=1)
    with pytest.raises(ckpt.NonFiniteWeights, match=rf"step-00000002: checkpoint not written: {message}"):
        ckpt.save_checkpoint(tmp_path, 2, model, {"step": 2}, keep=1)
    assert sorted(p.name for p in (tmp_path / ckpt.CHECKPOINTS).iterdir()) == ["step-00000001"]
    save_file(dict(model.state_dict()), str(tmp_path / "diverged.safetensors"))  # as an older version wrote
    with pytest.raises(MultitunError, match=rf"diverged.safetensors: refusing these weights: {message}"):
        ckpt.load_weights(nn.Linear(3, 2), tmp_path / "diverged.safetensors")
