"""A run directory's layout and manifest: its name, tasks.json (labels, targets, row counts, data
fingerprints) and the checks a manifest read back must pass."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from multitune.config import TaskConfig
from multitune.data.images import image_digest
from multitune.data.tasks import (
    Example,
    TaskData,
    label_field_name,
    split_source,
)
from multitune.errors import ConfigError, DataError, MultitunError


def create_run_dir(output_dir: str, name: str) -> Path:
    """A new, empty run directory: `name`, or `name-2`, `name-3`... if taken. Never reuses one."""
    root = Path(output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, 10_000):
            path = root / (name if attempt == 1 else f"{name}-{attempt}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as error:
        raise ConfigError(
            f"cannot create the run directory: {error.strerror or error}", file=str(root), field="run.output_dir"
        ) from None
    raise ConfigError("too many runs with this name", file=str(root), field="run.name")


def manifest_entry(
    kind: str,
    labels: list[str] | None,
    target_mean: float,
    target_std: float,
    target_range: tuple[float, float] | None,
    rows: dict[str, int],
) -> dict[str, Any]:
    """One task's entry in tasks.json, as every route writes it (the YAML recipe adds the data's notes and
    fingerprint): its type, labels, the regression targets' standardisation and range, its row counts."""
    bounds = {} if target_range is None else {"target_min": target_range[0], "target_max": target_range[1]}
    return {
        "type": kind,
        "labels": labels,
        "target_mean": target_mean,
        "target_std": target_std,
        **bounds,
        "rows": rows,
    }


def task_manifest(tasks: dict[str, TaskData]) -> dict[str, Any]:
    return {
        name: {
            **manifest_entry(
                task.config.type,
                task.labels,
                task.target_mean,
                task.target_std,
                target_range(task),
                {"train": task.train_rows, **{split: len(examples) for split, examples in task.splits.items()}},
            ),
            "notes": task.notes,
            "fingerprint": data_fingerprint(task),
            **({"streamed_train": task.stream.where} if task.stream is not None else {}),  # not fingerprinted
        }
        for name, task in tasks.items()
    }


def target_range(task: TaskData) -> tuple[float, float] | None:
    """A regression task's smallest and largest training target: predict and serve hold their answers to
    this range (runs/predict.py, held_to_range). None for other tasks."""
    if task.stream is not None:  # gathered in the streamed split's pass
        return task.target_range
    targets = [float(e.label) for e in task.splits.get("train", []) if isinstance(e.label, (int, float))]
    if task.config.type != "regression" or not targets:
        return None
    return min(targets), max(targets)


def data_fingerprint(task: TaskData) -> dict[str, dict[str, Any]]:
    """Per data file (or dataset split) of a task, its rows in file order: how many, and a sha256 over their
    texts and labels as read. Rows appended to a file keep the digest of the rows before them, so resume
    tells added rows from changed ones."""
    return {file: {"rows": len(rows), "sha256": _digest(rows)[0]} for file, rows in _rows_by_file(task).items()}


def _rows_by_file(task: TaskData) -> dict[str, list[Example]]:
    """Every split's examples regrouped by the file they came from, in line order (so a validation split
    carved from train counts as part of the train file again)."""
    by_file: dict[str, list[Example]] = {}
    for examples in task.splits.values():
        for example in examples:
            by_file.setdefault(example.file, []).append(example)
    return {file: sorted(rows, key=lambda e: e.line) for file, rows in by_file.items()}


def _carved_files(task: TaskData) -> set[str]:
    """The files a task's train split is read from, when its validation split was carved from them (a carve
    takes validation rows from the train files; a validation source has files, or a dataset split, of its
    own); empty otherwise. The carve shuffles all train rows together, so every train file counts."""
    train = {example.file for example in task.splits.get("train", [])}
    validation = {example.file for example in task.splits.get("validation", [])}
    return train if train & validation else set()


