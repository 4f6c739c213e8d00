"""From a task's config to its examples: read the source, extract fields, split, subsample, build labels."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from multitune.config import SPLITS, SourceConfig, TaskConfig
from multitune.data.generative import input_texts, instruction_of, read_parallel, target_text
from multitune.data.images import image_reference, read_image_folder
from multitune.data.readers import (
    Row,
    parquet_rows,
    read_conll,
    read_delimited,
    read_hf,
    read_jsonl,
    read_parquet,
    read_unified,
    row_number,
)
from multitune.data.streaming import (
    BUFFER_ROWS,
    STREAMED_EVAL_ROWS,
    StreamSource,
    UnifiedIndex,
    buffer_rows,
    count_blocks,
    count_lines,
    reservoir,
)
from multitune.errors import DataError

# regression targets train as float32, raw (normalize_targets: false) or standardised; the squared error of a
# raw target must stay far inside float32's range (3.4e38) and the float64 mean and spread of any number of
# targets finite: 1e15 squared is 1e30. Larger values are a unit or sentinel mistake, refused at their row.
MAX_TARGET = 1e15
DIGITS = re.compile(r"[0-9]+")  # ASCII only: int() also reads other scripts' digits, str.isdigit() superscripts


@dataclass(frozen=True)
class Example:
    """One input of a task: one or two texts, or a token list; its label when known; where it came from."""

    texts: tuple[str, ...]  # one text, a pair, or the tokens of a token task; an image task: its image's path
    label: str | float | tuple[str, ...] | None  # generation tasks: the target text
    file: str = ""
    line: int = 0
    instruction: str | None = None  # generation tasks: what the prompt asks for
    image: Any = None  # image tasks: a file path, or a Hugging Face Image value (data/images.py)

    def error(self, message: str, field_name: str) -> DataError:
        return DataError(message, file=self.file or None, line=self.line or None, field=field_name)


@dataclass
class TaskData:
    """A task's examples per split and the vocabulary its head predicts."""

    name: str
    config: TaskConfig
    splits: dict[str, list[Example]]
    labels: list[str] | None = None  # classes or tags; None for regression
    target_mean: float = 0.0  # regression: targets are standardised with these
    target_std: float = 1.0
    notes: list[str] = field(default_factory=list)
    stream: StreamSource | None = None  # a streamed train split (then `splits` has no "train")
    target_range: tuple[float, float] | None = None  # a streamed regression task's smallest and largest target

    @property
    def train_rows(self) -> int:
        """The training rows the sampler counts: those in memory, or a streamed split's `num_rows`."""
        return self.stream.num_rows if self.stream is not None else len(self.splits["train"])


# --- value extraction ---------------------------------------------------------------------------


