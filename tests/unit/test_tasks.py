import json

import pytest

from multitune.config import TaskConfig
from multitune.data.tasks import UnifiedFiles, load_task, load_tasks, to_iob2
from multitune.errors import DataError
from tests.conftest import SHARED_DATA


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


def test_the_label_set_is_the_whole_train_files_not_its_max_rows_sample(tmp_path):
    # 99 rows of "a" or "b" and one "rare" that validation also has; a 5-row train sample mostly misses it
    records = [{"text": str(i), "label": "ab"[i % 2]} for i in range(99)] + [{"text": "x", "label": "rare"}]
    train = jsonl(tmp_path / "t.jsonl", records)
    validation = jsonl(tmp_path / "v.jsonl", [{"text": "v", "label": "rare"}, {"text": "w", "label": "a"}])
    config = task(
        type="classification",
        source={"format": "jsonl", "train": train, "validation": validation},
        max_rows={"train": 5},
    )
    missed = [s for s in range(1, 6) if "rare" not in {e.label for e in load("t", config, s).splits["train"]}]
    assert missed  # a 5-row sample holds the one rare row with probability 5/100
    for seed in missed:
        assert load("t", config, seed).labels == ["a", "b", "rare"]
    # a label in no train row at all is still refused, on its own line of the validation file
    unknown = jsonl(tmp_path / "u.jsonl", [{"text": "v", "label": "a"}, {"text": "w", "label": "never"}])
    bad = task(type="classification", source={"format": "jsonl", "train": train, "validation": unknown})
    with pytest.raises(DataError, match=r"u.jsonl:2: field 'label': unknown label 'never' in validation"):
        load("t", bad)


def test_a_class_carved_into_validation_only_is_still_a_label(tmp_path):
    # one "rare" row among 40: whichever seed carves it into validation, train keeps no "rare" row
    records = [{"text": str(i), "label": "ab"[i % 2]} for i in range(39)] + [{"text": "x", "label": "rare"}]
    train = jsonl(tmp_path / "t.jsonl", records)
    config = task(type="classification", source={"format": "jsonl", "train": train}, validation_fraction=0.25)
    carved = [s for s in range(1, 30) if any(e.label == "rare" for e in load("t", config, s).splits["validation"])]
    assert carved  # 10 of 40 rows are carved, so some seed in 29 carves the rare row
    assert load("t", config, carved[0]).labels == ["a", "b", "rare"]


def test_a_tag_only_outside_the_train_sample_is_still_in_the_vocabulary(tmp_path):
    rows = [{"tokens": ["a", "b"], "tags": ["B-PER", "O"]} for _ in range(30)] + [{"tokens": ["c"], "tags": ["B-LOC"]}]
    train = jsonl(tmp_path / "t.jsonl", rows)
    validation = jsonl(tmp_path / "v.jsonl", [{"tokens": ["c"], "tags": ["B-LOC"]}])
    config = task(
        type="token_classification",
        source={"format": "jsonl", "train": train, "validation": validation},
        text_fields=["tokens"],
        label_field="tags",
        max_rows={"train": 3},
    )
    data = load("t", config)
    assert all(e.label != ("B-LOC",) for e in data.splits["train"])
    assert data.labels == ["O", "B-LOC", "B-PER"]


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


