"""Property-based tests of resume: whatever a crash leaves at the end of history.jsonl, resume cuts it back to
exactly the checkpoint's history; whatever a user keeps in a run directory, however it is named, the cleanup
after a crash and checkpoint pruning leave it alone while deleting what the crashed process made; whatever
edit the data went through, resume accepts unchanged data, warns on appended rows (refuses them where the
validation split is carved from train) and refuses the rest.
"""

import contextlib
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from torch import nn

from multitune.config import TaskConfig
from multitune.data.tasks import Example, TaskData
from multitune.errors import DataError
from multitune.recipe.resume import keep_history_until
from multitune.runs.layout import match_resumed_data, task_manifest
from multitune.training import checkpoint as ckpt

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


# --- torn history tails -------------------------------------------------------------------------

numbers = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def history_lines(draw, steps: int) -> list[bytes]:
    """What the loop writes: a log line per step, sometimes a skipped step, validations now and then."""
    lines = []
    for step in range(1, steps + 1):
        if draw(st.booleans()):
            lines.append({"step": step, "skipped": "non-finite loss in task a"})
        lines.append({"step": step, "loss": draw(numbers), "losses": {"a": draw(numbers), "b": draw(numbers)}})
        if draw(st.integers(0, 3)) == 0:
            lines.append({"step": step, "validation": {"a": {"accuracy": draw(numbers)}}, "average_main_score": 0.5})
    return [json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in lines]


@st.composite
def crashed_histories(draw, junk: bool):
    """(history bytes, checkpoint step, its recorded size, the bytes up to the checkpoint): the lines past the
    checkpoint, then what a crash leaves: part of a line, zero bytes of unwritten blocks, or (junk) anything."""
    steps = draw(st.integers(1, 12))
    lines = draw(history_lines(steps))
    at = draw(st.integers(0, steps))
    kept = b"".join(line for line in lines if json.loads(line)["step"] <= at)
    later = b"".join(line for line in lines if json.loads(line)["step"] > at)
    tail = later[: draw(st.integers(0, len(later)))]
    if draw(st.booleans()):  # a torn line: a strict prefix of a line that never got its end
        torn = json.dumps({"step": steps + 1, "loss": draw(numbers), "note": draw(st.text(max_size=20))}).encode()
        tail += torn[: draw(st.integers(1, len(torn) - 1))]
    if draw(st.booleans()):
        tail += b"\0" * draw(st.integers(1, 4096))
    if junk:
        tail += draw(st.binary(max_size=200))
    return kept + tail, at, len(kept), kept


@FUZZ
@given(crashed_histories(junk=True))
def test_resume_cuts_history_back_to_the_checkpoints_recorded_size(case):
    data, step, size, kept = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "history.jsonl"
        path.write_bytes(data)
        keep_history_until(path, step, size)
        assert path.read_bytes() == kept


@FUZZ
@given(crashed_histories(junk=False))
def test_a_checkpoint_without_a_recorded_size_keeps_the_whole_lines_up_to_its_step(case):
    data, step, _, kept = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "history.jsonl"
        path.write_bytes(data)
        keep_history_until(path, step, None)
        assert path.read_bytes() == kept


# --- foreign files in run directories -----------------------------------------------------------

words = st.text(alphabet="abcxyz019-_", min_size=1, max_size=8)
steps = st.integers(0, 10**9)


@st.composite
def foreign_name(draw) -> str:
    """A user's name, often in the very forms multitune gives its temporary files and folders."""
    forms = [
        lambda: f".{draw(words)}.tmp",
        lambda: f".{draw(st.sampled_from(['metrics.json', 'model.safetensors', 'history.jsonl']))}.{draw(words)}.tmp",
        lambda: f".step-{draw(steps)}.partial",
        lambda: f".step-{draw(steps):08d}.partial",
        lambda: f".step-{draw(steps):08d}.{draw(words)}.partial",
        lambda: f".step-{draw(steps):08d}.discarded",
        lambda: f"step-{draw(words)}",
        lambda: draw(words),
    ]
    return draw(st.sampled_from(forms))()


@st.composite
def foreign_files(draw) -> dict[str, bytes]:
    """Relative paths of a user's files in a run directory (some inside folders of look-alike names)."""
    files = {}
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.sampled_from(["", "checkpoints/"]))
        name = draw(foreign_name())
        inside = draw(st.sampled_from(["", "notes.txt", "trainer.pt", "model.safetensors"]))
        files[where + name + (f"/{inside}" if inside else "")] = draw(st.binary(max_size=32))
    return files


class Crash(BaseException):
    """The process dies here: no except clause of ours runs."""


@FUZZ
@given(foreign_files(), st.integers(1, 4), st.sampled_from(["saving", "pruning"]))
def test_cleanup_and_pruning_delete_only_what_multitune_made(files, saved, crash_in):
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        run = Path(folder)
        for relative, content in files.items():
            path = run / relative
            if path.exists() or any(parent.is_file() for parent in path.parents):
                continue  # one name drawn twice, as a file and as a folder
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        foreign = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        model = nn.Linear(3, 2)
        ckpt.track(run)  # a run that then dies mid-checkpoint
        for step in range(1, saved + 1):
            ckpt.save_checkpoint(run, step, model, {"step": step}, keep=2)
        if crash_in == "saving":
            import torch

            def crash(*args, **kwargs):
                raise Crash

            patch.setattr(torch, "save", crash)
        else:
            original = Path.unlink

            def unlink(self, *args, **kwargs):
                if self.name == ckpt.WEIGHTS_FILE:
                    raise Crash
                return original(self, *args, **kwargs)

            patch.setattr(Path, "unlink", unlink)
        with contextlib.suppress(Crash):
            ckpt.save_checkpoint(run, saved + 1, model, {"step": saved + 1}, keep=1)
        ckpt.untrack(run)
        patch.undo()

        ckpt.remove_leftovers(run)  # the next process starts
        with ckpt.recording(run):
            ckpt.save_checkpoint(run, saved + 2, model, {"step": saved + 2}, keep=1)
        assert {p: p.read_bytes() for p in foreign} == foreign  # every user file, untouched
        assert [c.name for c in ckpt.checkpoint_dirs(run)] == [f"step-{saved + 2:08d}"]
        ours = {p for p in run.rglob("*") if p.is_file() and p not in foreign}
        assert ours == {run / "checkpoints" / f"step-{saved + 2:08d}" / name for name in ckpt.CHECKPOINT_FILES}