def _text(row: Row, value: Any, name: str | int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise row.error(f"expected text, got {type(value).__name__}", name)


def _tokens(row: Row, value: Any, name: str | int) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise row.error("expected a list of token strings", name)
    if not value:
        raise row.error("empty token list", name)
    blank = next((i for i, token in enumerate(value) if not token.strip()), None)
    if blank is not None:  # a word of no characters gets no sub-token, so its tag could never be learned
        raise row.error(f"word {blank + 1} of {len(value)} is blank", name)
    return tuple(value)


def _label(row: Row, value: Any, name: str | int, task: TaskConfig) -> str | float | tuple[str, ...]:
    if task.type == "generation":
        return target_text(row, value, name, task)
    if task.type == "regression":
        return _target(row, value, name)
    if task.type == "token_classification":
        if not isinstance(value, list) or not all(isinstance(t, (str, int)) for t in value):
            raise row.error("expected a list of tags", name)
        return tuple(_class_name(row, t, name, task) for t in value)
    if isinstance(value, (list, dict)) or value is None or (isinstance(value, float) and not value.is_integer()):
        raise row.error(f"expected a class label, got {value!r}", name)
    return _class_name(row, value, name, task)


def _target(row: Row, value: Any, name: str | int) -> float:
    """A regression target: a finite number within ±MAX_TARGET (a JSON boolean is not a number here)."""
    number = row_number(row, value, name, "expected a number")
    if abs(number) > MAX_TARGET:
        raise row.error(f"target {number:g} is beyond ±{MAX_TARGET:g}", name)
    return number


def _class_name(row: Row, value: Any, name: str | int, task: TaskConfig) -> str:
    """A label as text. A label of ASCII digits (or an integer), as in GLUE files, indexes the configured
    `labels`; but when any configured label is itself digits, every digit label is a name (then `0` with
    labels 1-5 is an unknown label), so that no value is read as an index and as a name in one task. A JSON
    boolean is a label only where `labels` lists it ("true" / "false"); elsewhere it is an error. A Hugging
    Face dataset's class names (ids already turned into names by the reader) are always names, even digits."""
    if isinstance(value, bool):
        text = str(value).lower()
        if task.labels is None or text not in task.labels:
            raise row.error(
                f"expected a class label, got the boolean {text} (list labels: [false, true] to use booleans)", name
            )
        return text
    if isinstance(value, float):
        value = int(value)
    text = str(value).strip()
    if not text:
        raise row.error("empty label", name)
    named = isinstance(name, str) and name in row.named  # a dataset's class name, never an index
    if task.labels and DIGITS.fullmatch(text) and not digit_names(task.labels) and not named:
        index = int(text)
        if index >= len(task.labels):
            raise row.error(
                f"label index {index} is beyond the {len(task.labels)} configured labels (0-{len(task.labels) - 1})",
                name,
            )
        return task.labels[index]
    return text


def digit_names(labels: list[str]) -> bool:
    """Whether a configured label is itself a number: then digit labels in the data are names, not indexes."""
    return any(DIGITS.fullmatch(label.strip()) for label in labels)


def example_from_fields(row: Row, task: TaskConfig) -> Example:
    fields = task.text_fields or []
    if task.modality == "image":
        image = image_reference(row, row.get(fields[0]), fields[0])
        label = _label(row, row.get(task.label_field), task.label_field, task)
        return Example((image,) if isinstance(image, str) else (), label, row.file, row.line, image=image)
    if task.type == "token_classification":
        tokens = _tokens(row, row.get(fields[0]), fields[0])
        label = _label(row, row.get(task.label_field), task.label_field, task)
        return _checked_tags(row, Example(tokens, label, row.file, row.line), task.label_field)
    texts = tuple(_text(row, row.get(f), f) for f in fields)
    label = _label(row, row.get(task.label_field), task.label_field, task)
    return Example(texts, label, row.file, row.line, task.instruction if task.type == "generation" else None)


def example_from_record(row: Row, task: TaskConfig) -> Example:
    """A unified record: `input` is a text, a pair of texts or a token list; `output` the label."""
    value = row.get("input")
    if task.type == "generation":
        texts = input_texts(row, value, "input")
        return Example(
            texts, _label(row, row.get("output"), "output", task), row.file, row.line, instruction_of(row, task)
        )
    if task.type == "token_classification":
        tokens = _tokens(row, value, "input")
        return _checked_tags(
            row, Example(tokens, _label(row, row.get("output"), "output", task), row.file, row.line), "output"
        )
    if isinstance(value, dict):
        value = list(value.values())
    texts = tuple(_text(row, v, "input") for v in value) if isinstance(value, list) else (_text(row, value, "input"),)
    want = 2 if task.type == "pair_classification" else len(task.text_fields or [1])
    either = task.type in ("classification", "regression")  # one text, or a pair of texts
    if len(texts) != want and not (either and len(texts) in (1, 2)):
        expected = "1 or 2 texts" if either else f"{want} text(s)"
        raise row.error(f"expected {expected} for a {task.type} task, got {len(texts)}", "input")
    return Example(texts, _label(row, row.get("output"), "output", task), row.file, row.line)


def _checked_tags(row: Row, example: Example, name: str | int) -> Example:
    tags = example.label
    assert isinstance(tags, tuple)
    if len(tags) != len(example.texts):
        raise row.error(f"{len(tags)} tags for {len(example.texts)} tokens", name)
    return example


def to_iob2(tags: tuple[str, ...]) -> tuple[str, ...]:
    """IOB1 -> IOB2: an `I-X` that opens an entity (after `O` or another type) becomes `B-X`."""
    out: list[str] = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return tuple(out)


# --- reading a source ---------------------------------------------------------------------------


class UnifiedFiles:
    """Reads each unified file once and routes its records by `task`; a record for no task is an error."""

    def __init__(self, routes: dict[str, set[str]]) -> None:
        self._routes = routes  # path -> the task keys configured on it
        self._cache: dict[str, dict[str, list[Row]]] = {}
        self._indexes: dict[str, UnifiedIndex] = {}

    def index(self, path: str, key: str, encoding: str) -> UnifiedIndex:
        """Where each task's records start in the file (built once per file): streamed tasks read there."""
        if path not in self._indexes:
            self._indexes[path] = UnifiedIndex(path, encoding, self._routes.get(path, {key}))
        return self._indexes[path]

    def rows(self, path: str, key: str, encoding: str) -> list[Row]:
        if path not in self._cache:
            grouped: dict[str, list[Row]] = {}
            known = self._routes.get(path, {key})
            for row in read_unified(path, encoding):
                task = row.get("task")
                if task not in known:
                    raise row.error(
                        f"no configured task '{task}' (this file feeds: {', '.join(sorted(known))})", "task"
                    )
                grouped.setdefault(task, []).append(row)
            self._cache[path] = grouped
        return self._cache[path].get(key, [])


def unified_routes(tasks: dict[str, TaskConfig]) -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for name, task in tasks.items():
        if task.source.format == "unified":
            for split in SPLITS:
                paths = getattr(task.source, split) or []
                for path in [paths] if isinstance(paths, str) else paths:
                    routes.setdefault(path, set()).add(task.source.task_key or name)
    return routes


def read_split(
    name: str,
    task: TaskConfig,
    split: str,
    unified: UnifiedFiles,
    trust_remote_code: bool = False,
    notes: list[str] | None = None,
) -> list[Example] | None:
    """The examples of one split, or None when the source has no such split (or, for test, no labels)."""
    source: SourceConfig = task.source
    if source.format == "hf":
        hf_split = source.split_names.get(split, split)
        if source.data_files is not None and hf_split not in source.data_files:
            return None
        if (
            source.data_files is None
            and split != "train"
            and split not in source.split_names
            and not _hf_has_split(source, hf_split)
        ):
            return None
        hf_rows = list(read_hf(source.dataset or "", hf_split, source.subset, source.data_files, trust_remote_code))
        if _without_labels(task, split, hf_rows, notes if notes is not None else []):
            return None
        return [example_from_fields(row, task) for row in hf_rows]
    paths = getattr(source, split)
    if not paths:
        return None
    if source.format == "parallel":
        return _parallel_examples(task, paths[0], paths[1])
    if source.format == "imagefolder":
        return [
            example_from_fields(row, task)
            for p in ([paths] if isinstance(paths, str) else paths)
            for row in read_image_folder(p)
        ]
    examples: list[Example] = []
    for path in [paths] if isinstance(paths, str) else paths:
        examples += _read_file(name, task, path, unified)
    return examples


def _without_labels(task: TaskConfig, split: str, rows: list[Row], notes: list[str]) -> bool:
    """Whether a Hugging Face split has no labels at all (class id -1 or None in every row: GLUE's test splits).

    Such a test split is left out and not scored (the report scores validation instead, as for any task
    without a test split, and says so); a train or validation split without labels is an error, and so is
    a split where only some rows lack their label."""
    label = task.label_field

    def hidden(row: Row) -> bool:
        values = row.values
        column = list(values)[label] if isinstance(label, int) and -len(values) <= label < len(values) else label
        return column in row.hidden

    unlabelled = [row for row in rows if hidden(row)]
    if not unlabelled:
        return False
    if len(unlabelled) < len(rows):
        raise unlabelled[0].error("no label (class id -1 or None) in a split whose other rows have labels", label)
    if split != "test":
        raise DataError(
            f"the {split} split has no labels (class id -1 or None in every row, the convention for an unlabelled "
            "split); name a labelled split in split_names or data_files",
            file=rows[0].file,
            field=str(label),
        )
    notes.append(f"test: {rows[0].file} has no labels (class id -1 in every row), so it is not scored")
    return True


def _read_file(name: str, task: TaskConfig, path: str, unified: UnifiedFiles) -> list[Example]:
    return list(file_examples(name, task, path, unified))


def file_examples(name: str, task: TaskConfig, path: str, unified: UnifiedFiles) -> Iterator[Example]:
    """The examples of one file, read lazily (a streamed unified file: at its index of the task's records)."""
    source = task.source
    rows: Iterator[Row] | list[Row]
    extract: Callable[[Row, TaskConfig], Example] = example_from_fields
    if source.format == "jsonl":
        rows = read_jsonl(path, source.encoding)
    elif source.format in ("csv", "tsv"):
        delimiter = source.delimiter or ("," if source.format == "csv" else "\t")
        rows = read_delimited(path, delimiter, source.quoting, source.header, source.columns, source.encoding)
    elif source.format == "parquet":
        rows = read_parquet(path)
    elif source.format == "conll":
        rows = read_conll(path, source.token_column, source.tag_column, source.encoding)
        return (Example(tuple(r.values["tokens"]), tuple(r.values["tags"]), r.file, r.line) for r in rows)  # type: ignore[call-overload]
    elif source.streaming:
        rows = unified.index(path, source.task_key or name, source.encoding).rows(source.task_key or name)
        extract = example_from_record
    else:
        rows = unified.rows(path, source.task_key or name, source.encoding)
        extract = example_from_record
    return (extract(row, task) for row in rows)


def _parallel_examples(task: TaskConfig, source_file: str, target_file: str) -> list[Example]:
    """A generation task's examples from a source file and its line-aligned target file."""
    return list(_parallel_lazily(task, source_file, target_file))


def _hf_has_split(source: SourceConfig, split: str) -> bool:
    import datasets

    try:
        return split in datasets.get_dataset_split_names(source.dataset or "", source.subset)
    except Exception:  # offline or unknown: let the load itself report
        return split == "train"


def seeded_subsample(examples: list[Example], k: int | None, seed: int | str) -> list[Example]:
    """`k` of `examples` drawn with `seed`, in their order (all of them when there are no more than `k`)."""
    if k is None or len(examples) <= k:
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), k))
    return [examples[i] for i in keep]


