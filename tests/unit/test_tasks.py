import json

import pytest

from multitune.config import TaskConfig
from multitune.data.tasks import UnifiedFiles, load_task, load_tasks, to_iob2
from multitune.errors import DataError


def task(**fields) -> TaskConfig:
    return TaskConfig.model_validate(fields)


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def load(name, config, seed=1):
    return load_task(name, config, seed, UnifiedFiles({}))


def test_validation_is_carved_from_train_with_a_seed(tmp_path):
    train = jsonl(tmp_path / "t.jsonl", [{"text": str(i), "label": "ab"[i % 2]} for i in range(50)])
    config = task(type="classification", source={"format": "jsonl", "train": train}, validation_fraction=0.2)
    first, again, other = load("t", config), load("t", config), load("t", config, seed=2)
    assert len(first.splits["train"]) == 40 and len(first.splits["validation"]) == 10
    assert first.splits["validation"] == again.splits["validation"] != other.splits["validation"]
    assert not set(first.splits["train"]) & set(first.splits["validation"])
    assert first.labels == ["a", "b"] and "carved" in first.notes[0]


def test_max_rows_is_a_seeded_subsample_in_original_order(tmp_path):
    train = jsonl(tmp_path / "t.jsonl", [{"text": str(i), "label": "ab"[i % 2]} for i in range(100)])
    config = task(
        type="classification", source={"format": "jsonl", "train": train, "validation": train}, max_rows={"train": 10}
    )
    rows = load("t", config).splits["train"]
    assert len(rows) == 10 and [r.line for r in rows] == sorted(r.line for r in rows)
    assert len(load("t", config).splits["validation"]) == 100


def test_unknown_label_in_test_names_file_line_and_field(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    test = jsonl(tmp_path / "test.jsonl", [{"text": "x", "label": "a"}, {"text": "z", "label": "c"}])
    config = task(type="classification", source={"format": "jsonl", "train": train, "validation": train, "test": test})
    with pytest.raises(DataError, match=rf"^{test}:2: field 'label': unknown label 'c' in test"):
        load("t", config)


def test_given_labels_fix_the_order_and_map_integer_ids(tmp_path):
    train = jsonl(
        tmp_path / "t.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": 0}, {"text": "z", "label": "neg"}]
    )
    config = task(
        type="classification", source={"format": "jsonl", "train": train, "validation": train}, labels=["neg", "pos"]
    )
    data = load("t", config)
    assert data.labels == ["neg", "pos"] and [e.label for e in data.splits["train"]] == ["pos", "neg", "neg"]


def test_regression_targets_and_their_statistics(tmp_path):
    train = jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": v} for v in (1, "3", 5.0)])
    config = task(type="regression", source={"format": "jsonl", "train": train, "validation": train})
    data = load("t", config)
    assert (
        data.labels is None
        and data.target_mean == pytest.approx(3.0)
        and data.target_std == pytest.approx((8 / 3) ** 0.5)
    )
    bad = jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "high"}])
    with pytest.raises(DataError, match=r":1: field 'label': expected a number, got 'high'"):
        load("t", task(type="regression", source={"format": "jsonl", "train": bad}))


def test_pair_task_reads_two_fields(tmp_path):
    train = jsonl(tmp_path / "t.jsonl", [{"a": "x", "b": "y", "label": "same"}, {"a": "p", "b": "q", "label": "diff"}])
    config = task(
        type="pair_classification",
        source={"format": "jsonl", "train": train, "validation": train},
        text_fields=["a", "b"],
    )
    assert load("t", config).splits["train"][0].texts == ("x", "y")


