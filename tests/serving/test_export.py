"""`multitune export`: the folder loads with plain transformers (and the card's code) and predicts as multitune."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from multitune.cli import main
from tests.conftest import classification_rows, tiny_config, token_rows
from tests.serving.conftest import train, write_rows

TEXTS = ["a good movie", "bad", "the film was great and good", "terrible book"]
WORDS = [["john", "runs", "in", "paris"], ["mary", "likes", "london"]]


def cli_predict(run: Path, task: str, records: list[dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    assert main(["predict", str(run), "--task", task, "--input", str(source), "--output", str(out)]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def card_code(folder: Path) -> dict[str, Any]:
    """Run the model card's Python block (plain transformers) from the folder's parent; its namespace."""
    card = (folder / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.S)
    assert code is not None
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), "card", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def lora_run(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lora-run")
    a = write_rows(folder / "sentiment.jsonl", classification_rows(60))
    b = write_rows(folder / "ner.jsonl", token_rows(60))
    config = tiny_config(tiny_backbone, a, b, folder / "runs")
    config["model"]["peft"] = {"method": "lora", "r": 4, "shared": True}
    config["training"]["lr"] = 5e-2  # LoRA's B starts at zero: give the adapters a visible value
    return train(folder, config)


@pytest.mark.parametrize("which", ["tiny_run", "lora_run"])
def test_exported_tasks_predict_like_multitune(which, request, tmp_path, monkeypatch):
    run: Path = request.getfixturevalue(which)
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "--task", "sentiment", "sentiment-model"]) == 0
    folder = tmp_path / "sentiment-model"
    head = json.loads((folder / "multitune_head.json").read_text())
    assert head["type"] == "classification" and head["pooling"] == "mean"
    card = (folder / "README.md").read_text()
    assert "## Metrics" in card and "accuracy" in card and "## Licenses" in card and "## Data" in card
    assert "reproduced multitune's outputs" in card
    namespace = card_code(folder)
    expected = [p["prediction"] for p in cli_predict(run, "sentiment", [{"text": t} for t in TEXTS], tmp_path)]
    assert namespace["predict"](TEXTS) == expected

    assert main(["export", str(run), "--task", "ner", "ner-model"]) == 0
    from transformers import AutoModelForTokenClassification

    tagger = AutoModelForTokenClassification.from_pretrained(tmp_path / "ner-model")
    assert set(tagger.config.id2label.values()) >= {"O", "B-loc", "B-per"}
    predict = card_code(tmp_path / "ner-model")["predict"]
    expected_tags = cli_predict(run, "ner", [{"tokens": w} for w in WORDS], tmp_path)
    assert [predict(w) for w in WORDS] == [p["prediction"] for p in expected_tags]


def test_lora_export_merges_the_adapters(lora_run, tmp_path):
    from safetensors.torch import load_file

    assert main(["export", str(lora_run), "--task", "sentiment", str(tmp_path / "out")]) == 0
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any("lora" in key for key in weights)
    base = load_file(str(lora_run / "model.safetensors"))
    merged = next(k for k in weights if k.endswith("attention.self.query.weight"))
    original = next(
        v for k, v in base.items() if k.endswith(merged.split(".", 1)[-1].replace(".weight", ".base_layer.weight"))
    )
    assert not (weights[merged] == original).all()  # the LoRA update is in the weights


def test_export_refuses_a_taken_folder_and_an_unknown_task(tiny_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    assert main(["export", str(tiny_run), "--task", "sentiment", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--task", "nope", str(tmp_path / "new")]) == 2
    assert "no task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def loaded_with(monkeypatch: pytest.MonkeyPatch, change: Any) -> None:
    """Export loads the run, then `change(model)` alters what the model says of itself."""
    import multitune.export.model
    from multitune.runs.load import load_run

    def load(run: Path) -> Any:
        config, manifest, model, backbone = load_run(run)
        change(model)
        return config, manifest, model, backbone

    monkeypatch.setattr(multitune.export.model, "load_run", load)


def test_export_follows_the_models_declaration_of_its_features_not_its_name(tiny_run, tmp_path, monkeypatch, capsys):
    loaded_with(monkeypatch, lambda model: setattr(model, "architecture", "renamed"))
    assert main(["export", str(tiny_run), "--task", "sentiment", str(tmp_path / "renamed")]) == 0
    assert (tmp_path / "renamed" / "multitune_head.json").is_file()
    loaded_with(monkeypatch, lambda model: setattr(model, "backbone_features", False))
    assert main(["export", str(tiny_run), "--task", "sentiment", str(tmp_path / "own")]) == 2
    err = capsys.readouterr().err
    assert "gives each task features of its own" in err and "model.architecture" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "own").exists() and not list(tmp_path.glob(".own.*"))


def test_export_merges_adapters_that_declare_they_merge_whatever_their_name(lora_run, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    def renamed(model: Any) -> None:
        model.task_adapters.method = "renamed"

    loaded_with(monkeypatch, renamed)
    assert main(["export", str(lora_run), "--task", "sentiment", str(tmp_path / "renamed")]) == 0
    assert not any("lora" in key for key in load_file(str(tmp_path / "renamed" / "model.safetensors")))

    def unmergeable(model: Any) -> None:
        model.task_adapters.adapter_method.merges = False

    loaded_with(monkeypatch, unmergeable)
    assert main(["export", str(lora_run), "--task", "sentiment", str(tmp_path / "kept")]) == 2
    err = capsys.readouterr().err
    assert "'lora' adapters cannot be merged into the backbone's weights" in err and "model.peft.method" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "kept").exists() and not list(tmp_path.glob(".kept.*"))


def test_onnx_export(tiny_run, tmp_path):
    pytest.importorskip("onnx")
    assert main(["export", str(tiny_run), "--task", "sentiment", str(tmp_path / "out"), "--onnx"]) == 0
    assert (tmp_path / "out" / "model.onnx").stat().st_size > 0


def test_card_names_each_score_by_its_split_once(tiny_backbone, tmp_path):
    """The final scores are the test split's, the selection's are validation's at the best step: each once."""
    rows = classification_rows(60)
    a = write_rows(tmp_path / "a.jsonl", rows[:40])
    b = write_rows(tmp_path / "b.jsonl", token_rows(40))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=6, eval_every=2)
    config["tasks"]["sentiment"]["source"].update(
        validation=str(write_rows(tmp_path / "v.jsonl", rows[40:50])),
        test=str(write_rows(tmp_path / "t.jsonl", rows[50:])),
    )
    run = train(tmp_path, config)
    assert main(["evaluate", str(run), "--split", "test"]) == 0  # the same scores again: not a second line
    assert main(["export", str(run), "--task", "sentiment", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    section = card.split("## Metrics\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    metrics = json.loads((run / "metrics.json").read_text())
    final = metrics["tasks"]["sentiment"]
    assert final["split"] == "test" and final["n"] == 10
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    chosen = [
        h["validation"]["sentiment"] for h in history if h.get("step") == metrics["best_step"] and "validation" in h
    ]
    assert len(chosen) == 1

    def shown(values: dict[str, float]) -> str:
        return ", ".join(f"{name} {value:.4f}" for name, value in values.items())

    expected = [f"- test split, the final evaluation (n=10): {shown(final['metrics'])}"]
    expected.append(f"- validation split at step {metrics['best_step']}, the step kept as best: {shown(chosen[0])}")
    assert section == [*expected, f"- training: 6 steps in {metrics['train_seconds']} s"]
    assert "model selection" not in card


def test_card_quotes_whole_license_paragraphs():
    """A license statement wrapped over several lines of ATTRIBUTION.md is quoted whole, not cut at a line end."""
    from types import SimpleNamespace

    from multitune.catalogue import load_config
    from multitune.export import data_licenses
    from tests.conftest import REPO

    config = load_config(str(REPO / "configs" / "quickstart.yaml"), [])
    sms = data_licenses(SimpleNamespace(config=config.tasks["sms_spam"]))  # type: ignore[arg-type]
    assert sms == [
        "data `multitune:quickstart/sms_spam`: Source: T. A. Almeida and J. M. Gomez Hidalgo, UCI Machine Learning "
        'Repository. The corpus "is provided for free and with no limitations excepting" its copyright, which '
        "remains with the authors, and without warranty. Cite: Almeida, T.A., Gomez Hidalgo, J.M., Yamakami, A. "
        '"Contributions to the Study of SMS Spam Filtering: New Collection and Results", DocEng 2011.'
    ]
    stsb = data_licenses(SimpleNamespace(config=config.tasks["stsb"]))  # type: ignore[arg-type]
    assert stsb[0].startswith("data `multitune:quickstart/stsb`: License: the scores are CC BY-SA 4.0 (share-alike:")
    assert stsb[0].endswith(
        'Semantic Textual Similarity Multilingual and Crosslingual Focused Evaluation", SemEval 2017.'
    )


def test_card_metric_lines_from_hand_written_run_files(tmp_path):
    """Each score once under its own split: the final test scores, the validation at the best step (not the
    last validation), a re-evaluation only where its scores differ."""
    from multitune.export import metric_lines

    def entry(split: str, n: int, accuracy: float) -> dict[str, object]:
        return {"split": split, "n": n, "metrics": {"accuracy": accuracy}, "main_metric": "accuracy"}

    run = tmp_path / "run"
    run.mkdir()
    metrics = {"tasks": {"a": entry("test", 20, 0.75)}, "best_step": 4, "steps": 6, "train_seconds": 1.5}
    (run / "metrics.json").write_text(json.dumps(metrics))
    history = [
        {"step": 2, "validation": {"a": {"accuracy": 0.5}}},
        {"step": 4, "validation": {"a": {"accuracy": 0.875}}},
        {"step": 6, "validation": {"a": {"accuracy": 0.625}}},
    ]
    (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history) + '{"step": 7, "valid')
    (run / "evaluation_test.json").write_text(json.dumps({"tasks": {"a": entry("test", 20, 0.75)}}))
    assert metric_lines(run, "a") == [
        "- test split, the final evaluation (n=20): accuracy 0.7500",
        "- validation split at step 4, the step kept as best: accuracy 0.8750",
        "- training: 6 steps in 1.5 s",
    ]
    (run / "evaluation_test.json").write_text(json.dumps({"tasks": {"a": entry("test", 24, 0.625)}}))
    assert metric_lines(run, "a")[2] == "- test split, scored again by `multitune evaluate` (n=24): accuracy 0.6250"
    metrics["tasks"]["a"] = entry("validation", 8, 0.875)  # no test split: the final scores are validation's
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "evaluation_test.json").unlink()
    assert metric_lines(run, "a") == [
        "- validation split (the task has no test split), the final evaluation (n=8): accuracy 0.8750",
        "- training: 6 steps in 1.5 s",
    ]


def test_card_code_holds_regression_answers_to_the_range_and_leaves_words_past_the_cut_untagged(
    pair_run, tiny_run, tmp_path, monkeypatch
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pair_run, run)
    manifest = json.loads((run / "tasks.json").read_text(encoding="utf-8"))
    manifest["similarity"].update(target_min=2.5, target_max=2.5)  # a range of one value: every answer is 2.5
    (run / "tasks.json").write_text(json.dumps(manifest), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "--task", "similarity", "similarity-model"]) == 0
    head = json.loads((tmp_path / "similarity-model" / "multitune_head.json").read_text())
    assert (head["target_min"], head["target_max"]) == (2.5, 2.5)
    pairs = [("a good movie", "a fine film"), ("bad", "terrible book")]
    answers = card_code(tmp_path / "similarity-model")["predict"]([a for a, _ in pairs], [b for _, b in pairs])
    ours = cli_predict(run, "similarity", [{"text": a, "text_pair": b} for a, b in pairs], tmp_path)
    assert answers == [p["prediction"] for p in ours] == [2.5, 2.5]

    assert main(["export", str(tiny_run), "--task", "ner", "ner-model"]) == 0
    words = ["john", "in", "paris", "a", "dog"] * 10  # 50 one-piece words; max_length 32 holds 30 of them
    tags = card_code(tmp_path / "ner-model")["predict"](words)
    assert tags[30:] == [None] * 20 and None not in tags[:30]


