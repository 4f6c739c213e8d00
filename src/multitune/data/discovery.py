"""Tasks found in the data (the config's `discover` group): a mixture of hundreds of tasks in one unified file,
or a folder with one file per task, becomes a config of a few lines.

- `format: unified`: one task per distinct value of the records' `task` field in the train file (read once,
  record by record, keeping only the values), in the order they first appear;
- a folder as `train` (formats jsonl, csv, tsv, conll): one task per file, named by its stem, in name order;
  the folders given as `validation` and `test` hold that split's file under the same name (a task without
  one gets its validation carved from train, and is scored on validation, as any task).

Each task's config is `type`, its source, the `defaults` and then its own `overrides`. A value that is not a
valid task name has each character a name may not hold replaced by `_` (the record's value is kept as the
task's `source.task_key`, which routes the records).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from multitune.config import NAME_PATTERN, SPLITS, DiscoverConfig
from multitune.data.readers import read_unified
from multitune.errors import ConfigError

SUFFIXES = {"jsonl": (".jsonl", ".json"), "csv": (".csv",), "tsv": (".tsv",), "conll": (".conll", ".bio", ".iob")}
FIELD = "discover"


def discovered_tasks(discover: DiscoverConfig) -> dict[str, dict[str, Any]]:
    """{task name: its task config as a mapping} for the data `discover` describes (absolute paths).
    Raises DataError for a bad record (file, line, field) and ConfigError for a source that cannot hold
    several tasks, names that collide, or overrides of a task the data does not hold."""
    source = discover.source.model_dump(mode="json", exclude_defaults=True)
    source["format"] = discover.source.format
    if discover.source.format == "unified":
        found = {name: {**source, "task_key": value} for name, value in _unified_names(discover).items()}
    elif discover.source.format in SUFFIXES:
        found = _folder_tasks(discover, source)
    else:
        raise ConfigError(
            "discover reads a unified file or a folder of jsonl, csv, tsv or conll files, "
            f"not {discover.source.format}",
            field=f"{FIELD}.source.format",
        )
    if not found:
        suffixes = ", ".join(SUFFIXES.get(discover.source.format, ()))
        where = f" (no {suffixes} file in the folder)" if discover.source.format in SUFFIXES else ""
        raise ConfigError(f"the data holds no task{where}", field=f"{FIELD}.source.train")
    for key in ("source", "type"):  # what discover itself sets
        if key in discover.defaults:
            raise ConfigError(f"defaults may not set '{key}': discover sets it", field=f"{FIELD}.defaults.{key}")
    unknown = sorted(set(discover.overrides) - set(found))
    if unknown:
        named = f" (as a task it is named '{task_name(unknown[0])}')" if task_name(unknown[0]) in found else ""
        raise ConfigError(
            f"overrides names '{unknown[0]}', a task the data does not hold{named}", field=f"{FIELD}.overrides"
        )
    for name, own in discover.overrides.items():
        if "source" in own:
            raise ConfigError(
                "an override may not set 'source': discover finds each task's data", field=f"{FIELD}.overrides.{name}"
            )
    tasks = {}
    for name, task_source in found.items():
        entry: dict[str, Any] = {"type": discover.type, **copy.deepcopy(discover.defaults), "source": task_source}
        entry.update(copy.deepcopy(discover.overrides.get(name, {})))
        tasks[name] = entry
    return tasks


def task_name(value: str) -> str:
    """A valid task name for a data value: each character a task name may not hold (anything but letters,
    digits, `_` and `-`) becomes `_`."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", value)[:64]
    return name if NAME_PATTERN.match(name) else f"t{name}"[:64]


def _unified_names(discover: DiscoverConfig) -> dict[str, str]:
    """{task name: the records' task value} in the order values first appear in the train file."""
    train = discover.source.train
    files = [train] if isinstance(train, str) else list(train or [])
    names: dict[str, str] = {}
    for path in files:
        for row in read_unified(path, discover.source.encoding):
            value = str(row.get("task"))
            if not value.strip():
                raise row.error("a task value must not be blank", "task")
            name = task_name(value)
            if names.get(name, value) != value:
                raise row.error(f"task '{value}' and task '{names[name]}' both become the task name '{name}'", "task")
            names.setdefault(name, value)
    return names


def _folder_tasks(discover: DiscoverConfig, source: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One task per file of the train folder; the same name in the validation and test folders."""
    train = discover.source.train
    if isinstance(train, str) and not Path(train).exists():
        raise ConfigError(f"folder not found: {train}", field=f"{FIELD}.source.train")
    if not isinstance(train, str) or not Path(train).is_dir():
        raise ConfigError(
            "discover with this format reads a folder of files, one per task: give the folder as train",
            field=f"{FIELD}.source.train",
        )
    suffixes = SUFFIXES[discover.source.format]
    folders = {split: getattr(discover.source, split) for split in SPLITS}
    for split, folder in folders.items():
        if isinstance(folder, str) and not Path(folder).exists():
            raise ConfigError(f"folder not found: {folder}", field=f"{FIELD}.source.{split}")
        if folder is not None and not (isinstance(folder, str) and Path(folder).is_dir()):
            raise ConfigError(f"{split} must be a folder too, beside the train folder", field=f"{FIELD}.source.{split}")
    tasks: dict[str, dict[str, Any]] = {}
    stems: dict[str, str] = {}
    for path in sorted(Path(train).iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue  # hidden files (editors', the OS's) are not tasks
        name = task_name(path.stem)
        if name in stems:
            raise ConfigError(
                f"files '{stems[name]}' and '{path.name}' both become the task name '{name}'",
                file=str(path),
                field=f"{FIELD}.source.train",
            )
        stems[name] = path.name
        entry = {**source}
        for split, folder in folders.items():
            own = None if folder is None else Path(folder) / path.name
            entry[split] = str(own) if own is not None and own.is_file() else None
        entry["train"] = str(path)
        tasks[name] = {key: value for key, value in entry.items() if value is not None}
    return tasks
