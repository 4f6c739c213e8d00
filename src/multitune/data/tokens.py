"""Token-level basics shared by every encoder of task examples: the `Encoded` row, the ignored label id,
and text as ids with a control token's spelling kept as ordinary pieces (see data/encoding.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    pixel_values: Any = None  # image tasks: the image as a [C, H, W] float32 tensor (input_ids is then empty)
