"""Tokenize a task's examples once, up front, into `Encoded` rows the collator pads per batch.

Data text is text: a row that spells a control token ('<|im_end|>', '[SEP]') is encoded as the ordinary
pieces of that spelling (`split_special_tokens`), so no row can end a sequence or open a turn from inside
its content; only the tokens the tokenizer and the chat template add themselves are control tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from multitune.data.tasks import Example, TaskData

IGNORE_INDEX = -100  # label of sub-tokens and special tokens in token tasks


def control_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's control tokens: its special tokens and every added token flagged special."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {int(i) for i in tokenizer.all_special_ids} | {int(i) for i, t in added.items() if t.special}


def text_ids(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """`text` as ids, a control token's spelling in it as ordinary pieces (see the module docstring)."""
    ids: list[int] = tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]
    return ids


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int | float | list[int] | None  # class id, standardised target, or per-token tag ids
    word_starts: list[int] | None = None  # token tasks: each word's first sub-token, or -1
    prompt_length: int | None = None  # generation tasks: input_ids[:prompt_length] is the prompt
    aligned: bool = True  # list labels align with input_ids (tags, causal LM); False: a decoder's target ids


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
        from multitune.data.prompts import encode_generation, encode_seq2seq  # they import this module

        if decoder_targets:
            return encode_seq2seq(examples, data, tokenizer, max_length, with_labels)
        return encode_generation(examples, data, tokenizer, max_length, with_labels)
    if kind == "token_classification":
        return _encode_tokens(examples, data, tokenizer, max_length, with_labels)
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
    index = {label: i for i, label in enumerate(data.labels or [])}
    out = []
    for i, example in enumerate(examples):
        label: int | float | None = None
        if with_labels and example.label is not None:
            if kind == "regression":
                label = (float(example.label) - data.target_mean) / data.target_std  # type: ignore[arg-type]
            else:
                label = index[str(example.label)]
        out.append(Encoded(batch["input_ids"][i], type_ids[i] if type_ids is not None else None, label))
    return out


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
                    labels[position] = index[example.label[word]]  # type: ignore[index]
            previous = word
        label = labels if with_labels and example.label is not None else None
        out.append(Encoded(batch["input_ids"][i], type_ids[i] if type_ids is not None else None, label, starts))
    return out