def split_source(task: TaskConfig, split: str) -> str | None:
    """What an error about a split names: its file(s), or the Hugging Face dataset."""
    given = getattr(task.source, split, None)
    return (given if isinstance(given, str) else ", ".join(given)) if given else task.source.dataset


def load_task(
    name: str,
    task: TaskConfig,
    seed: int,
    unified: UnifiedFiles,
    trust_remote_code: bool = False,
    buffer: int = BUFFER_ROWS,
    train_pass: bool = True,
) -> TaskData:
    """Task `name`'s data; `buffer`: a streamed train split's shuffle buffer unless its source sets one;
    `train_pass` False: a streamed train split is neither counted nor read (see `load_streamed_task`)."""
    if task.source.streaming:
        return load_streamed_task(name, task, seed, unified, trust_remote_code, buffer, train_pass)
    splits: dict[str, list[Example]] = {}
    notes: list[str] = []
    for split in SPLITS:
        examples = read_split(name, task, split, unified, trust_remote_code, notes)
        if examples is not None:
            splits[split] = examples
    train_file = split_source(task, "train")
    if not splits.get("train"):
        raise DataError(f"task '{name}' has no training rows", file=train_file)
    for split, examples in splits.items():  # a named but empty split would fail only at its first evaluation
        if not examples:
            raise DataError(f"task '{name}' has no {split} rows", file=split_source(task, split))
    if task.type == "token_classification" and task.tag_scheme == "iob1":
        splits = {s: [Example(e.texts, to_iob2(e.label), e.file, e.line) for e in xs] for s, xs in splits.items()}  # type: ignore[arg-type]
    # the label set is the train file's, read before any validation is carved from it or any max_rows sample is
    # drawn: a class that a small sample happens to miss is still one of the task's classes
    no_vocabulary = task.labels is not None or task.type in ("regression", "generation")
    train_labels = None if no_vocabulary else _seen(splits["train"])
    if "validation" not in splits:
        splits["train"], splits["validation"] = carve(splits["train"], task.validation_fraction, f"{seed}:{name}:carve")
        notes.append(f"validation: {len(splits['validation'])} rows carved from train")
        if not splits["train"] or not splits["validation"]:
            raise DataError(f"task '{name}' has too few training rows to carve a validation split", file=train_file)
    for split in list(splits):
        limit = getattr(task.max_rows, split)
        splits[split] = seeded_subsample(splits[split], limit, f"{seed}:{name}:{split}")
    if task.shuffle_labels:
        labels = [e.label for e in splits["train"]]
        random.Random(f"{seed}:{name}:shuffle").shuffle(labels)
        splits["train"] = [replace(e, label=label) for e, label in zip(splits["train"], labels, strict=True)]
        notes.append("training labels shuffled (a control task)")
    data = TaskData(name, task, splits, notes=notes)
    if task.type == "regression":
        targets = [float(e.label) for e in splits["train"]]  # type: ignore[arg-type]
        data.target_mean = sum(targets) / len(targets)
        variance = sum((t - data.target_mean) ** 2 for t in targets) / len(targets)
        data.target_std = math.sqrt(variance) if variance > 0 else 1.0
        if not task.normalize_targets:
            data.target_mean, data.target_std = 0.0, 1.0
    elif task.type != "generation":  # a generation task's targets are free text
        data.labels = label_vocabulary(data, train_labels)
    return data