def test_unified_regression_input_of_three_texts_names_what_it_takes(tmp_path):
    mix = jsonl(tmp_path / "mix.jsonl", [{"task": "sim", "input": ["a", "b", "c"], "output": 1.0}])
    tasks = {"sim": task(type="regression", source={"format": "unified", "train": mix, "validation": mix})}
    with pytest.raises(
        DataError, match=r"mix.jsonl:1: field 'input': expected 1 or 2 texts for a regression task, got 3"
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


def test_a_row_cut_by_an_unquoted_comma_is_refused_not_trained(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text(
        "text,label\ni hated it,negative\nso good,positive\ni loved it, really,positive\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match=rf"^{train}:4: row has 3 cells, the header has 2$"):
        load("t", task(type="classification", source={"format": "csv", "train": str(train)}))


def test_a_conll_word_without_a_tag_is_refused_before_any_label_is_built(tmp_path):
    train = tmp_path / "train.conll"
    validation = tmp_path / "validation.conll"
    train.write_text("John\tB-per\nruns\tO\n\nMary\tB-per\n", encoding="utf-8")
    validation.write_text("Mary\tB-per\nParis\n", encoding="utf-8")
    config = task(
        type="token_classification", source={"format": "conll", "train": str(train), "validation": str(validation)}
    )
    with pytest.raises(DataError, match=rf"^{validation}:2: line has 1 column, needs a token"):
        load("t", config)


def _digits_task(tmp_path, values, labels):
    rows = [{"text": f"review {i}", "stars": v} for i, v in enumerate(values)]
    train = jsonl(tmp_path / "t.jsonl", rows)
    return task(
        type="classification",
        source={"format": "jsonl", "train": train, "validation": train},
        label_field="stars",
        labels=labels,
    )


def test_digit_labels_are_names_when_the_configured_labels_are_digits(tmp_path):
    stars = ["1", "2", "3", "4", "5"]
    data = load("t", _digits_task(tmp_path, [1, "2", 3.0, " 4", 5, 1], stars))
    assert [e.label for e in data.splits["train"]] == ["1", "2", "3", "4", "5", "1"]
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'stars': unknown label '0' in train \(task 't' knows: 1, 2"):
        load("t", _digits_task(tmp_path, [0, 1, 2, 3, 4], stars))
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'stars': unknown label '0' in train"):  # mixed names
        load("t", _digits_task(tmp_path, ["1", "0", "1"], ["1", "positive"]))


def test_digit_labels_index_configured_names_that_are_not_digits(tmp_path):
    data = load("t", _digits_task(tmp_path, [0, "1", 2.0, "02", "neg"], ["neg", "pos", "mixed"]))
    assert [e.label for e in data.splits["train"]] == ["neg", "pos", "mixed", "mixed", "neg"]
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'stars': label index 3 is beyond the 3 configured labels"):
        load("t", _digits_task(tmp_path, [0, 3], ["neg", "pos", "mixed"]))
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'stars': unknown label '²' in train"):
        load("t", _digits_task(tmp_path, [0, "²"], ["neg", "pos", "mixed"]))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1e308, r"target 1e\+308 is beyond ±1e\+15"),
        (-2e15, r"target -2e\+15 is beyond ±1e\+15"),
        ("1e16", r"target 1e\+16 is beyond ±1e\+15"),
        (10**400, r"expected a number, got an integer of 401 digits"),
        (True, r"expected a number, got the boolean true"),
        (False, r"expected a number, got the boolean false"),
        ("inf", r"expected a finite number, got 'inf'"),
    ],
)
def test_regression_targets_that_cannot_train_are_refused_at_their_row(tmp_path, value, message):
    train = jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1.0}, {"text": "b", "label": value}])
    with pytest.raises(DataError, match=rf"t.jsonl:2: field 'label': {message}$"):
        load("t", task(type="regression", source={"format": "jsonl", "train": train}))


def test_regression_targets_at_the_limit_keep_finite_statistics(tmp_path):
    train = jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": v} for v in (1e15, -1e15, 1e15, -1e15)])
    data = load("t", task(type="regression", source={"format": "jsonl", "train": train, "validation": train}))
    assert (data.target_mean, data.target_std) == (0.0, 1e15)


def test_json_booleans_are_class_labels_only_where_listed(tmp_path):
    rows = [{"text": "a", "label": True}, {"text": "b", "label": False}, {"text": "c", "label": "true"}]
    train = jsonl(tmp_path / "t.jsonl", rows)
    source = {"format": "jsonl", "train": train, "validation": train}
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'label': expected a class label, got the boolean true"):
        load("t", task(type="classification", source=source))
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'label': expected a class label, got the boolean false"):
        load("t", task(type="classification", source=source, labels=["true", "no"]))
    data = load("t", task(type="classification", source=source, labels=["false", "true"]))
    assert [e.label for e in data.splits["train"]] == ["true", "false", "true"]
    tags = jsonl(tmp_path / "tags.jsonl", [{"tokens": ["a", "b"], "tags": ["O", True]}])
    with pytest.raises(DataError, match=r"tags.jsonl:1: field 'tags': expected a class label, got the boolean true"):
        load("t", task(type="token_classification", source={"format": "jsonl", "train": tags}, label_field="tags"))


def _hf_split(folder, labels, tags=None):
    """A split saved as `save_to_disk` writes it: a ClassLabel `label` (or a sequence-of-ClassLabel `tags`)."""
    import datasets

    if tags is None:
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["entailment", "not_entailment"])}
        )
        columns = {"text": [f"pair {i}" for i in range(len(labels))], "label": labels}
    else:
        features = datasets.Features(
            {
                "tokens": datasets.Sequence(datasets.Value("string")),
                "tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-loc", "I-loc"])),
            }
        )
        columns = {"tokens": [["w"] * len(t) for t in tags], "tags": tags}
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(folder))
    return str(folder / "data-00000-of-00001.arrow")


def _hf_task(files, **extra):
    return task(type="classification", source={"format": "hf", "dataset": "arrow", "data_files": files}, **extra)


def test_a_test_split_without_labels_is_not_scored(tmp_path):
    files = {
        "train": _hf_split(tmp_path / "train", [0, 1, 0, 1]),
        "validation": _hf_split(tmp_path / "validation", [1, 0]),
        "test": _hf_split(tmp_path / "test", [-1, -1, None]),
    }
    data = load("rte", _hf_task(files))
    assert sorted(data.splits) == ["train", "validation"] and data.labels == ["entailment", "not_entailment"]
    assert [e.label for e in data.splits["validation"]] == ["not_entailment", "entailment"]
    assert any("test: arrow[test] has no labels" in note for note in data.notes)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_train_or_validation_split_without_labels_is_refused(tmp_path, split):
    files = {name: _hf_split(tmp_path / name, [0, 1, 1]) for name in ("train", "validation")}
    files[split] = _hf_split(tmp_path / f"{split}-hidden", [-1, -1])
    with pytest.raises(DataError, match=rf"^arrow\[{split}\]: field 'label': the {split} split has no labels"):
        load("rte", _hf_task(files))


