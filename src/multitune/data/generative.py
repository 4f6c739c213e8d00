"""Generation tasks' data: target texts (verbalized labels, formatted numbers) and line-aligned parallel files.

A generation example is (prompt parts, target text): `Example.texts` holds the input text(s),
`Example.instruction` the instruction and `Example.label` the target string.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from multitune.config import TaskConfig
from multitune.data.readers import BLANK, Row, decoded_lines, row_number
from multitune.errors import DataError


def target_text(row: Row, value: Any, name: str | int, task: TaskConfig) -> str:
    """A raw label or output value as the text the model must generate."""
    if task.verbalizer is not None:
        key = _label_key(value)
        if key not in task.verbalizer:
            known = ", ".join(sorted(task.verbalizer))
            raise row.error(f"label {key!r} is not in the verbalizer (it maps: {known})", name)
        return task.verbalizer[key]
    if task.target_format is not None:
        return task.target_format.format(row_number(row, value, name, "target_format needs a number"))
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise row.error(f"expected a target text, got {type(value).__name__}", name)
    text = str(value).strip()
    if not text:
        raise row.error("empty target text", name)
    return text


def _label_key(value: Any) -> str:
    """`1`, `1.0` and `"1"` all look up the verbalizer key "1"; true/false as in YAML."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def instruction_of(row: Row, task: TaskConfig) -> str | None:
    """A unified record's own instruction, else the task's."""
    values = row.values
    if isinstance(values, dict) and "instruction" in values and values["instruction"] is not None:
        value = values["instruction"]
        if not isinstance(value, str):
            raise row.error(f"expected text, got {type(value).__name__}", "instruction")
        if value.strip():
            return value
    return task.instruction


def input_texts(row: Row, value: Any, name: str) -> tuple[str, ...]:
    """The input of a record: one text, or a list / mapping of texts (joined line by line in the prompt)."""
    if isinstance(value, dict):
        value = list(value.values())
    items = value if isinstance(value, list) else [value]
    texts = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise row.error(f"expected text, got {type(item).__name__}", name)
        texts.append(str(item))
    if not texts:
        raise row.error("empty input", name)
    return tuple(texts)


def read_parallel(source: str, target: str, encoding: str = "utf-8-sig") -> Iterator[Row]:
    """Pairs of line-aligned plain-text files: Row({"source", "target"}) per line; blank pairs are skipped.
    The row's file is the source file; a problem with a target line names the target file."""
    sources, targets = decoded_lines(source, encoding), decoded_lines(target, encoding)
    while True:
        left, right = next(sources, None), next(targets, None)
        if left is None and right is None:
            return
        if left is None or right is None:
            longer, shorter = (target, source) if left is None else (source, target)
            extra = right if left is None else left
            rest = targets if left is None else sources
            assert extra is not None
            for number, text in [extra, *rest]:
                if not BLANK.match(text):  # trailing blank lines are fine; a line with text is not
                    raise DataError(
                        f"has more lines than {shorter} (parallel files must be line-aligned)", file=longer, line=number
                    )
            return
        number, source_text = left
        target_text_ = right[1].strip()
        source_text = source_text.strip()
        if not source_text and not target_text_:
            continue
        if not source_text:
            raise DataError("empty source line beside a non-empty target line", file=source, line=number)
        if not target_text_:
            raise DataError("empty target line beside a non-empty source line", file=target, line=number)
        yield Row({"source": source_text, "target": target_text_}, source, number)
