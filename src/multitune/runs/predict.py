"""`multitune predict`: the input schema of each task, one-line errors on bad records, and predictions
held to what the task was trained on."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from multitune.config import ModelConfig, TaskConfig
from multitune.data.encoding import encode
from multitune.data.images import decode_base64_image, image_reference, is_data_url
from multitune.data.readers import Row, json_rows, read_jsonl
from multitune.data.tasks import (
    Example,
    TaskData,
)
from multitune.data.windows import PredictionRow, encode_for_tagging
from multitune.errors import ConfigError
from multitune.evaluation.evaluate import predict
from multitune.runs.layout import _json_kind, _shown
from multitune.runs.load import load_refined, load_run, task_from_manifest

GENERIC_TEXT_FIELDS = ("text", "text_pair")


@dataclass(frozen=True)
class InputSchema:
    """What a prediction record of one task holds, from the task's type and fields: its text(s) or its list of
    words, under the task's own field names or the generic ones (`text`, `text_pair`, `tokens`; a one-text
    generation task also `input`); a generation task's optional `instruction`; and the task's label field,
    which a record copied from the task's data may keep (not read; `multitune predict` passes it through).
    Anything else is refused: a misspelt or extra text would otherwise be silently left out."""

    task: str
    type: str
    spellings: tuple[tuple[str, ...], ...]  # the accepted names of the inputs, the task's own first
    generic: tuple[str, ...]  # the generic spelling among them
    words: bool  # token_classification: one list of words
    optional: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    image: bool = False  # an image task: one image, a file path or a data: URL of base64 image bytes

    @property
    def fields(self) -> tuple[str, ...]:
        return self.spellings[0]

    def describe(self) -> str:
        """The inputs in words, for error messages: `two texts, 'premise' and 'hypothesis' (or 'text' and
        'text_pair')`."""
        what = "a list of words" if self.words else "one text" if len(self.fields) == 1 else "two texts"
        if self.image:
            what = "one image (a file path, or a data: URL of its base64 bytes)"
        names = [" and ".join(f"'{name}'" for name in spelling) for spelling in self.spellings]
        others = f" (or {' or '.join(names[1:])})" if len(names) > 1 else ""
        return f"{what}, {names[0]}{others}"

    def json_schema(self) -> dict[str, Any]:
        """The record as a JSON schema, for /v1/tasks and the OpenAPI document."""
        text = {"type": "string", "minLength": 1, "pattern": "\\S", "description": "not blank"}
        value = {"type": "array", "items": text, "minItems": 1} if self.words else text
        if self.image:
            value = {
                **text,
                "description": "the image: a data: URL (or plain base64) of its bytes; a file path in predict",
            }
        extra: dict[str, Any] = {name: {"type": ["string", "null"]} for name in self.optional}
        extra.update({name: {"description": "the label, if the record has one: not read"} for name in self.ignored})
        variants = [
            {
                "type": "object",
                "properties": {**{name: value for name in spelling}, **extra},
                "required": list(spelling),
                "additionalProperties": False,
            }
            for spelling in self.spellings
        ]
        described = {"title": f"{self.task} input", "description": f"a {self.type} input: {self.describe()}"}
        return {**described, **(variants[0] if len(variants) == 1 else {"anyOf": variants})}


def input_schema(name: str, task: TaskConfig) -> InputSchema:
    """The one definition of a task's prediction input (see InputSchema)."""
    own = list(task.text_fields or [])
    if task.modality == "image":
        generic: tuple[str, ...] = ("image",)
    elif task.type == "token_classification":
        generic = ("tokens",)
    else:
        generic = GENERIC_TEXT_FIELDS[: len(own)]
    named = tuple(f for f in own if isinstance(f, str))
    spellings = [named] if len(named) == len(own) else []
    spellings.append(generic)
    if task.type == "generation" and len(own) == 1:
        spellings.append(("input",))  # as a unified record names it
    unique = tuple(dict.fromkeys(spellings))
    taken = {f for spelling in unique for f in spelling}
    optional = ("instruction",) if task.type == "generation" and "instruction" not in taken else ()
    labels = ["output", "task"] if task.source.format == "unified" else []
    if isinstance(task.label_field, str):
        labels.insert(0, task.label_field)
    ignored = tuple(f for f in dict.fromkeys(labels) if f not in taken and f not in optional)
    words = task.type == "token_classification"
    return InputSchema(name, task.type, unique, generic, words, optional, ignored, task.modality == "image")


def checked_input(schema: InputSchema, row: Row) -> tuple[tuple[str, ...], str | None]:
    """A prediction record's texts (or words) and instruction, by `schema`; anything else raises a DataError
    naming the record's place and field. The one check of `multitune predict` and of `multitune serve`."""
    values = row.values
    if not isinstance(values, dict):
        raise row.error(f"expected a JSON object, not {_json_kind(values)}")
    complete = [spelling for spelling in schema.spellings if all(f in values for f in spelling)]
    chosen = (
        complete[0]
        if complete
        else max(schema.spellings, key=lambda spelling: sum(f in values for f in spelling))  # the first of ties
    )
    for name in chosen:
        if name not in values:
            raise row.error(f"missing: task '{schema.task}' takes {schema.describe()}{_found(values)}", name)
    for name in values:
        if name not in chosen and name not in schema.optional and name not in schema.ignored:
            also = "".join(f"; '{f}' may be given too" for f in schema.optional)
            also += "".join(f"; '{f}' may be given (the label: not read)" for f in schema.ignored)
            raise row.error(
                f"not an input of task '{schema.task}', which takes {schema.describe()}{also}; "
                "a record with other fields is refused",
                _shown(name),
            )
    if schema.words:
        texts = _checked_words(row, values[chosen[0]], chosen[0])
    else:
        texts = tuple(_checked_text(row, values[name], name) for name in chosen)
    instruction = values.get("instruction") if "instruction" in schema.optional else None
    if instruction is not None and not isinstance(instruction, str):
        raise row.error(f"expected text or null, not {_json_kind(instruction)}", "instruction")
    return texts, instruction if instruction and instruction.strip() else None