def _digest(rows: list[Example], prefix: int = -1) -> tuple[str, str | None]:
    """The sha256 of the rows, and that of their first `prefix` rows."""
    digest, head = hashlib.sha256(), None
    for i, example in enumerate(rows):
        if i == prefix:
            head = digest.hexdigest()
        digest.update(json.dumps([example.texts, example.label, example.instruction]).encode() + b"\n")
        if example.image is not None:  # an image task: the image's own bytes, not only its path
            digest.update(image_digest(example.image).encode() + b"\n")
    if prefix == len(rows):
        head = digest.hexdigest()
    return digest.hexdigest(), head


def read_json_file(path: Path) -> Any:
    """A JSON file of a run, or a one-line MultitunError naming it (and the line where its JSON breaks)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MultitunError(
            f"not valid JSON (damaged?): {error.msg}, column {error.colno}", file=str(path), line=error.lineno
        ) from None
    except UnicodeDecodeError:
        raise MultitunError("not UTF-8 text (damaged?)", file=str(path)) from None
    except RecursionError:
        raise MultitunError("not a JSON file multitune wrote: nested too deeply", file=str(path)) from None
    except OSError as error:
        raise MultitunError(f"cannot be read: {error.strerror or error}", file=str(path)) from None


def read_manifest(path: Path, tasks: dict[str, TaskConfig]) -> dict[str, dict[str, Any]]:
    """tasks.json, checked against the run's config: an entry per task, with the type, labels and target
    scaling the heads were trained with. What a head's size and answers rest on is checked here, where the
    file can be named, not where a damaged value would first be used."""
    manifest = read_json_file(path)
    if not isinstance(manifest, dict):
        raise MultitunError(f"holds {_json_kind(manifest)}, not an object of tasks (damaged?)", file=str(path))
    for name, task in tasks.items():
        if name not in manifest:
            raise MultitunError(
                f"no entry for task '{name}' of config.yaml (damaged?; it holds "
                f"{', '.join(_shown(key) for key in list(manifest)[:8]) or 'none'})",
                file=str(path),
            )
        entry = manifest[name]
        if not isinstance(entry, dict):
            raise MultitunError(
                f"task '{name}': its entry is {_json_kind(entry)}, not an object", file=str(path), field=name
            )
        problem = _manifest_problem(entry, task)
        if problem is not None:
            key, message = problem
            raise MultitunError(f"task '{name}': {message} (damaged?)", file=str(path), field=f"{name}.{key}")
    return manifest


def _manifest_problem(entry: dict[str, Any], task: TaskConfig) -> tuple[str, str] | None:
    """(field, what is wrong) with one task's tasks.json entry, or None."""
    if entry.get("type") != task.type:
        return "type", f"its type is {entry.get('type')!r}, but config.yaml says '{task.type}'"
    labels = entry.get("labels")
    if task.type in ("regression", "generation"):
        if labels is not None:
            return "labels", f"a {task.type} task has no labels, found {_json_kind(labels)}"
    else:
        fewest = 1 if task.type == "token_classification" else 2
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            return "labels", f"must be a list of label names, found {_json_kind(labels)}"
        if len(set(labels)) != len(labels) or len(labels) < fewest:
            return (
                "labels",
                f"must name at least {fewest} distinct labels, found {len(labels)} ({len(set(labels))} distinct)",
            )
        if task.labels is not None and labels != task.labels:
            return "labels", f"{labels} differ from the labels config.yaml gives"
    for key in ("target_mean", "target_std"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return key, f"must be a finite number, found {_json_kind(value) if not isinstance(value, float) else value}"
    if entry["target_std"] <= 0:
        return "target_std", f"must be above 0, found {entry['target_std']}"
    rows = entry.get("rows", {})  # the model card lists them
    if not isinstance(rows, dict) or not all(isinstance(n, int) and not isinstance(n, bool) for n in rows.values()):
        return "rows", f"must be an object of row counts per split, found {_json_kind(rows)}"
    return None


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    return JSON_KINDS.get(type(value), type(value).__name__)


def _shown(name: str) -> str:
    """A record's own key as an error names it: on one line and short (escaped and cut when it is not)."""
    if name.isprintable() and 0 < len(name) <= 40:
        return name
    return repr(name if len(name) <= 40 else name[:37] + "...")[1:-1] or '""'


FINETUNED = "finetuned"


JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}