# --- data edits before a resume -----------------------------------------------------------------

TASK = TaskConfig.model_validate({"type": "classification", "source": {"format": "jsonl", "train": "t.jsonl"}})
rows = st.lists(st.tuples(st.text(max_size=6), st.sampled_from(["a", "b", "c"])), min_size=2, max_size=10)


def task_of(data: list[tuple[str, str]], validation: list[bool], own_validation: bool = False) -> TaskData:
    """The task as loaded: the file's rows (line i + 1), some held out as validation as a carve would (at
    least one, never all), or all of them train beside a validation file of its own."""
    examples = [Example((text,), label, "t.jsonl", i + 1) for i, (text, label) in enumerate(data)]
    if own_validation:
        splits = {"train": examples, "validation": [Example(("held out",), data[0][1], "v.jsonl", 1)]}
        return TaskData("t", TASK, splits, sorted({label for _, label in data}))
    held = [validation[i % len(validation)] for i in range(len(examples))]
    held[0], held[-1] = False, True  # as load_task: a carve leaves rows in both splits
    splits = {
        "train": [e for e, h in zip(examples, held, strict=True) if not h],
        "validation": [e for e, h in zip(examples, held, strict=True) if h],
    }
    return TaskData("t", TASK, splits, sorted({label for _, label in data}))


@st.composite
def edited(draw):
    """The rows a run started with and the rows after an edit of some kind."""
    old = draw(rows)
    i = draw(st.integers(0, len(old) - 1))
    kind = draw(st.sampled_from(["none", "append", "new label", "change", "delete", "insert", "swap", "relabel"]))
    new = list(old)
    if kind == "append":
        new += draw(
            st.lists(st.tuples(st.text(max_size=6), st.sampled_from(sorted({lb for _, lb in old}))), min_size=1)
        )
    elif kind == "new label":
        new.append((draw(st.text(max_size=6)), "d"))
    elif kind == "change":
        new[i] = (draw(st.text(max_size=6)), old[i][1])
    elif kind == "delete":
        del new[i]
    elif kind == "insert":
        new.insert(i, draw(st.tuples(st.text(max_size=6), st.sampled_from(["a", "b"]))))
    elif kind == "swap":
        j = draw(st.integers(0, len(old) - 1))
        new[i], new[j] = new[j], new[i]
    elif kind == "relabel":
        new = [(text, {"a": "A"}.get(label, label)) for text, label in new]
    return old, new


@FUZZ
@given(
    edited(),
    st.lists(st.booleans(), min_size=1, max_size=5),
    st.lists(st.booleans(), min_size=1, max_size=5),
    st.booleans(),
)
@example(([("x", "a"), ("y", "b")], [("x", "a"), ("y", "b"), ("z", "a")]), [False], [False], False)  # a carve
@example(([("x", "a"), ("y", "b")], [("x", "a"), ("y", "b"), ("z", "a")]), [False], [False], True)
def test_resume_accepts_unchanged_data_warns_on_appended_rows_and_refuses_other_edits(edit, before, after, own):
    """`own`: the task has a validation source; else its validation split is carved from the train file,
    where appended rows would move rows between train and validation, and are refused."""
    old, new = edit
    if sorted({label for _, label in old}) != sorted({label for _, label in new}):
        expected = "labels"
    elif new == old:
        expected = "unchanged"
    elif new[: len(old)] == old:
        expected = "appended" if own else "appended to a carve"
    else:
        expected = "changed"
    event(expected)
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder)
        saved = task_manifest({"t": task_of(old, before, own)})
        (run / "tasks.json").write_text(json.dumps(saved), encoding="utf-8")
        task = task_of(new, after, own)  # another carve: which rows are held out does not matter
        if expected in ("labels", "changed", "appended to a carve"):
            match = {
                "labels": "its labels changed",
                "changed": "its rows changed",
                "appended to a carve": f"{len(new) - len(old)} rows added .* validation split is carved from train",
            }[expected]
            with pytest.raises(DataError, match=match):
                match_resumed_data(run, {"t": task})
        else:
            assert match_resumed_data(run, {"t": task}) is (expected == "appended")


def test_the_same_labels_in_another_order_are_refused(tmp_path):
    """Configured labels are part of the config; a vocabulary can still come back reordered from the data
    (a dataset's class names): the head's outputs would then mean other classes."""
    data = [("good", "pos"), ("bad", "neg")]
    saved = task_of(data, [False])
    (tmp_path / "tasks.json").write_text(json.dumps(task_manifest({"t": saved})), encoding="utf-8")
    task = task_of(data, [False])
    task.labels = ["pos", "neg"]
    with pytest.raises(DataError, match=r"its labels changed .* \(the same labels in another order: pos, neg\)"):
        match_resumed_data(tmp_path, {"t": task})
