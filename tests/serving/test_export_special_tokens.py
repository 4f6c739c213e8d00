"""An exported model's card code reads text as multitune does: a text or word that spells '[SEP]' or '[CLS]' is
ordinary pieces there too, not the special token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from multitune.cli import main
from tests.serving.test_export import card_code, cli_predict

SEP = ["[UNK]", "s", "##e", "##p", "[UNK]"]  # the tiny vocabulary has no '[' or ']' and spells 'sep' letter by letter
CLS = ["[UNK]", "c", "##l", "##s", "[UNK]"]


def inputs_seen(module: Any) -> list[list[int]]:
    """Record the input ids of each forward of `module`."""
    seen: list[list[int]] = []
    module.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    return seen


def test_the_card_code_encodes_spelled_special_tokens_as_text(tiny_run: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(tiny_run), "--task", "sentiment", "sentiment-model"]) == 0
    namespace = card_code(tmp_path / "sentiment-model")
    tokenizer = namespace["tokenizer"]
    seen = inputs_seen(namespace["encoder"])
    text = "a [SEP] good [CLS]"
    (label,) = namespace["predict"]([text])
    assert tokenizer.convert_ids_to_tokens(seen[-1]) == ["[CLS]", "a", *SEP, "good", *CLS, "[SEP]"]
    assert [label] == [p["prediction"] for p in cli_predict(tiny_run, "sentiment", [{"text": text}], tmp_path)]

    assert main(["export", str(tiny_run), "--task", "ner", "ner-model"]) == 0
    namespace = card_code(tmp_path / "ner-model")
    seen = inputs_seen(namespace["model"])
    words = ["john", "[SEP]", "paris"]
    tags = namespace["predict"](words)
    assert namespace["tokenizer"].convert_ids_to_tokens(seen[-1]) == ["[CLS]", "john", *SEP, "paris", "[SEP]"]
    assert tags == cli_predict(tiny_run, "ner", [{"tokens": words}], tmp_path)[0]["prediction"]