def test_vllm_export_holds_the_base_and_each_tasks_lora_adapter_that_plain_peft_reproduces(tmp_path, capsys):
    """--format vllm: base/ loads with plain transformers, adapters/TASK with plain peft on it, and greedy
    generation through each equals `multitune predict` on the same records; the README names the command."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from multitune.data.readers import Row
    from multitune.runs.load import load_run, task_from_manifest
    from multitune.runs.predict import encode_for_prediction
    from tests.generation.conftest import build_tiny_causal_lm, copy_rows

    torch.manual_seed(0)
    lm = build_tiny_causal_lm(tmp_path / "lm")
    data = write_rows(tmp_path / "copy.jsonl", copy_rows(30))
    task = {"type": "generation", "source": {"format": "jsonl", "train": str(data)}, "label_field": "target"}
    config = {
        "run": {"name": "gen", "output_dir": str(tmp_path / "runs"), "seed": 3},
        "model": {"backbone": str(lm), "max_length": 48, "peft": {"method": "lora", "r": 4}},
        "training": {"steps": 4, "batch_size": 4, "lr": 5e-2, "eval_every": 4, "progress": False},
        "tasks": {
            "copy": {**task, "instruction": "translate", "max_new_tokens": 5},
            "echo": {**task, "instruction": "rate", "max_new_tokens": 5},
        },
    }
    run = train(tmp_path, config)
    out = tmp_path / "vllm"
    assert main(["export", str(run), "--format", "vllm", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert "--enable-lora" in readme and "copy=./adapters/copy echo=./adapters/echo" in readme
    # rank 4 is not a size vLLM's --max-lora-rank takes (1, 8, 16, ...): the command names 8
    assert "--max-lora-rank 8 " in readme and "| copy | translate |" in readme and "| echo | rate |" in readme
    records = [{"text": "the cat sits"}, {"text": "a dog runs in paris"}]
    run_config, manifest, _, backbone = load_run(run)
    tokenizer = AutoTokenizer.from_pretrained(str(out / "base"))
    assert tokenizer.chat_template == backbone.tokenizer.chat_template
    for name in ("copy", "echo"):
        expected = [p["prediction"] for p in cli_predict(run, name, records, tmp_path)]
        data_task = task_from_manifest(name, run_config.tasks[name], manifest[name])
        rows = [Row(dict(r), "x", i) for i, r in enumerate(records)]
        encoded = encode_for_prediction(run_config.model, data_task, backbone.tokenizer, rows)
        plain = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(out / "base")), str(out / "adapters" / name)
        )
        plain.eval()
        got = []
        for row in encoded:
            prompt = torch.tensor([row.input_ids[: row.prompt_length]])
            with torch.no_grad():
                new = plain.generate(
                    input_ids=prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            got.append(tokenizer.decode(new[0, prompt.shape[1] :], skip_special_tokens=True).strip())
        assert got == expected
    assert main(["export", str(run), "--format", "vllm", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--format", "vllm", "--task", "copy", str(tmp_path / "one")]) == 2
    assert "--task and --onnx are for --format hf" in capsys.readouterr().err and not (tmp_path / "one").exists()
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    # not a folder; a name too long; a name that fits but whose staging name (12 more characters) does not
    for where in (blocked / "sub", tmp_path / ("n" * 300), tmp_path / ("n" * 250)):
        for fmt in (["--format", "vllm"], ["--task", "copy"]):
            capsys.readouterr()
            assert main(["export", str(run), *fmt, str(where)]) == 2
            error = capsys.readouterr().err.strip()
            assert error.startswith("multitune: error: ") and "\n" not in error and "Traceback" not in error
            assert not list(tmp_path.glob(".*"))  # no staging folder left behind
    assert main(["export", str(run), "--format", "vllm", str(out)]) == 2  # not empty: refused, left as it was
    assert (out / "README.md").read_text() == readme


def test_vllm_export_refuses_a_run_without_per_task_lora_adapters(generation_run, tmp_path, capsys):
    assert main(["export", str(generation_run), "--format", "vllm", str(tmp_path / "out")]) == 2
    assert "one LoRA adapter per task" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["export", str(generation_run), str(tmp_path / "out")]) == 2  # format hf needs --task
    assert "--task" in capsys.readouterr().err