def labels_of(example: Example) -> tuple[str, ...]:
    """The example's label as a tuple: its tags (token classification), or its one class."""
    return example.label if isinstance(example.label, tuple) else (str(example.label),)


def _seen(examples: Iterable[Example]) -> set[str]:
    """Every label (tag) the examples carry."""
    return {label for example in examples for label in labels_of(example)}


# --- streamed tasks (data/streaming.py) ----------------------------------------------------------------


def split_examples(
    name: str, task: TaskConfig, split: str, unified: UnifiedFiles, trust_remote_code: bool = False
) -> Iterator[Example] | None:
    """A streamed source's split as examples read lazily, or None when the source has no such split."""
    source = task.source
    if source.format == "hf":
        hf_split = source.split_names.get(split, split)
        if source.data_files is not None and hf_split not in source.data_files:
            return None
        named = source.data_files is not None or split == "train" or split in source.split_names
        if not named and not _hf_has_split(source, hf_split):
            return None
        rows = read_hf(source.dataset or "", hf_split, source.subset, source.data_files, trust_remote_code, True)
        return (example_from_fields(row, task) for row in rows)
    paths = getattr(source, split)
    if not paths:
        return None
    if source.format == "parallel":
        return iter(_parallel_lazily(task, paths[0], paths[1]))
    files = [paths] if isinstance(paths, str) else paths
    examples = (example for path in files for example in file_examples(name, task, path, unified))
    if task.type == "token_classification" and task.tag_scheme == "iob1":
        return (Example(e.texts, to_iob2(e.label), e.file, e.line) for e in examples)  # type: ignore[arg-type]
    return examples


