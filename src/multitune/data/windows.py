"""Sliding windows for token tagging at prediction time: a record longer than the model's `max_length` is
tagged in overlapping windows, so every word gets a tag (not only those before the cut-off).

Windows hold whole words: each takes as many words as fit in `max_length` with the tokenizer's own special
tokens, and the next one starts half a window further on, so consecutive windows overlap by about half a
window. A word is tagged from the window where it has the most context on its poorer side (the fewer of the
sub-tokens before it and after it in that window), which keeps it away from a window's edge whenever it can
be. `multitune predict` and `multitune serve` both read records through here, so they tag alike.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any

from multitune.data.encoding import encode
from multitune.data.tasks import (
    Example,
    TaskData,
)
from multitune.data.tokens import Encoded


@dataclass(frozen=True)
class Windows:
    """One record tagged in several forwards. Each window's `word_starts` covers every word of the record and
    is -1 except at the words that window tags, so `decode` of a window gives one tag per word of the record,
    and `gather` takes each word's tag from its own window."""

    rows: tuple[Encoded, ...]


PredictionRow = Encoded | Windows


def encode_for_tagging(
    examples: Sequence[Example], data: TaskData, tokenizer: Any, max_length: int
) -> list[PredictionRow]:
    """Prediction inputs of a token task: one row per record, or its windows when it does not fit."""
    return windowed(
        examples, encode(examples, data, tokenizer, max_length, with_labels=False), data, tokenizer, max_length
    )


def windowed(
    examples: Sequence[Example], rows: Sequence[Encoded], data: TaskData, tokenizer: Any, max_length: int
) -> list[PredictionRow]:
    """`rows` (the encoding of `examples`), with each one that filled `max_length` replaced by its windows;
    validation and test scoring use this too, so a word past the cut-off is tagged, not scored as `O`."""
    return [
        windows(example, data, tokenizer, max_length) if len(row.input_ids) >= max_length else row
        for example, row in zip(examples, rows, strict=True)
    ]


def windows(example: Example, data: TaskData, tokenizer: Any, max_length: int) -> PredictionRow:
    """`example`'s windows, or its one row when its words fit after all (a record exactly `max_length` long)."""
    words = list(example.texts)
    singles = encode([replace(example, texts=(w,)) for w in words], data, tokenizer, max_length, with_labels=False)
    special = tokenizer.num_special_tokens_to_add(pair=False)
    lengths = [len(single.input_ids) - special for single in singles]  # each word's sub-tokens
    budget = max(max_length - special, 1)
    if sum(lengths) <= budget:
        [row] = encode([example], data, tokenizer, max_length, with_labels=False)
        return row
    spans = plan(lengths, budget)
    owner = owners(lengths, spans)
    out = []
    for k, (a, b) in enumerate(spans):
        mine = [w for w in range(a, b) if owner[w] == k]
        if not mine:
            continue
        [row] = encode([replace(example, texts=tuple(words[a:b]))], data, tokenizer, max_length, with_labels=False)
        starts = [-1] * len(words)
        for w in mine:
            starts[w] = (row.word_starts or [])[w - a]
        out.append(Encoded(row.input_ids, row.token_type_ids, None, starts))
    return Windows(tuple(out))


def plan(lengths: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Word ranges [a, b) of the windows: each as long as fits in `budget` sub-tokens (at least one word),
    the next starting at the first word half a budget or more past the previous start, or later where it
    must to hold the first word the previous one left out; no word is skipped."""
    offsets = [0, *accumulate(lengths)]
    step = max(budget // 2, 1)
    spans: list[tuple[int, int]] = []
    a, n = 0, len(lengths)
    while True:
        b = a + 1
        while b < n and offsets[b + 1] - offsets[a] <= budget:
            b += 1
        spans.append((a, b))
        if b >= n:
            return spans
        following = bisect.bisect_left(offsets, offsets[a] + step, a + 1, n)
        a = min(following, b)
        while a < b and offsets[b + 1] - offsets[a] > budget:  # the next window must take word b
            a += 1


def owners(lengths: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each word, the window that tags it: the one where its poorer side (sub-tokens before it or after
    it in the window) is richest; the first such window on a tie. Words without sub-tokens get -1."""
    offsets = [0, *accumulate(lengths)]
    best = [(-1, -1)] * len(lengths)  # (context, window)
    for k, (a, b) in enumerate(spans):
        for w in range(a, b):
            if lengths[w] <= 0:
                continue
            context = min(offsets[w] - offsets[a], offsets[b] - offsets[w + 1])
            if context > best[w][0]:
                best[w] = (context, k)
    return [k for _, k in best]


def expand(rows: Sequence[PredictionRow]) -> tuple[list[Encoded], list[slice]]:
    """The model rows of `rows` (windows laid out flat) and each record's slice of them."""
    flat: list[Encoded] = []
    spans = []
    for row in rows:
        start = len(flat)
        flat.extend(row.rows if isinstance(row, Windows) else [row])
        spans.append(slice(start, len(flat)))
    return flat, spans


def gather(rows: Sequence[PredictionRow], decoded: Sequence[dict[str, Any]], spans: Sequence[slice]) -> list[Any]:
    """Each record's prediction from its model rows' decoded predictions (see `expand`)."""
    out: list[Any] = []
    for row, span in zip(rows, spans, strict=True):
        if not isinstance(row, Windows):
            out.append(decoded[span.start])
            continue
        tags = ["O"] * len(row.rows[0].word_starts or []) if row.rows else []
        for window, result in zip(row.rows, decoded[span], strict=True):
            for w, start in enumerate(window.word_starts or []):
                if start >= 0:
                    tags[w] = result["prediction"][w]
        out.append({"prediction": tags})
    return out


def scoring_rows(
    tasks: dict[str, TaskData], encoded: dict[str, dict[str, list[Encoded]]], tokenizer: Any, max_length: int
) -> dict[str, dict[str, Sequence[PredictionRow]]]:
    """What evaluation predicts: the encoded rows, except that a token task's sentence longer than max_length
    is tagged in windows (as `predict` and `serve` tag it) instead of having its words past the cut-off
    scored as `O`."""
    scored: dict[str, dict[str, Sequence[PredictionRow]]] = {}
    for name, task in tasks.items():
        scored[name] = dict(encoded[name])
        if task.config.type == "token_classification":
            for split in ("validation", "test"):
                if split in encoded[name]:
                    rows = [replace(row, label=None) for row in encoded[name][split]]  # windows carry none
                    scored[name][split] = windowed(task.splits[split], rows, task, tokenizer, max_length)
    return scored
