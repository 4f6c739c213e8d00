"""Generation tasks' data: targets, the parallel reader, prompt/label masking and truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multitune.catalogue import validate_config
from multitune.data.encoding import encode
from multitune.data.generative import read_parallel
from multitune.data.tasks import Example, TaskData, load_tasks
from multitune.data.tokens import IGNORE_INDEX
from multitune.errors import ConfigError, DataError


def generation_task(source: dict, **extra) -> dict:
    return {"type": "generation", "source": source, **extra}


def load(tasks: dict) -> dict[str, TaskData]:
    config = validate_config({"model": {"backbone": "x"}, "tasks": tasks})
    return load_tasks(config.tasks, seed=1)


def test_parallel_reader_pairs_lines_and_skips_trailing_blank_lines(tmp_path: Path):
    (tmp_path / "a.en").write_text("a dog runs\n\na cat sits\n\n", encoding="utf-8")
    (tmp_path / "a.de").write_text("ein hund rennt\n\neine katze sitzt\n", encoding="utf-8")
    rows = list(read_parallel(str(tmp_path / "a.en"), str(tmp_path / "a.de")))
    assert [(r.values, r.line) for r in rows] == [
        ({"source": "a dog runs", "target": "ein hund rennt"}, 1),
        ({"source": "a cat sits", "target": "eine katze sitzt"}, 3),
    ]


@pytest.mark.parametrize(
    ("en", "de", "where", "message"),
    [
        ("a\nb\nc\n", "x\ny\n", "a.en:3", "has more lines than"),
        ("a\n", "x\ny\n", "a.de:2", "has more lines than"),
        ("a\n\n", "x\ny\n", "a.en:2", "empty source line"),
        ("a\nb\n", "x\n \n", "a.de:2", "empty target line"),
    ],
)
def test_parallel_reader_errors_name_the_file_and_line(tmp_path: Path, en, de, where, message):
    (tmp_path / "a.en").write_text(en, encoding="utf-8")
    (tmp_path / "a.de").write_text(de, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        list(read_parallel(str(tmp_path / "a.en"), str(tmp_path / "a.de")))
    assert str(caught.value).startswith(f"{tmp_path / where}: {message}")


def test_targets_from_verbalizer_format_unified_and_parallel(tmp_path: Path, write_jsonl):
    tsv = tmp_path / "sst.tsv"
    tsv.write_text("sentence\tlabel\ngood fun\t1\nawful\t0\nfine\t1\n", encoding="utf-8")
    sts = tmp_path / "sts.tsv"
    sts.write_text("a\tb\t3.75\nc\td\t1\ne\tf\t0.2\n", encoding="utf-8")
    unified = write_jsonl("u.jsonl", [{"task": "qa", "instruction": "", "input": ["x", "y"], "output": "z"}] * 3)
    (tmp_path / "t.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "t.de").write_text("eins\nzwei\ndrei\n", encoding="utf-8")
    data = load(
        {
            "sst": generation_task(
                {"format": "tsv", "train": str(tsv), "validation": str(tsv)},
                text_fields=["sentence"],
                instruction="Sentiment?",
                verbalizer={"0": "negative", "1": "positive"},
            ),
            "sts": generation_task(
                {"format": "tsv", "header": False, "train": str(sts), "validation": str(sts)},
                text_fields=[0, 1],
                label_field=2,
                target_format="{:.1f}",
            ),
            "qa": generation_task(
                {"format": "unified", "train": str(unified), "validation": str(unified)}, instruction="fallback"
            ),
            "mt": generation_task(
                {
                    "format": "parallel",
                    "train": [str(tmp_path / "t.en"), str(tmp_path / "t.de")],
                    "validation": [str(tmp_path / "t.en"), str(tmp_path / "t.de")],
                },
                instruction="Translate",
            ),
        }
    )
    assert [(e.texts, e.label, e.instruction) for e in data["sst"].splits["train"]] == [
        (("good fun",), "positive", "Sentiment?"),
        (("awful",), "negative", "Sentiment?"),
        (("fine",), "positive", "Sentiment?"),
    ]
    assert [e.label for e in data["sts"].splits["train"]] == ["3.8", "1.0", "0.2"]
    assert data["sts"].splits["train"][0].texts == ("a", "b")
    assert data["qa"].splits["train"][0] == Example(("x", "y"), "z", str(unified), 1, "fallback")
    assert [(e.texts, e.label, e.line) for e in data["mt"].splits["train"]] == [
        (("one",), "eins", 1),
        (("two",), "zwei", 2),
        (("three",), "drei", 3),
    ]
    assert data["sst"].labels is None


def test_generation_only_keys_and_parallel_shape_are_config_errors():
    with pytest.raises(ConfigError, match="verbalizer: only generation tasks"):
        validate_config(
            {
                "tasks": {
                    "a": {
                        "type": "classification",
                        "source": {"format": "jsonl", "train": "x"},
                        "verbalizer": {"0": "no"},
                    }
                }
            }
        )
    with pytest.raises(ConfigError, match=r"format 'parallel' takes train: \[source_file, target_file\]"):
        validate_config({"tasks": {"a": generation_task({"format": "parallel", "train": "x.en"})}})
    with pytest.raises(ConfigError, match="give one, not both"):
        validate_config(
            {
                "tasks": {
                    "a": generation_task(
                        {"format": "jsonl", "train": "x"}, verbalizer={"0": "a"}, target_format="{:.1f}"
                    )
                }
            }
        )
    with pytest.raises(ConfigError, match="does not format a number"):
        validate_config({"tasks": {"a": generation_task({"format": "jsonl", "train": "x"}, target_format="{:d}")}})
    with pytest.raises(ConfigError, match="needs a causal_lm or seq2seq backbone"):
        validate_config(
            {"model": {"kind": "encoder"}, "tasks": {"a": generation_task({"format": "jsonl", "train": "x"})}}
        )
    config = validate_config({"tasks": {"a": generation_task({"format": "jsonl", "train": "x"})}})
    assert config.model.kind == "causal_lm" and config.tasks["a"].metrics == ["exact_match"]
    assert config.tasks["a"].max_new_tokens == 32


# --- encoding -------------------------------------------------------------------------------------


@pytest.fixture
def tokenizer(tiny_causal_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_causal_lm))


def task_data(**extra) -> TaskData:
    config = validate_config({"tasks": {"t": generation_task({"format": "jsonl", "train": "x"}, **extra)}})
    return TaskData("t", config.tasks["t"], {})


def test_labels_cover_the_target_only_shifted_by_one(tokenizer):
    example = Example(("a good movie",), "positive", instruction="sentiment ?")
    (row,) = encode([example], task_data(), tokenizer, max_length=64)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sentiment ?\n\na good movie"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer("positive", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row.input_ids == prompt_ids + target and row.prompt_length == len(prompt_ids)
    assert isinstance(row.label, list) and len(row.label) == len(row.input_ids)
    n = len(prompt_ids)
    assert row.label[: n - 1] == [IGNORE_INDEX] * (n - 1)
    assert row.label[n - 1 : -1] == target and row.label[-1] == IGNORE_INDEX
    for i, label in enumerate(row.label):  # each label is the next input token
        if label != IGNORE_INDEX:
            assert row.input_ids[i + 1] == label and i + 1 >= n
    (bare,) = encode([example], task_data(), tokenizer, max_length=64, with_labels=False)
    assert bare.input_ids == prompt_ids and bare.label is None


def test_truncation_cuts_the_input_from_the_left_and_keeps_the_target(tokenizer):
    words = " ".join(["one", "two", "three"] * 20) + " yes"
    example = Example((words,), "good movie", instruction="translate")
    (row,) = encode([example], task_data(), tokenizer, max_length=24)
    assert len(row.input_ids) == 24
    assert isinstance(row.label, list)
    kept = [t for t in row.label if t != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "good movie <|im_end|>"
    prompt = tokenizer.decode(row.input_ids[: row.prompt_length])
    assert prompt.startswith("<|im_start|> user translate two three") and prompt.endswith(
        "yes <|im_end|> <|im_start|> assistant"
    )


def test_without_a_chat_template_the_prompt_is_plain_text(tokenizer):
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    (row,) = encode([Example(("a good movie",), "yes")], task_data(), plain, max_length=64)
    assert plain.decode(row.input_ids[: row.prompt_length]) == "a good movie"


def test_unified_records_and_the_cli_bad_input(tmp_path, write_jsonl):
    path = write_jsonl(
        "u.jsonl", [{"task": "t", "input": "a", "output": "b"}, {"task": "t", "input": "c", "output": {}}]
    )
    config = validate_config({"tasks": {"t": generation_task({"format": "unified", "train": str(path)})}})
    with pytest.raises(DataError) as caught:
        load_tasks(config.tasks, 1)
    assert str(caught.value) == f"{path}:2: field 'output': expected a target text, got dict"
    assert json.loads(path.read_text().splitlines()[0])["output"] == "b"
