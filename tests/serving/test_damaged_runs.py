"""A finished run with a damaged file: evaluate, predict, serve and export each exit 2 with one line naming
the file (and the task and field), never a traceback, and leave the run folder as it was."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.cli import main
from multitune.config import TaskConfig
from multitune.errors import MultitunError
from multitune.runs.layout import read_manifest
from multitune.runs.load import task_from_manifest


def with_entry(task: str, **values: Any) -> Callable[[bytes], bytes]:
    """tasks.json with some values of one task's entry replaced."""

    def edit(text: bytes) -> bytes:
        manifest = json.loads(text)
        manifest[task].update(values)
        return json.dumps(manifest).encode()

    return edit


# (file in the run, how it is damaged, what the one line says after "multitune: error: RUN/")
DAMAGES: dict[str, tuple[str, Callable[[bytes], bytes], str]] = {
    "tasks.json cut": ("tasks.json", lambda text: text[:50], "tasks.json:"),
    "tasks.json an array": ("tasks.json", lambda _: b"[1]", "tasks.json: holds an array, not an object of tasks"),
    "tasks.json empty object": ("tasks.json", lambda _: b"{}", "tasks.json: no entry for task 'ner'"),
    "tasks.json other tasks": (
        "tasks.json",
        lambda _: b'{"other": {}}',
        "tasks.json: no entry for task 'ner' of config.yaml (damaged?; it holds other)",
    ),
    "labels a number": (
        "tasks.json",
        with_entry("sentiment", labels=5),
        "tasks.json: field 'sentiment.labels': task 'sentiment': must be a list of label names, found a number",
    ),
    "no tags": ("tasks.json", with_entry("ner", labels=[]), "tasks.json: field 'ner.labels': task 'ner': must name"),
    "a NaN scale": (
        "tasks.json",
        with_entry("sentiment", target_std=float("nan")),
        "tasks.json: field 'sentiment.target_std': task 'sentiment': must be a finite number, found nan",
    ),
    "rows a number": (
        "tasks.json",
        with_entry("sentiment", rows=5),
        "tasks.json: field 'sentiment.rows': task 'sentiment': must be an object of row counts per split",
    ),
    "another type": (
        "tasks.json",
        with_entry("ner", type="regression"),
        "tasks.json: field 'ner.type': task 'ner': its type is 'regression', but config.yaml says",
    ),
    "a third label": (  # a head of 3 outputs where the weights hold 2
        "tasks.json",
        with_entry("sentiment", labels=["neg", "pos", "meh"]),
        "model.safetensors: the weights do not fit the model that config.yaml and tasks.json describe: size mismatch",
    ),
    "weights random bytes": (
        "model.safetensors",
        lambda text: bytes((i * 97 + 13) % 256 for i in range(400)),
        "model.safetensors: not a readable safetensors file",
    ),
    "weights empty": ("model.safetensors", lambda _: b"", "model.safetensors: not a readable safetensors file"),
    "weights cut": ("model.safetensors", lambda text: text[: len(text) // 2], "model.safetensors: not a readable"),
    "backbone config": ("backbone/config.json", lambda _: b"{x", "backbone/config.json:1: not valid JSON"),
    "backbone config an array": ("backbone/config.json", lambda _: b"[]", "backbone/config.json: not a JSON object"),
    "tokenizer cut": ("backbone/tokenizer.json", lambda text: text[:100], "backbone/tokenizer.json:"),
    "tokenizer emptied": ("backbone/tokenizer.json", lambda _: b"{}", "backbone: the saved backbone cannot be rebuilt"),
}


def commands(run: Path, scratch: Path) -> dict[str, list[str]]:
    records = scratch / "records.jsonl"
    records.write_text('{"text": "good movie"}\n', encoding="utf-8")
    return {
        "evaluate": ["evaluate", str(run), "--split", "validation"],
        "predict": ["predict", str(run), "--task", "sentiment", "--input", str(records)],
        "serve": ["serve", str(run), "--port", "9"],
        "export": ["export", str(run), "--task", "sentiment", str(scratch / "exported")],
    }


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_run_file_is_one_line_naming_it_in_every_command(case, tiny_run, tmp_path, capsys, monkeypatch):
    import uvicorn

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a damaged run was served")

    monkeypatch.setattr(uvicorn, "run", never)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    name, damage, said = DAMAGES[case]
    (run / name).write_bytes(damage((run / name).read_bytes()))
    before = snapshot(run)
    for command, argv in commands(run, tmp_path).items():
        capsys.readouterr()
        assert main(argv) == 2, command
        err = capsys.readouterr().err
        assert "Traceback" not in err, command
        lines = err.strip().splitlines()
        assert len(lines) == 1, (command, lines)
        assert lines[0].startswith(f"multitune: error: {run}/{said}"), (command, lines[0])
        assert snapshot(run) == before, command
        assert not (tmp_path / "exported").exists(), command


def test_the_undamaged_copy_loads(tiny_run, tmp_path, capsys):
    """The damages above are the only reason for the refusals: the same copy, undamaged, predicts."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(commands(run, tmp_path)["predict"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["prediction"] in ("neg", "pos")


TASKS = {
    "sentiment": TaskConfig.model_validate({"type": "classification", "source": {"format": "jsonl", "train": "a"}}),
    "score": TaskConfig.model_validate({"type": "regression", "source": {"format": "jsonl", "train": "b"}}),
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
GOOD = {
    "sentiment": {"type": "classification", "labels": ["neg", "pos"], "target_mean": 0.0, "target_std": 1.0},
    "score": {"type": "regression", "labels": None, "target_mean": 2.5, "target_std": 1.5},
}
entry_keys = st.sampled_from(["type", "labels", "target_mean", "target_std", "rows"])


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        json_values,  # anything at all in the file
        st.tuples(st.sampled_from(list(GOOD)), entry_keys, json_values).map(  # one value of a good file changed
            lambda change: {**GOOD, change[0]: {**GOOD[change[0]], change[1]: change[2]}}
        ),
    )
)
def test_any_tasks_json_is_read_or_refused_in_one_line_naming_it(tmp_path_factory, manifest):
    path = tmp_path_factory.mktemp("manifest") / "tasks.json"
    path.write_text(json.dumps(manifest), encoding="utf-8")
    try:
        entries = read_manifest(path, TASKS)
    except MultitunError as error:
        assert str(error).startswith(f"{path}") and "\n" not in str(error)
        return
    for name, config in TASKS.items():  # what was read is what the heads are built from
        task = task_from_manifest(name, config, entries[name])
        assert task.labels is None if config.type == "regression" else len(set(task.labels or [])) >= 2
        assert task.target_std > 0


def test_every_cut_of_tasks_json_is_refused_naming_it(tmp_path):
    path = tmp_path / "tasks.json"
    whole = json.dumps(GOOD, indent=2)
    for end in range(len(whole)):
        path.write_text(whole[:end], encoding="utf-8")
        with pytest.raises(MultitunError) as error:
            read_manifest(path, TASKS)
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    path.write_text(whole, encoding="utf-8")
    assert read_manifest(path, TASKS) == GOOD


@pytest.mark.parametrize("damage", [b"", b"\x07" * 300], ids=["empty", "random bytes"])
def test_a_damaged_run_to_start_from_is_one_line_naming_its_weights(damage, tiny_run, tmp_path, capsys):
    """model.init_from reads the other run's weights itself: the same damage is the same one line, and nothing
    is created for the new run."""
    import yaml

    start = tmp_path / "start"
    shutil.copytree(tiny_run, start)
    (start / "model.safetensors").write_bytes(damage)
    config = yaml.safe_load((tiny_run / "config.yaml").read_text(encoding="utf-8"))
    config["run"].update(name="next", output_dir=str(tmp_path / "runs"))
    config["model"]["init_from"] = str(start)
    path = tmp_path / "next.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"multitune: error: {start}/model.safetensors: field 'model.init_from': not a readable safetensors file"
    ), lines
    assert not (tmp_path / "runs" / "next").exists()
