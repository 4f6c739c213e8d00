"""Tokenize a task's examples once, up front, into `Encoded` rows the collator pads per batch.

Data text is text: a row that spells a control token ('<|im_end|>', '[SEP]') is encoded as the ordinary
pieces of that spelling (`split_special_tokens`), so no row can end a sequence or open a turn from inside
its content; only the tokens the tokenizer and the chat template add themselves are control tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from multitune.data.images import open_image, pixel_values
from multitune.data.prompts import encode_generation, encode_seq2seq
from multitune.data.tasks import (
    Example,
    TaskData,
)
from multitune.data.tokens import IGNORE_INDEX, Encoded


def encode(
    examples: Sequence[Example],
    data: TaskData,
    tokenizer: Any,
    max_length: int,
    with_labels: bool = True,
    decoder_targets: bool = False,
) -> list[Encoded]:
    """Tokenize examples of one task; labels become ids (classes, tags) or standardised floats. Generation
    targets follow the prompt for a causal LM, or go to the decoder (`decoder_targets`) for a seq2seq LM."""
    if not examples:
        return []
    kind = data.config.type
    if kind == "generation":
        if decoder_targets:
            return encode_seq2seq(examples, data, tokenizer, max_length, with_labels)
        return encode_generation(examples, data, tokenizer, max_length, with_labels)
    if kind == "token_classification":
        return _encode_tokens(examples, data, tokenizer, max_length, with_labels)
    if data.config.modality == "image":
        return _encode_images(examples, data, tokenizer, with_labels)
    firsts = [e.texts[0] for e in examples]
    seconds = [e.texts[1] if len(e.texts) > 1 else None for e in examples]
    pairs = any(s is not None for s in seconds)
    batch = tokenizer(
        firsts,
        [s or "" for s in seconds] if pairs else None,
        truncation="longest_first" if pairs else True,
        max_length=max_length,
        split_special_tokens=True,
    )
    type_ids = batch.get("token_type_ids")
    labels = _row_labels(examples, data, with_labels)
    return [
        Encoded(batch["input_ids"][i], type_ids[i] if type_ids is not None else None, label)
        for i, label in enumerate(labels)
    ]


def _row_labels(examples: Sequence[Example], data: TaskData, with_labels: bool) -> list[int | float | None]:
    """Each example's label as the head trains on it: a class id, or a standardised target (regression)."""
    index = {label: i for i, label in enumerate(data.labels or [])}
    out: list[int | float | None] = []
    for example in examples:
        label: int | float | None = None
        if with_labels and example.label is not None:
            if data.config.type == "regression":
                label = (float(example.label) - data.target_mean) / data.target_std  # type: ignore[arg-type]
            elif str(example.label) in index:
                label = index[str(example.label)]
            else:  # a streamed row drawn late, with a label its task does not know
                raise _unknown(example, str(example.label), data)
        out.append(label)
    return out


def _unknown(example: Example, label: str, data: TaskData) -> Exception:
    field = "output" if data.config.source.format == "unified" else str(data.config.label_field)
    known = ", ".join(data.labels or [])
    return example.error(f"unknown label '{label}' (task '{data.name}' knows: {known})", field)


IMAGE_CHUNK = 64  # images opened and processed at a time: the decoded images of one chunk are in memory at once


def _encode_images(examples: Sequence[Example], data: TaskData, processor: Any, with_labels: bool) -> list[Encoded]:
    """Each example's image opened and made pixel values [C, H, W] by the backbone's image processor."""
    labels = _row_labels(examples, data, with_labels)
    field = str((data.config.text_fields or ["image"])[0])
    out = []
    for start in range(0, len(examples), IMAGE_CHUNK):
        chunk = examples[start : start + IMAGE_CHUNK]
        images = [open_image(e.image, e.file, e.line, field) for e in chunk]
        try:
            values = pixel_values(images, processor)
        except (ValueError, TypeError) as error:  # e.g. images of several sizes and no resizing
            raise chunk[0].error(_unstackable(error), field) from None
        out += [Encoded([], None, labels[start + i], pixel_values=values[i]) for i in range(len(chunk))]
        if out[0].pixel_values.shape != values.shape[1:]:
            raise chunk[0].error(
                _unstackable(f"{list(values.shape[1:])} beside {list(out[0].pixel_values.shape)}"), field
            )
    return out


def _unstackable(cause: object) -> str:
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return (
        f"the image processor does not make every image one size ({first}): "
        "give its preprocessor_config.json a fixed size (do_resize and size, or crop_size)"
    )


def _encode_tokens(
    examples: Sequence[Example], data: TaskData, tokenizer: Any, max_length: int, with_labels: bool
) -> list[Encoded]:
    batch = tokenizer(
        [list(e.texts) for e in examples],
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        split_special_tokens=True,
    )
    type_ids = batch.get("token_type_ids")
    index = {tag: i for i, tag in enumerate(data.labels or [])}
    out = []
    for i, example in enumerate(examples):
        word_ids = batch.word_ids(i)
        starts = [-1] * len(example.texts)  # -1: the word was truncated away or has no sub-token
        labels = [IGNORE_INDEX] * len(word_ids)
        previous = None
        for position, word in enumerate(word_ids):
            if word is not None and word != previous:
                starts[word] = position
                if with_labels and example.label is not None:
                    tag = example.label[word]  # type: ignore[index]
                    if tag not in index:
                        raise _unknown(example, tag, data)
                    labels[position] = index[tag]
            previous = word
        label = labels if with_labels and example.label is not None else None
        out.append(Encoded(batch["input_ids"][i], type_ids[i] if type_ids is not None else None, label, starts))
    return out


def encode_splits(
    tasks: dict[str, TaskData], tokenizer: Any, max_length: int, decoder_targets: bool = False
) -> dict[str, dict[str, list[Encoded]]]:
    return {
        name: {
            split: encode(examples, task, tokenizer, max_length, decoder_targets=decoder_targets)
            for split, examples in task.splits.items()
        }
        for name, task in tasks.items()
    }