def match_resumed_data(run_dir: Path, tasks: dict[str, TaskData]) -> bool:
    """Resume continues on the data the run started with: a task whose label vocabulary or rows changed is
    refused (its head would learn other classes, or the run mix two datasets); rows only appended to a file
    are a warning, and the tasks keep the run's target scaling. True when rows were added. Rows appended to
    a task whose validation split is carved from train are refused too: a carve of the longer file would move
    rows between train and validation, so the run would validate on rows it already trained on. A run from
    before data fingerprints is only checked for its labels."""
    path = run_dir / "tasks.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = {name: manifest[name] for name in tasks}
    except (OSError, ValueError, KeyError, TypeError):
        raise MultitunError("the run being resumed has no readable tasks.json for its tasks", file=str(path)) from None
    added, unchecked = False, []
    for name, task in tasks.items():
        saved = entries[name]
        if saved.get("labels") != task.labels:
            raise DataError(
                f"task '{name}': its labels changed since the run being resumed started "
                f"({_label_change(saved.get('labels') or [], task.labels or [])}): its head was trained on the old "
                "ones; start a new run or restore the data",
                file=split_source(task.config, "train"),
                field=label_field_name(task.config),
            )
        if task.config.type == "regression":  # the head learned targets scaled as at the start
            task.target_mean, task.target_std = float(saved["target_mean"]), float(saved["target_std"])
        started = (saved.get("rows") or {}).get("train")
        if task.stream is not None and task.config.source.num_rows is None and started not in (None, task.train_rows):
            raise DataError(  # its epochs' order depends on the rows: the saved position would repeat and skip rows
                f"task '{name}': its streamed train split has {task.train_rows} rows, the run being resumed started "
                f"with {started}: resuming would repeat some rows of the epoch and skip others; restore the file or "
                "start a new run",
                file=split_source(task.config, "train"),
            )
        fingerprint = saved.get("fingerprint")
        if not isinstance(fingerprint, dict):
            unchecked.append(name)
            continue
        carved = _carved_files(task)
        for file, rows in _rows_by_file(task).items():
            then = fingerprint.get(file)
            whole, head = _digest(rows, int(then["rows"]) if isinstance(then, dict) else -1)
            if isinstance(then, dict) and whole == then["sha256"]:
                continue
            if isinstance(then, dict) and head == then["sha256"] and file in carved:
                raise DataError(
                    f"task '{name}': {len(rows) - then['rows']} rows added since the run being resumed started, "
                    "but its validation split is carved from train: carving the longer file would move rows between "
                    "train and validation (validating on rows already trained on); start a new run, restore the "
                    "data, or give the task a validation source",
                    file=file,
                )
            if isinstance(then, dict) and head == then["sha256"]:
                added = True
                print(
                    f"warning: task '{name}': {len(rows) - then['rows']} rows added to {file} since the run "
                    "started; resuming with them (the run no longer repeats an uninterrupted one)",
                    file=sys.stderr,
                )
                continue
            count = f"{then['rows']} rows then, {len(rows)} now" if isinstance(then, dict) else "not read then"
            raise DataError(
                f"task '{name}': its rows changed since the run being resumed started ({count}): resuming would "
                "continue on other data; start a new run or restore the data",
                file=file,
            )
        gone = sorted(set(fingerprint) - set(_rows_by_file(task)))
        if gone:
            raise DataError(f"task '{name}': no rows are read from it any more", file=gone[0])
    if unchecked:
        print(
            f"note: {path} has no data fingerprints (a run from an older version): resuming without checking "
            f"that the rows of {', '.join(unchecked)} are unchanged",
            file=sys.stderr,
        )
    return added


def _label_change(old: list[str], new: list[str]) -> str:
    new_labels = [label for label in new if label not in old]
    gone = [label for label in old if label not in new]
    parts = [f"new: {', '.join(new_labels)}"] if new_labels else []
    parts += [f"gone: {', '.join(gone)}"] if gone else []
    return "; ".join(parts) or f"the same labels in another order: {', '.join(new)}"