def _checked_text(row: Row, value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise row.error(f"expected text, not {_json_kind(value)}", name)
    if not value.strip():
        raise row.error("empty text" if not value else "blank text (only white space)", name)
    return value


def _checked_words(row: Row, value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        hint = " (split the sentence into its words)" if isinstance(value, str) else ""
        raise row.error(f"expected a list of words, not {_json_kind(value)}{hint}", name)
    if not value:
        raise row.error("empty list of words", name)
    for i, word in enumerate(value):
        if not isinstance(word, str):
            raise row.error(f"word {i}: expected text, not {_json_kind(word)}", name)
        if not word.strip():
            raise row.error(f"word {i}: {'empty' if not word else 'blank (only white space)'}", name)
    return tuple(value)


def _found(values: dict[str, Any]) -> str:
    shown = [repr(name if len(name) <= 40 else name[:37] + "...") for name in list(values)[:8]]
    more = f" and {len(values) - 8} more" if len(values) > 8 else ""
    return f" (the record has {', '.join(shown)}{more})" if shown else " (the record is empty)"


def example_for_prediction(row: Row, schema: InputSchema, task: TaskConfig, local_files: bool = True) -> Example:
    """A checked prediction record as an example without a label; a generation record's own instruction
    wins over the task's. An image is a data: URL of base64 bytes, or (`local_files`: `multitune predict`,
    not the server) a file path, relative to the input file's folder."""
    texts, instruction = checked_input(schema, row)
    if schema.image:
        field = schema.fields[0] if texts else "image"
        return Example((), None, row.file, row.line, image=_image_input(row, texts[0], field, local_files))
    if task.type == "generation":
        return Example(texts, None, row.file, row.line, instruction or task.instruction)
    return Example(texts, None, row.file, row.line)


def _image_input(row: Row, value: str, field: str, local_files: bool) -> Any:
    if is_data_url(value.strip()) or not local_files:
        try:
            return decode_base64_image(value)
        except ValueError as error:
            where = "" if local_files else " (the server reads no files: send the image's bytes)"
            raise row.error(f"{error}{where}", field) from None
    return image_reference(row, value, field)


def encode_for_prediction(
    model: ModelConfig, task: TaskData, tokenizer: Any, rows: Sequence[Row], local_files: bool = True
) -> Sequence[PredictionRow]:
    """Prediction inputs (records naming the task's fields) tokenized as `predict` takes them; `multitune
    predict` and `multitune serve` share this path, so they accept, refuse and answer alike (but for image
    files, which only `predict` reads: `local_files`)."""
    schema = input_schema(task.name, task.config)
    examples = [example_for_prediction(row, schema, task.config, local_files) for row in rows]
    if task.config.type == "token_classification":  # a record longer than max_length: tagged by windows
        return encode_for_tagging(examples, task, tokenizer, model.max_length)
    return encode(examples, task, tokenizer, model.max_length, False, model.kind == "seq2seq")


def prediction_bounds(task: TaskData, entry: dict[str, Any]) -> tuple[float, float] | None:
    """A regression task's range of training targets from its tasks.json entry; None for other tasks and for
    runs from before the range was recorded (their predictions are not held to it)."""
    low, high = entry.get("target_min"), entry.get("target_max")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if task.config.type != "regression" or not numbers or not low <= high:  # type: ignore[operator]
        return None
    return float(low), float(high)  # type: ignore[arg-type]


def held_to_range(result: dict[str, Any], bounds: tuple[float, float] | None) -> dict[str, Any]:
    """A regression prediction clamped to the range of the training targets (a 0-5 similarity no longer
    answers -0.2); `raw` keeps the model's own value. Evaluation scores the raw values."""
    if bounds is None:
        return result
    raw = result["prediction"]
    return {**result, "prediction": min(max(raw, bounds[0]), bounds[1]), "raw": raw}


def predict_run(run_dir: str | Path, task_name: str, source: TextIO, name: str = "<stdin>") -> list[dict[str, Any]]:
    """Each input record with its prediction added; all inputs are checked before anything is returned."""
    config, manifest, model, backbone = load_run(run_dir)
    if task_name not in config.tasks:
        raise ConfigError(f"no task '{task_name}' in this run (tasks: {', '.join(config.tasks)})", field="--task")
    task = task_from_manifest(task_name, config.tasks[task_name], manifest[task_name])
    load_refined(model, run_dir, task_name)  # a two-stage run: this task's refined predictor, if it has one
    rows = list(_rows(source, name))
    encoded = encode_for_prediction(config.model, task, backbone.tokenizer, rows)
    pad = backbone.pad_id
    label = f"predict {task_name}" if config.training.progress else None
    results = predict(model, task, encoded, config.training.eval_batch_size, torch.device("cpu"), pad, label)
    bounds = prediction_bounds(task, manifest[task_name])
    return [
        {**row.values, **held_to_range(result, bounds)}  # type: ignore[dict-item]
        for row, result in zip(rows, results, strict=True)
    ]


def _rows(source: TextIO, name: str) -> Iterator[Row]:
    if name != "<stdin>":
        return read_jsonl(name)
    return json_rows(enumerate(source, start=1), name)