def _parallel_lazily(task: TaskConfig, source_file: str, target_file: str) -> Iterator[Example]:
    """A generation task's examples from a source file and its line-aligned target file, read lazily."""
    for row in read_parallel(source_file, target_file, task.source.encoding):
        values = row.values
        assert isinstance(values, dict)
        target = target_text(Row(values, target_file, row.line), values["target"], "target", task)
        yield Example((values["source"],), target, row.file, row.line, task.instruction)


def counted_rows(name: str, task: TaskConfig, unified: UnifiedFiles) -> int:
    """A streamed train split's rows, counted without making examples of them: lines read as bytes (JSONL,
    parallel), CSV/TSV records (the csv reader's, so a quoted line break stays inside its record), CoNLL
    sentences, a Parquet footer, a unified file's index, or a dataset's own split sizes (a dataset that has
    none, such as local data_files, is read through once). Declare num_rows to skip the count."""
    source = task.source
    if source.format == "hf":
        split = source.split_names.get("train", "train")
        count = _hf_split_rows(source, split)
        if count is None:  # a dataset without split sizes (local data_files): one pass over its rows
            count = sum(
                1 for _ in read_hf(source.dataset or "", split, source.subset, source.data_files, streaming=True)
            )
        return count
    paths = source.train or []
    if source.format == "parallel":
        return count_lines(paths[0], source.encoding)
    total = 0
    for path in [paths] if isinstance(paths, str) else paths:
        if source.format == "conll":
            total += count_blocks(path, source.encoding)
        elif source.format == "parquet":
            total += parquet_rows(path)
        elif source.format == "unified":
            total += unified.index(path, source.task_key or name, source.encoding).count(source.task_key or name)
        elif source.format in ("csv", "tsv"):  # the csv reader's records: a quoted line break is inside one
            delimiter = source.delimiter or ("," if source.format == "csv" else "\t")
            records = read_delimited(path, delimiter, source.quoting, source.header, source.columns, source.encoding)
            total += sum(1 for _ in records)
        else:
            total += count_lines(path, source.encoding)
    return total