def test_empty_task_and_wrong_types(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{empty}: task 't' has no training rows"):
        load("t", task(type="classification", source={"format": "jsonl", "train": str(empty)}))
    train = jsonl(tmp_path / "t.jsonl", [{"text": ["a", "list"], "label": "a"}])
    with pytest.raises(DataError, match=r":1: field 'text': expected text, got list"):
        load("t", task(type="classification", source={"format": "jsonl", "train": train}))


def test_token_task_checks_tag_counts_and_normalises_iob1(tmp_path):
    good = [{"tokens": ["New", "York", "is", "big"], "tags": ["I-loc", "I-loc", "O", "O"]}] * 3
    train = jsonl(tmp_path / "t.jsonl", good)
    config = task(
        type="token_classification",
        source={"format": "jsonl", "train": train, "validation": train},
        text_fields=["tokens"],
        label_field="tags",
        tag_scheme="iob1",
    )
    data = load("t", config)
    assert data.splits["train"][0].label == ("B-loc", "I-loc", "O", "O") and data.labels == ["O", "B-loc", "I-loc"]
    bad = jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'tags': 1 tags for 2 tokens"):
        load(
            "t",
            task(
                type="token_classification",
                source={"format": "jsonl", "train": bad},
                text_fields=["tokens"],
                label_field="tags",
            ),
        )


@pytest.mark.parametrize(
    ("iob1", "iob2"),
    [
        (("I-a", "I-a", "O", "I-b"), ("B-a", "I-a", "O", "B-b")),
        (("I-a", "B-a", "I-a"), ("B-a", "B-a", "I-a")),
        (("I-a", "I-b"), ("B-a", "B-b")),
        (("O", "B-a", "I-a"), ("O", "B-a", "I-a")),
    ],
)
def test_iob1_to_iob2(iob1, iob2):
    assert to_iob2(iob1) == iob2


def test_unified_file_routes_records_by_task(tmp_path):
    mix = jsonl(
        tmp_path / "mix.jsonl",
        [
            {"task": "sent", "instruction": "Sentiment?", "input": "good", "output": "pos"},
            {"task": "sim", "instruction": "Rate", "input": ["a b", "a c"], "output": 3.5},
            {"task": "sent", "instruction": "Sentiment?", "input": "bad", "output": "neg"},
            {"task": "ner", "input": ["John", "runs"], "output": ["B-per", "O"]},
            {"task": "sim", "instruction": "Rate", "input": {"s1": "x", "s2": "y"}, "output": "1"},
        ],
    )
    source = {"format": "unified", "train": mix, "validation": mix}
    tasks = {
        "sent": task(type="classification", source=source),
        "sim": task(type="regression", source=source, text_fields=["a", "b"]),
        "ner": task(type="token_classification", source=source),
    }
    data = load_tasks(tasks, seed=0)
    assert [e.texts for e in data["sent"].splits["train"]] == [("good",), ("bad",)]
    assert [e.label for e in data["sim"].splits["train"]] == [3.5, 1.0]
    assert data["sim"].splits["train"][1].texts == ("x", "y")
    assert data["ner"].splits["train"][0].label == ("B-per", "O")
    del tasks["ner"]
    with pytest.raises(
        DataError, match=r"mix.jsonl:4: field 'task': no configured task 'ner' \(this file feeds: sent, sim\)"
    ):
        load_tasks(tasks, seed=0)


def test_unified_task_key_renames_the_route(tmp_path):
    mix = jsonl(
        tmp_path / "mix.jsonl",
        [{"task": "sst2", "input": "good", "output": "pos"}, {"task": "sst2", "input": "bad", "output": "neg"}],
    )
    tasks = {
        "sentiment": task(
            type="classification", source={"format": "unified", "train": mix, "validation": mix, "task_key": "sst2"}
        )
    }
    assert len(load_tasks(tasks, seed=0)["sentiment"].splits["train"]) == 2


def test_shuffled_labels_keep_the_label_counts_and_leave_evaluation_alone(tmp_path):
    rows = [{"text": str(i), "label": "ab"[i % 3 == 0]} for i in range(60)]
    train = jsonl(tmp_path / "t.jsonl", rows)
    config = task(
        type="classification", source={"format": "jsonl", "train": train, "validation": train}, shuffle_labels=True
    )
    data = load("t", config)
    shuffled = [e.label for e in data.splits["train"]]
    truth = [r["label"] for r in rows]
    assert sorted(shuffled) == sorted(truth) and shuffled != truth
    assert [e.label for e in data.splits["validation"]] == truth
