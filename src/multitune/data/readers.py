"""Readers for local JSONL, CSV/TSV, CoNLL token files, Hugging Face datasets and the unified record file.

Each reader yields `Row`s: the values of one record plus where it came from, so that any later error can
name the file, the line and the field.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from multitune.errors import DataError

QUOTING: dict[str, Any] = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE, "all": csv.QUOTE_ALL}
MAX_LINE_CHARS = 1_000_000
MAX_JSON_DEPTH = 100  # a data row is a few levels deep; deeper nesting is refused before anything recurses on it
BLANK = re.compile(r"^\s*$")
# a code point of a UTF-16 surrogate half on its own is not text: no tokenizer or JSON writer takes it
SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True)
class Row:
    """One record: `values` is a dict (JSON, header CSV, HF) or a list (CSV without header, CoNLL)."""

    values: dict[str, Any] | list[Any]
    file: str
    line: int
    hidden: frozenset[str] = frozenset()  # Hugging Face class-label columns whose id is -1 or None: no label given
    named: frozenset[str] = frozenset()  # Hugging Face class-label columns already turned from ids into names
    keys_from: str = ""  # "header" when the field names are a delimited file's first row (for error hints)

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
            raise self.error(f"missing field{self._found(values)}", field)
        return values[field]

    def _found(self, values: dict[str, Any]) -> str:
        """What the row does have, so that a wrong name or a missing header row shows itself."""
        shown = [repr(name if len(name) <= 40 else name[:37] + "...") for name in list(values)[:8]]
        more = f" and {len(values) - 8} more" if len(values) > 8 else ""
        text = f" (this row has: {', '.join(shown)}{more})" if values else " (this row has no fields)"
        if self.keys_from == "header":
            text += (
                "; if the file's first line is data, not a header, set header: false and name the columns"
                " with columns: [...] or use column indexes"
            )
        return text


def row_number(row: Row, value: Any, field: str | int, needs: str) -> float:
    """A row's value as a finite float; `needs` opens each error ("expected a number"). A JSON boolean is
    not a number here, and an integer too large for a float is an error, not an OverflowError."""
    if isinstance(value, bool):
        raise row.error(f"{needs}, got the boolean {str(value).lower()}", field)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise row.error(f"{needs}, got {value!r}", field) from None
    except OverflowError:  # an integer beyond any float
        raise row.error(f"{needs}, got an integer of {len(str(abs(value)))} digits", field) from None
    if not math.isfinite(number):
        raise row.error(f"expected a finite number, got {value!r}", field)
    return number


def decoded_lines(path: str, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text) with a clear error on a missing file or on bytes that do not decode."""
    return ((number, text) for number, _, text in offset_lines(path, encoding))


def offset_lines(path: str, encoding: str) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset of the line, text): decoded_lines with where each line starts, so that a
    streamed reader can come back to a line (data/streaming.py)."""
    handle = open_binary(path)
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        handle.close()
        raise DataError(f"unknown encoding '{encoding}'", file=path, field="encoding") from None
    with handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            yield number, offset, _checked_line(decoder, raw, encoding, path, number)
            offset += len(raw)


def lines_at(path: str, encoding: str, places: Iterable[tuple[int, int]]) -> Iterator[tuple[int, str]]:
    """(line number, text) of the lines at the given (line number, byte offset) places, in that order."""
    with open_binary(path) as handle:
        for number, offset in places:
            handle.seek(offset)
            decoder = codecs.getincrementaldecoder(encoding)()  # a byte-order mark can only open line 1
            yield number, _checked_line(decoder, handle.readline(), encoding, path, number)


def open_binary(path: str) -> Any:
    """The file opened for reading bytes; a DataError naming it when it cannot be."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a file", file=path) from None
    except OSError as error:
        raise DataError(f"cannot open: {error.strerror}", file=path) from None


def _checked_line(decoder: Any, raw: bytes, encoding: str, path: str, number: int) -> str:
    try:
        text: str = decoder.decode(raw)
    except UnicodeDecodeError as error:
        raise DataError(f"bytes that are not {encoding} ({error.reason})", file=path, line=number) from None
    if len(text) > MAX_LINE_CHARS:
        raise DataError(f"line longer than {MAX_LINE_CHARS:,} characters", file=path, line=number)
    check_text(text, path, number)
    return text


def check_text(text: str, file: str, line: int, field: str | None = None) -> None:
    """Refuse a lone surrogate (from a `\\ud800` escape, or a decoder such as utf-7 that lets one through)."""
    found = SURROGATE.search(text)
    if found:
        raise DataError(
            f"not valid text: a lone surrogate U+{ord(found.group()):04X} at character {found.start() + 1}",
            file=file,
            line=line,
            field=field,
        )