def _hf_split_rows(source: SourceConfig, split: str) -> int | None:
    import datasets

    try:
        builder = datasets.load_dataset_builder(source.dataset or "", source.subset, data_files=source.data_files)
        splits = builder.info.splits or {}
        return int(splits[split].num_examples) if split in splits and splits[split].num_examples else None
    except Exception:  # offline, or a builder that knows no sizes before reading
        return None


def load_streamed_task(
    name: str,
    task: TaskConfig,
    seed: int,
    unified: UnifiedFiles,
    trust_remote_code: bool = False,
    buffer: int = BUFFER_ROWS,
    train_pass: bool = True,
) -> TaskData:
    """A task whose train split streams: validation and test read into memory (a seeded sample of at most
    max_rows, default STREAMED_EVAL_ROWS, in one pass), the train split counted, and, when the config does
    not give them, its labels (classification, tags) or its targets' mean, spread and range (regression)
    gathered in one pass over it. A streamed task needs a validation split of its own.
    With `train_pass` False (scoring a finished run, whose tasks.json holds the labels and target scaling the
    heads were trained with), the train split is not read at all: its row count is the declared `num_rows`
    or 0, and the labels and target statistics are left for the caller to set."""
    splits: dict[str, list[Example]] = {}
    notes: list[str] = []
    for split in ("validation", "test"):
        rows = split_examples(name, task, split, unified, trust_remote_code)
        if rows is None:
            continue
        limit = getattr(task.max_rows, split) or STREAMED_EVAL_ROWS
        splits[split] = reservoir(rows, limit, f"{seed}:{name}:{split}")
        if not splits[split]:
            raise DataError(f"task '{name}' has no {split} rows", file=split_source(task, split))
    train_file = split_source(task, "train")
    if "validation" not in splits:
        raise DataError(
            f"task '{name}' streams its train split: give it a validation split (carving one from train would "
            "read the whole split into memory)",
            file=train_file,
        )
    if not train_pass:
        source = StreamSource(lambda: iter(()), task.source.num_rows or 0, 1, train_file or name)
        return TaskData(name, task, splits, notes=[*notes, "train: streamed, not read"], stream=source)
    num_rows = task.source.num_rows or counted_rows(name, task, unified)
    if num_rows < 1:
        raise DataError(f"task '{name}' has no training rows", file=train_file)

    def train() -> Iterator[Example]:
        found = split_examples(name, task, "train", unified, trust_remote_code)
        if found is None:
            raise DataError(f"task '{name}' has no training rows", file=train_file)
        return found

    source = StreamSource(train, num_rows, task.source.shuffle_buffer or buffer, train_file or name)
    data = TaskData(name, task, splits, notes=notes, stream=source)
    notes.append(f"train: streamed, {num_rows} rows ({'declared' if task.source.num_rows else 'counted'})")
    _streamed_statistics(data, train())
    return data


