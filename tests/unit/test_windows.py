"""Sliding windows over a long token-classification record: which words each window holds and which window
tags each word (worked out by hand), the guarantees for any record (hypothesis), and the windows of a real
tokenizer."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multitune.config import TaskConfig
from multitune.data.tasks import Example, TaskData
from multitune.data.tokens import Encoded
from multitune.data.windows import Windows, encode_for_tagging, expand, gather, owners, plan


def context(lengths: list[int], span: tuple[int, int], word: int) -> int:
    """Sub-tokens on the poorer side of `word` in the window `span`."""
    a, b = span
    return min(sum(lengths[a:word]), sum(lengths[word + 1 : b]))


def test_one_token_words_by_hand():
    # 50 words of one sub-token, 30 per window, the next window half a window (15) further on
    spans = plan([1] * 50, 30)
    assert spans == [(0, 30), (15, 45), (30, 50)]
    # word 22 in window 0: min(22, 29 - 22) = 7, in window 1: min(22 - 15, 44 - 22) = 7: a tie, the first wins;
    # word 23: 6 against 8; word 37 in windows 1 and 2: min(22, 7) = 7 against min(7, 12) = 7; word 38: 6 against 8
    assert owners([1] * 50, spans) == [0] * 23 + [1] * 15 + [2] * 12


def test_words_of_several_sub_tokens_by_hand():
    lengths = [3, 1, 4, 1, 5, 9, 2, 6]  # offsets 0 3 4 8 9 14 23 25 31; budget 10, step 5
    spans = plan(lengths, 10)
    # from word 0: words 0-3 make 9 sub-tokens, word 4 would make 14; the next window starts at the first word
    # at offset >= 0 + 5 (word 2 at 4 is short of it, word 3 at 8): words 3-4 (6; word 5 would make 15); then
    # from offset >= 13: word 5 (9 alone: 11 with word 6); then from offset >= 19: words 6-7 (8)
    assert spans == [(0, 4), (3, 5), (5, 6), (6, 8)]
    # word 3 is at the edge of both its windows (context 0 in each): the first wins
    assert owners(lengths, spans) == [0, 0, 0, 0, 1, 2, 3, 3]


def test_a_word_without_sub_tokens_belongs_to_no_window():
    spans = plan([2, 0, 2], 2)
    assert spans == [(0, 2), (1, 3)]
    assert owners([2, 0, 2], spans) == [0, -1, 1]


def test_a_word_longer_than_a_window_gets_one_of_its_own():
    assert plan([1, 12, 1], 5) == [(0, 1), (1, 2), (2, 3)]


word_lengths = st.lists(st.integers(0, 8), min_size=1, max_size=80)


@settings(max_examples=400, deadline=None)
@given(word_lengths, st.integers(1, 40))
def test_windows_cover_every_word_within_the_budget(lengths, budget):
    spans = plan(lengths, budget)
    assert spans[0][0] == 0 and spans[-1][1] == len(lengths)
    for (a, b), (c, d) in itertools.pairwise(spans):
        assert a < c <= b < d  # each starts later, ends later, and leaves no word out
    for a, b in spans:
        assert b - a == 1 or sum(lengths[a:b]) <= budget  # a window overflows only when one word does
    assert len(spans) <= len(lengths)
    owner = owners(lengths, spans)
    for word, k in enumerate(owner):
        if lengths[word] == 0:
            assert k == -1
            continue
        a, b = spans[k]
        assert a <= word < b
        holding = [s for s in spans if s[0] <= word < s[1]]
        assert context(lengths, spans[k], word) == max(context(lengths, s, word) for s in holding)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 120), st.integers(2, 40))
def test_each_word_keeps_a_quarter_window_of_context_where_the_record_has_it(n, budget):
    spans = plan([1] * n, budget)
    owner = owners([1] * n, spans)
    step = budget // 2
    for word, k in enumerate(owner):
        assert context([1] * n, spans[k], word) >= min(word, n - 1 - word, (step - 1) // 2)


@pytest.fixture
def ner(tiny_backbone: Path) -> tuple[TaskData, object]:
    from transformers import AutoTokenizer

    config = TaskConfig.model_validate({"type": "token_classification", "source": {"format": "jsonl", "train": "x"}})
    task = TaskData("ner", config, {}, ["O", "B-loc"])
    return task, AutoTokenizer.from_pretrained(str(tiny_backbone))


def test_a_long_record_becomes_windows_that_fit_and_tag_each_word_once(ner):
    task, tokenizer = ner
    words = ["paris", "xyz", "a", "", "qqqq", "london"] * 12  # 1, 3, 1, 0, 4 and 1 sub-tokens: 120 in all
    short = ["paris", "xyz", "london"]
    rows = encode_for_tagging([Example(tuple(words), None), Example(tuple(short), None)], task, tokenizer, 16)
    long, plain = rows
    assert isinstance(plain, Encoded) and plain.word_starts == [1, 2, 5]  # [CLS] paris x ##y ##z london
    assert isinstance(long, Windows)
    tagged = [0] * len(words)
    for window in long.rows:
        assert len(window.input_ids) <= 16 and len(window.word_starts or []) == len(words)
        for w, start in enumerate(window.word_starts or []):
            if start >= 0:
                tagged[w] += 1
                first = tokenizer(words[w], add_special_tokens=False)["input_ids"][0]
                assert window.input_ids[start] == first  # the word's own first sub-token
    assert tagged == [0 if w == "" else 1 for w in words]  # "" has no sub-token: "O" like before

    flat, spans = expand(rows)
    assert len(flat) == len(long.rows) + 1
    decoded = [
        {"prediction": [f"{i}:{w}" if s >= 0 else "O" for w, s in enumerate(r.word_starts or [])]}
        for i, r in enumerate(flat)
    ]
    merged = gather(rows, decoded, spans)
    owner_of = {w: i for i, r in enumerate(long.rows) for w, s in enumerate(r.word_starts or []) if s >= 0}
    assert merged[0]["prediction"] == [f"{owner_of[w]}:{w}" if w in owner_of else "O" for w in range(len(words))]
    assert merged[1] == decoded[-1]


def test_a_record_of_exactly_max_length_is_one_row(ner):
    task, tokenizer = ner
    [row] = encode_for_tagging([Example(("paris",) * 14, None)], task, tokenizer, 16)  # 14 + [CLS] + [SEP]
    assert isinstance(row, Encoded) and row.word_starts == list(range(1, 15))