def check_json_value(value: Any, file: str, line: int) -> None:
    """Walk a parsed JSON value without recursion: every string (key or value) must be valid text and the
    nesting at most MAX_JSON_DEPTH levels, so later code may recurse on it and write it back as JSON."""
    stack: list[tuple[Any, int, str | None]] = [(value, 0, None)]
    while stack:
        item, depth, field = stack.pop()
        if isinstance(item, str):
            check_text(item, file, line, field)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise DataError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", file=file, line=line, field=field)
        if isinstance(item, dict):
            for key, child in item.items():  # an error names the row's own field, escaped if it is the bad text
                name = key.encode("utf-8", "backslashreplace").decode("utf-8") if field is None else field
                check_text(key, file, line, name)
                stack.append((child, depth + 1, name))
        else:
            stack.extend((child, depth + 1, field) for child in item)


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: {"label": "pos", "label": "neg"} would keep the last one
    silently (json's default), so which label trains would depend on the writer's order."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise DuplicateKey(key)
        value[key] = item
    return value


def json_rows(lines: Iterable[tuple[int, str]], path: str) -> Iterator[Row]:
    """One JSON object per non-blank line."""
    for number, text in _decoded(lines, path):
        if BLANK.match(text):
            continue
        try:
            value = json.loads(text.rstrip("\r\n"), object_pairs_hook=_unique_keys)
        except DuplicateKey as error:
            raise DataError(f"the key {error.key!r} appears twice in one object", file=path, line=number) from None
        except json.JSONDecodeError as error:
            raise DataError(f"invalid JSON: {error.msg} (column {error.colno})", file=path, line=number) from None
        except RecursionError:
            raise DataError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", file=path, line=number) from None
        except ValueError as error:  # an integer of more digits than Python converts
            raise DataError(f"invalid JSON: {str(error).split(':')[0]}", file=path, line=number) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {type(value).__name__}", file=path, line=number)
        check_json_value(value, path, number)
        yield Row(value, path, number)


def _decoded(lines: Iterable[tuple[int, str]], path: str) -> Iterator[tuple[int, str]]:
    """Lines of an already decoding stream (standard input): bytes it cannot decode name their line. A text
    stream decodes a block at a time, all of whose whole lines it has handed out before it reads the next;
    so the bad byte's line is the next one plus the line breaks before it in the block."""
    iterator, number = iter(lines), 0
    while True:
        try:
            number, text = next(iterator)
        except StopIteration:
            return
        except UnicodeDecodeError as error:
            block = error.object if isinstance(error.object, bytes) else b""
            line = number + 1 + block[: error.start].count(b"\n")
            raise DataError(f"bytes that are not {error.encoding} ({error.reason})", file=path, line=line) from None
        yield number, text


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
    named_by = "the header has" if columns is None else "'columns' names"
    if columns is not None:
        _check_names(columns, path, None, "columns")
    while True:
        line = position["line"] + 1  # a quoted field may span lines: name the row's first
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            if "unexpected end of data" in str(error):  # a quote that never closes: name the row it opened on
                message = f"malformed {delimiter!r}-separated row: a quoted field opened on this row never closes"
                raise DataError(message, file=path, line=line) from None
            raise DataError(
                f"malformed {delimiter!r}-separated row: {error}", file=path, line=position["line"]
            ) from None
        if not cells or all(not c.strip() for c in cells):
            continue
        if header and names is None:
            names = [c.strip() for c in cells]
            _check_names(names, path, line, None)
            continue
        if names is not None:
            if len(cells) != len(names):  # a cut row, or a cell that held an unquoted delimiter
                raise DataError(f"row has {len(cells)} cells, {named_by} {len(names)}", file=path, line=line)
            keys_from = "header" if columns is None else "columns"
            yield Row(dict(zip(names, cells, strict=True)), path, line, keys_from=keys_from)
        else:
            yield Row(cells, path, line)


def _check_names(names: list[str], path: str, line: int | None, field: str | None) -> None:
    """Two columns of one name would leave one row value silently dropped."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"column name {name!r} appears twice", file=path, line=line, field=field)
        seen.add(name)


def read_conll(path: str, token_column: int = 0, tag_column: int = -1, encoding: str = "utf-8-sig") -> Iterator[Row]:
    """Sentences of a CoNLL-style file: one token per line, a blank (or whitespace-only) line between.

    Each line needs a non-empty token and a non-empty tag in two different cells: on a one-cell line columns 0
    and -1 are the same cell, which would make the word its own tag."""
    if token_column == tag_column:
        raise DataError(f"token_column and tag_column are both {token_column}", file=path, field="tag_column")
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
        n = len(cells)
        if not (-n <= token_column < n and -n <= tag_column < n) or token_column % n == tag_column % n:
            raise DataError(
                f"line has {n} column{'s' if n != 1 else ''}, needs a token (column {token_column}) and a tag "
                f"(column {tag_column}) in different columns",
                file=path,
                line=number,
            )
        token, tag = cells[token_column].strip(), cells[tag_column].strip()
        if not token or not tag:
            what = "token" if not token else "tag"
            raise DataError(
                f"empty {what} (column {token_column if not token else tag_column})", file=path, line=number
            )
        if not tokens:
            first = number
        tokens.append(token)
        tags.append(tag)
    if tokens:
        yield Row({"tokens": tokens, "tags": tags}, path, first)


PARQUET_BATCH = 1024  # rows decoded at a time: a Parquet file is never read whole


def read_parquet(path: str) -> Iterator[Row]:
    """Rows of a Parquet file, columns by name, read a batch at a time (pyarrow); `line` is the row number
    from 1. Raises DataError for a file pyarrow cannot read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"not a readable Parquet file: {error}", file=path) from None
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH):
            for values in batch.to_pylist():
                number += 1
                yield Row(values, path, number)
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"Parquet file damaged after row {number}: {error}", file=path, line=number + 1) from None