def _streamed_statistics(data: TaskData, rows: Iterator[Example]) -> None:
    """What a streamed task's head needs from its train split, gathered in one pass when the config does not
    give it: the label vocabulary, or the regression targets' mean, spread (Welford) and range."""
    task = data.config
    if task.type == "generation":
        return
    if task.type == "regression":
        count, mean, square, low, high = 0, 0.0, 0.0, math.inf, -math.inf
        for example in rows:
            value = float(example.label)  # type: ignore[arg-type]
            count += 1
            delta = value - mean
            mean += delta / count
            square += delta * (value - mean)
            low, high = min(low, value), max(high, value)
        if count == 0:
            raise DataError(f"task '{data.name}' has no training rows", file=split_source(task, "train"))
        data.target_range = (low, high)
        if task.normalize_targets:
            data.target_mean = mean
            data.target_std = math.sqrt(square / count) if square > 0 else 1.0
        return
    data.labels = label_vocabulary(data, None if task.labels is not None else _seen(rows))


def carve(examples: list[Example], fraction: float, seed: str) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_validation = max(1, round(fraction * len(examples))) if len(examples) > 1 else 0
    held = set(order[:n_validation])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def label_field_name(task: TaskConfig) -> str:
    """The field an error about a row's label names: the unified format's `output`, else the label field."""
    return "output" if task.source.format == "unified" else str(task.label_field)


def label_vocabulary(data: TaskData, seen_in_train: set[str] | None = None) -> list[str]:
    """The configured labels, or those seen in train (sorted; `O` first for tags); others are errors.
    `seen_in_train`: the labels of the whole train split (a streamed task's gathered in its pass over it, a
    read task's taken before max_rows sampled it); default: those of `data.splits["train"]`."""
    task = data.config
    field_name = label_field_name(task)

    if task.labels is not None:
        vocabulary = list(task.labels)
        check = list(data.splits)
    else:
        seen = seen_in_train if seen_in_train is not None else _seen(data.splits["train"])
        vocabulary = sorted(
            seen, key=lambda tag: (tag != "O", tag[2:], tag) if task.type == "token_classification" else tag
        )
        check = [s for s in data.splits if s != "train"]
        if task.type != "token_classification" and len(vocabulary) < 2:
            raise DataError(
                f"task '{data.name}' has only one label in train: {vocabulary}", file=str(task.source.train)
            )
    if task.type == "token_classification" and "entity_f1" in (task.metrics or []):
        _check_iob2(data, vocabulary)
    known = set(vocabulary)
    if task.positive_label is not None and task.positive_label not in known:
        raise DataError(
            f"positive_label '{task.positive_label}' is not a label of task '{data.name}' ({', '.join(vocabulary)})"
        )
    for split in check:
        for example in data.splits[split]:
            for label in labels_of(example):
                if label not in known:
                    raise example.error(
                        f"unknown label '{label}' in {split} (task '{data.name}' knows: {', '.join(vocabulary)})",
                        field_name,
                    )
    return vocabulary


def _check_iob2(data: TaskData, vocabulary: list[str]) -> None:
    """entity_f1 reads tags as IOB2 and refuses any other at scoring time, which would be the first validation
    of a run already under way: a tag that is not `O`, `B-X` or `I-X` is refused here, where it was read."""

    def iob2(tag: str) -> bool:
        return tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)

    for split, examples in data.splits.items():
        for example in examples:
            bad = next((tag for tag in labels_of(example) if not iob2(tag)), None)
            if bad is not None:
                raise example.error(
                    f"tag '{bad}' in {split} is not IOB2 (O, B-TYPE or I-TYPE), which entity_f1 needs",
                    label_field_name(data.config),
                )
    bad = next((tag for tag in vocabulary if not iob2(tag)), None)
    if bad is not None:
        raise DataError(f"tag '{bad}' is not IOB2 (O, B-TYPE or I-TYPE), which entity_f1 needs", field="labels")


def load_tasks(
    tasks: dict[str, TaskConfig], seed: int, trust_remote_code: bool = False, train_pass: bool = True
) -> dict[str, TaskData]:
    """Every task's data (see `load_task`)."""
    unified = UnifiedFiles(unified_routes(tasks))
    buffer = buffer_rows(sum(task.source.streaming for task in tasks.values()))
    return {
        name: load_task(name, task, seed, unified, trust_remote_code, buffer, train_pass)
        for name, task in tasks.items()
    }