def test_a_split_with_some_labels_hidden_names_the_first_hidden_row(tmp_path):
    files = {
        "train": _hf_split(tmp_path / "train", [0, 1, 1]),
        "test": _hf_split(tmp_path / "test", [1, 0, -1, -1]),
    }
    with pytest.raises(
        DataError, match=r"^arrow\[test\]:3: field 'label': no label \(class id -1 or None\) in a split"
    ):
        load("rte", _hf_task(files))


def test_token_tags_without_labels_follow_the_same_rule(tmp_path):
    train = _hf_split(tmp_path / "train", None, tags=[[1, 2, 0], [0, 1]])
    hidden = _hf_split(tmp_path / "test", None, tags=[[-1, -1, -1], [-1]])
    config = task(
        type="token_classification",
        source={"format": "hf", "dataset": "arrow", "data_files": {"train": train, "test": hidden}},
        label_field="tags",
    )
    data = load("ner", config)
    assert "test" not in data.splits and data.labels == ["O", "B-loc", "I-loc"]
    mixed = _hf_split(tmp_path / "mixed", None, tags=[[0, 0], [1, -1]])
    config.source.data_files = {"train": train, "test": mixed}
    with pytest.raises(DataError, match=r"^arrow\[test\]:2: field 'tags': class id -1 \(no label\) at position 2 of 2"):
        load("ner", config)


@pytest.mark.skipif(not (SHARED_DATA / "rte" / "test.parquet").is_file(), reason="no shared data folder")
def test_rte_parquet_test_split_is_unlabelled_and_not_scored():
    files = {split: str(SHARED_DATA / "rte" / f"{split}.parquet") for split in ("train", "validation", "test")}
    config = task(
        type="pair_classification",
        source={"format": "hf", "dataset": "parquet", "data_files": files},
        text_fields=["sentence1", "sentence2"],
    )
    data = load("rte", config)
    assert {s: len(rows) for s, rows in data.splits.items()} == {"train": 2_490, "validation": 277}
    assert sum(e.label == "not_entailment" for e in data.splits["validation"]) == 131


def test_tags_that_entity_f1_cannot_score_are_refused_where_they_were_read(tmp_path):
    train = jsonl(tmp_path / "t.jsonl", [{"tokens": ["John", "runs"], "tags": ["B-per", "O"]}])
    odd = jsonl(tmp_path / "v.jsonl", [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["Paris"], "tags": ["LOC"]}])
    source = {"format": "jsonl", "train": train, "validation": odd}
    config = task(type="token_classification", source=source, label_field="tags", labels=["O", "B-per", "LOC"])
    with pytest.raises(DataError, match=r"v.jsonl:2: field 'tags': tag 'LOC' in validation is not IOB2"):
        load("t", config)
    config = task(type="token_classification", source={**source, "validation": train}, label_field="tags")
    config.labels = ["O", "B-per", "B-"]
    with pytest.raises(DataError, match=r"^field 'labels': tag 'B-' is not IOB2"):
        load("t", config)
    plain = task(
        type="token_classification",
        source=source,
        label_field="tags",
        labels=["O", "B-per", "LOC"],
        metrics=["token_accuracy"],
    )
    assert load("t", plain).labels == ["O", "B-per", "LOC"]  # token accuracy scores any tag


def test_dataset_class_names_that_are_digits_stay_names(tmp_path):
    # Star ratings: class ids 0, 1 are named "1", "2". Read back, id 0 is the name "1", never index 1 of `labels`.
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["1", "2"])})
    folder = tmp_path / "stars"
    datasets.Dataset.from_dict({"text": ["bad", "good"] * 4, "label": [0, 1] * 4}, features=features).save_to_disk(
        str(folder)
    )
    files = {"train": str(folder / "data-00000-of-00001.arrow")}
    data = load("stars", _hf_task(files))
    assert sorted(e.label for e in data.splits["train"] + data.splits["validation"]) == ["1"] * 4 + ["2"] * 4
    assert data.labels == ["1", "2"]
    # Configured word labels: "1" is not one of them (it used to become labels[1] = "high", one class off).
    with pytest.raises(DataError, match=r"arrow\[train\]:1: field 'label': unknown label '1'"):
        load("stars", _hf_task(files, labels=["low", "high"]))


@pytest.mark.parametrize("word", ["", " ", "\t"])
def test_a_blank_word_in_a_token_list_is_refused_as_in_conll_files(tmp_path, word):
    path = tmp_path / "tokens.jsonl"
    path.write_text(json.dumps({"tokens": ["a", word, "b"], "tags": ["O", "O", "O"]}) + "\n", encoding="utf-8")
    source = {"format": "jsonl", "train": str(path)}
    with pytest.raises(DataError, match=rf"^{path}:1: field 'tokens': word 2 of 3 is blank$"):
        load("t", task(type="token_classification", source=source, text_fields=["tokens"], label_field="tags"))
