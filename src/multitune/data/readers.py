"""Readers for local JSONL, CSV/TSV, CoNLL token files, Hugging Face datasets and the unified record file.

Each reader yields `Row`s: the values of one record plus where it came from, so that any later error can
name the file, the line and the field.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from multitune.errors import DataError

QUOTING: dict[str, Any] = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE, "all": csv.QUOTE_ALL}
MAX_LINE_CHARS = 1_000_000
BLANK = re.compile(r"^\s*$")


@dataclass(frozen=True)
class Row:
    """One record: `values` is a dict (JSON, header CSV, HF) or a list (CSV without header, CoNLL)."""

    values: dict[str, Any] | list[Any]
    file: str
    line: int

    def error(self, message: str, field: str | int | None = None) -> DataError:
        return DataError(message, file=self.file, line=self.line, field=None if field is None else str(field))

    def get(self, field: str | int) -> Any:
        values = self.values
        if isinstance(field, int):
            if isinstance(values, dict):
                values = list(values.values())
            if not -len(values) <= field < len(values):
                raise self.error(f"row has {len(values)} columns, no column {field}", field)
            return values[field]
        if isinstance(values, list):
            raise self.error("field names need a header row or 'columns'; use a column index instead", field)
        if field not in values:
            raise self.error("missing field", field)
        return values[field]


def decoded_lines(path: str, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text) with a clear error on a missing file or on bytes that do not decode."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a file", file=path) from None
    except OSError as error:
        raise DataError(f"cannot open: {error.strerror}", file=path) from None
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        handle.close()
        raise DataError(f"unknown encoding '{encoding}'", file=path, field="encoding") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as error:
                raise DataError(f"bytes that are not {encoding} ({error.reason})", file=path, line=number) from None
            if len(text) > MAX_LINE_CHARS:
                raise DataError(f"line longer than {MAX_LINE_CHARS:,} characters", file=path, line=number)
            yield number, text


def json_rows(lines: Iterable[tuple[int, str]], path: str) -> Iterator[Row]:
    """One JSON object per non-blank line."""
    for number, text in lines:
        if BLANK.match(text):
            continue
        try:
            value = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as error:
            raise DataError(f"invalid JSON: {error.msg} at column {error.colno}", file=path, line=number) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {type(value).__name__}", file=path, line=number)
        yield Row(value, path, number)


def read_jsonl(path: str, encoding: str = "utf-8-sig") -> Iterator[Row]:
    return json_rows(decoded_lines(path, encoding), path)


def read_delimited(
    path: str,
    delimiter: str,
    quoting: str = "minimal",
    header: bool = True,
    columns: list[str] | None = None,
    encoding: str = "utf-8-sig",
) -> Iterator[Row]:
    numbered = decoded_lines(path, encoding)
    position = {"line": 0}

    def texts() -> Iterator[str]:
        for number, text in numbered:
            position["line"] = number
            yield text

    reader = csv.reader(texts(), delimiter=delimiter, quoting=QUOTING[quoting], strict=True)
    names = columns
    while True:
        line = position["line"] + 1  # a quoted field may span lines: name the row's first
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise DataError(
                f"malformed {delimiter!r}-separated row: {error}", file=path, line=position["line"]
            ) from None
        if not cells or all(not c.strip() for c in cells):
            continue
        if header and names is None:
            names = [c.strip() for c in cells]
            continue
        if names is not None:
            if len(cells) < len(names):
                raise DataError(f"row has {len(cells)} columns, header has {len(names)}", file=path, line=line)
            yield Row(dict(zip(names, cells, strict=False)), path, line)
        else:
            yield Row(cells, path, line)


def read_conll(path: str, token_column: int = 0, tag_column: int = -1, encoding: str = "utf-8-sig") -> Iterator[Row]:
    """Sentences of a CoNLL-style file: one token per line, a blank (or whitespace-only) line between."""
    tokens: list[str] = []
    tags: list[str] = []
    first = 0
    for number, text in decoded_lines(path, encoding):
        if BLANK.match(text):
            if tokens:
                yield Row({"tokens": tokens, "tags": tags}, path, first)
                tokens, tags = [], []
            continue
        cells = text.rstrip("\r\n").split("\t") if "\t" in text else text.split()
        if cells[0].startswith("-DOCSTART-"):
            continue
        try:
            token, tag = cells[token_column], cells[tag_column]
        except IndexError:
            raise DataError(
                f"line has {len(cells)} columns, need columns {token_column} and {tag_column}", file=path, line=number
            ) from None
        if not tokens:
            first = number
        tokens.append(token.strip())
        tags.append(tag.strip())
    if tokens:
        yield Row({"tokens": tokens, "tags": tags}, path, first)


def read_hf(
    dataset: str,
    split: str,
    subset: str | None = None,
    data_files: dict[str, str | list[str]] | None = None,
    trust_remote_code: bool = False,
) -> Iterator[Row]:
    """Rows of a Hugging Face dataset split: a hub id when online, or a builder with local data_files."""
    import datasets

    where = f"{dataset}[{split}]"
    try:
        kwargs: dict[str, Any] = {"split": split}
        if data_files:
            kwargs["data_files"] = data_files
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        loaded = datasets.load_dataset(dataset, subset, **kwargs)
    except FileNotFoundError as error:
        raise DataError(f"dataset not found: {error}", file=where) from None
    except Exception as error:  # datasets raises many types; all mean "cannot load this split"
        raise DataError(f"cannot load dataset: {type(error).__name__}: {error}", file=where) from None
    names = _class_label_names(loaded.features)
    for index, record in enumerate(loaded):
        values = dict(record)
        for column, vocabulary in names.items():  # class ids -> their names, as in local files
            value = values.get(column)
            if isinstance(value, int):
                values[column] = vocabulary[value]
            elif isinstance(value, list):
                values[column] = [vocabulary[v] if isinstance(v, int) else v for v in value]
        yield Row(values, where, index + 1)


def _class_label_names(features: Any) -> dict[str, list[str]]:
    import datasets

    names: dict[str, list[str]] = {}
    for column, feature in (features or {}).items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, datasets.ClassLabel):
            names[column] = list(feature.names)
        elif isinstance(feature, list) and feature and isinstance(feature[0], datasets.ClassLabel):
            names[column] = list(feature[0].names)
        elif isinstance(inner, datasets.ClassLabel):
            names[column] = list(inner.names)
    return names


def read_unified(path: str, encoding: str = "utf-8-sig") -> Iterator[Row]:
    """Records `{"task", "instruction", "input", "output"}` for many tasks in one JSONL file."""
    for row in read_jsonl(path, encoding):
        task = row.get("task")
        if not isinstance(task, str) or not task:
            raise row.error("must be a non-empty string", "task")
        yield row