def parquet_rows(path: str) -> int:
    """The rows of a Parquet file, from its footer (nothing else is read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"not a readable Parquet file: {error}", file=path) from None


def read_hf(
    dataset: str,
    split: str,
    subset: str | None = None,
    data_files: dict[str, str | list[str]] | None = None,
    trust_remote_code: bool = False,
    streaming: bool = False,
) -> Iterator[Row]:
    """Rows of a Hugging Face dataset split: a hub id when online, or a builder with local data_files;
    `streaming`: an IterableDataset, its rows read as they are drawn (nothing downloaded or cached whole).

    Class ids become their names. An id of -1 or None (GLUE's unlabelled test splits) names no class: the
    column is listed in `Row.hidden` and its value is None, for the task to refuse or leave unscored."""
    import datasets

    where = f"{dataset}[{split}]"
    try:
        kwargs: dict[str, Any] = {"split": split}
        if streaming:
            kwargs["streaming"] = True
        if data_files:
            kwargs["data_files"] = data_files
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        loaded = datasets.load_dataset(dataset, subset, **kwargs)
    except FileNotFoundError as error:
        raise DataError(f"dataset not found: {error}", file=where) from None
    except Exception as error:  # datasets raises many types; all mean "cannot load this split"
        cause: BaseException = error
        while isinstance(cause.__cause__, Exception):  # the innermost cause is the parser's, naming the row
            cause = cause.__cause__
        raise DataError(f"cannot load dataset: {type(cause).__name__}: {cause}", file=where) from None
    names = _class_label_names(loaded.features) if loaded.features is not None else {}
    for index, record in enumerate(loaded):
        values = dict(record)
        hidden = set()
        for column, vocabulary in names.items():  # class ids -> their names, as in local files
            if column not in values:
                continue
            value = values[column]
            ids = value if isinstance(value, list) else [value]
            unlabelled = [v is None or v == -1 for v in ids]
            if ids and all(unlabelled):
                hidden.add(column)
                values[column] = None
            elif any(unlabelled):
                at = unlabelled.index(True)
                raise DataError(
                    f"class id {ids[at]} (no label) at position {at + 1} of {len(ids)}, beside given labels",
                    file=where,
                    line=index + 1,
                    field=column,
                )
            else:
                named = [_class_label_name(v, vocabulary, where, index + 1, column) for v in ids]
                values[column] = named if isinstance(value, list) else named[0]
        yield Row(values, where, index + 1, frozenset(hidden), frozenset(names) - hidden)


def _class_label_name(value: Any, vocabulary: list[str], where: str, line: int, column: str) -> Any:
    """A class id's name; an id outside the names (possible in a file written by other tools) is an error."""
    if not isinstance(value, int):
        return value
    if not 0 <= value < len(vocabulary):
        raise DataError(
            f"class id {value} is outside the dataset's class names (0-{len(vocabulary) - 1})",
            file=where,
            line=line,
            field=column,
        )
    return vocabulary[value]


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
