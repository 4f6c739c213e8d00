"""End to end on a tiny random Llama: two generation tasks train, evaluate and predict through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from multitune.cli import main
from tests.conftest import classification_rows
from tests.e2e.test_bad_input import run_bad
from tests.generation.conftest import copy_rows, sentiment_records


def generation_config(lm: Path, tmp_path: Path, write_jsonl) -> dict:
    unified = write_jsonl("mixed.jsonl", sentiment_records(40))
    copy = write_jsonl("copy.jsonl", copy_rows(40))
    return {
        "run": {"name": "gen", "output_dir": str(tmp_path / "runs"), "seed": 3},
        "model": {"backbone": str(lm), "max_length": 48},
        "training": {"steps": 6, "batch_size": 4, "lr": 1e-3, "eval_every": 3, "log_every": 2, "progress": False},
        "sampling": {"name": "temperature", "temperature": 2.0},
        "loss_weighting": {"name": "uncertainty"},
        "tasks": {
            "sentiment": {
                "type": "generation",
                "source": {"format": "unified", "train": str(unified)},
                "metrics": ["accuracy", "exact_match"],
                "max_new_tokens": 3,
            },
            "copy": {
                "type": "generation",
                "source": {"format": "jsonl", "train": str(copy)},
                "label_field": "target",
                "instruction": "translate",
                "metrics": ["bleu", "chrf", "rouge_l", "exact_match"],
                "max_new_tokens": 6,
            },
        },
    }


def test_two_generation_tasks_train_evaluate_and_predict(tiny_causal_lm, tmp_path, write_jsonl, capsys):
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(generation_config(tiny_causal_lm, tmp_path, write_jsonl)), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "gen"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6
    assert metrics["tasks"]["sentiment"]["main_metric"] == "accuracy"
    assert set(metrics["tasks"]["copy"]["metrics"]) == {"bleu", "chrf", "rouge_l", "exact_match"}
    assert metrics["parameters"]["heads"] == {"sentiment": 0, "copy": 0}
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    losses = [h["losses"] for h in history if "losses" in h]
    assert losses and all(v > 0 for entry in losses for v in entry.values())
    assert {name for entry in losses for name in entry} == {"sentiment", "copy"}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["kind"] == "causal_lm"

    assert main(["evaluate", str(run), "--split", "validation"]) == 0
    evaluated = json.loads((run / "evaluation_validation.json").read_text())
    assert evaluated["tasks"]["copy"]["metrics"] == metrics["tasks"]["copy"]["metrics"]

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a good movie"}\n{"input": "bad", "instruction": "sentiment ?"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main(["predict", str(run), "--task", "sentiment", "--input", str(inputs), "--output", str(out)]) == 0
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p.get("text", p.get("input")) for p in predictions] == ["a good movie", "bad"]
    assert all(isinstance(p["prediction"], str) for p in predictions)


def test_a_generation_task_beside_a_classification_head(tiny_causal_lm, tmp_path, write_jsonl):
    config = generation_config(tiny_causal_lm, tmp_path, write_jsonl)
    del config["tasks"]["copy"]
    config["tasks"]["label"] = {
        "type": "classification",
        "source": {"format": "jsonl", "train": str(write_jsonl("cls.jsonl", classification_rows(40)))},
    }
    config["training"].update(mixed_batches=True, steps=3)
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    metrics = json.loads((tmp_path / "runs" / "gen" / "metrics.json").read_text())
    assert metrics["tasks"]["label"]["main_metric"] == "accuracy" and metrics["parameters"]["heads"]["label"] > 0


@pytest.mark.parametrize("method", ["lora", "bottleneck", "prefix"])
def test_per_task_adapters_on_a_causal_lm(tiny_causal_lm, tmp_path, write_jsonl, method):
    config = generation_config(tiny_causal_lm, tmp_path, write_jsonl)
    settings = {"virtual_tokens": 3} if method == "prefix" else {"r": 4, "dropout": 0.0, "bottleneck_size": 8}
    config["model"]["peft"] = {"method": method, **settings}
    config["training"].update(mixed_batches=True, lr=5e-2)
    path = tmp_path / "adapters.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "gen"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["parameters"]["heads"]["sentiment"] > 0  # each task's own adapter
    if method != "bottleneck":  # bottleneck adapters are not a peft method
        assert (run / "adapters" / "copy" / "adapter_model.safetensors").exists()
    assert main(["evaluate", str(run), "--split", "validation"]) == 0
    evaluated = json.loads((run / "evaluation_validation.json").read_text())
    assert evaluated["tasks"]["copy"]["metrics"] == metrics["tasks"]["copy"]["metrics"]


@pytest.mark.parametrize("projection", [False, True])
def test_a_causal_lms_prefix_loads_with_plain_peft_and_generates_as_recomputed(
    tiny_causal_lm, tmp_path, write_jsonl, projection
):
    """Each task's prefix on a grouped-query Llama (1 key/value head, 2 query heads): PeftModel.from_pretrained
    gives the logits multitune's model gives; greedy generation through the cached prefix equals decoding by
    recomputing every step from scratch (the prefix cache rebuilt, the whole sequence run again)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from multitune.data.collate import Batch, TaskRows
    from multitune.runs.load import load_run

    config = generation_config(tiny_causal_lm, tmp_path, write_jsonl)
    config["model"]["peft"] = {"method": "prefix", "virtual_tokens": 3, "prefix_projection": projection}
    config["training"].update(mixed_batches=True, lr=5e-2, steps=8)
    path = tmp_path / "prefix.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "gen"
    _, _, model, _ = load_run(run)
    ids = torch.tensor([[5, 9, 12, 7, 30, 4]])
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, {"copy": TaskRows(slice(0, 1), None)})
    with torch.no_grad():
        ours = model.lm_head(model.encode(batch))
        plain = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(tiny_causal_lm)), str(run / "adapters" / "copy")
        )
        theirs = plain.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_causal_lm)).eval()(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(ours, base, atol=1e-3)

    prompts = [[5, 9, 12], [7, 30, 4, 11, 8]]  # left-padded to one length
    eos, lengths = model.tokenizer.eos_token_id, []
    cases = [
        (name, prompt, text)
        for name in ("copy", "sentiment")
        for prompt, text in zip(prompts, model.generate_texts(prompts, 5, pad_id=1, task=name), strict=True)
    ]
    for task, prompt, text in cases:
        sequence = list(prompt)
        for _ in range(5):  # recomputed: the whole sequence with a fresh prefix, the next token its argmax
            step = torch.tensor([sequence])
            part = Batch(
                {"input_ids": step, "attention_mask": torch.ones_like(step)}, {task: TaskRows(slice(0, 1), None)}
            )
            with torch.no_grad():
                logits = model.lm_head(model.encode(part))[0, -1]
                sequence.append(int(logits.argmax()))
            if sequence[-1] == eos:
                break
        assert text == model.tokenizer.decode(sequence[len(prompt) :], skip_special_tokens=True).strip()
        seen = Collect()  # one prompt alone, token by token as a streamer sees them (eos included)
        model.generate_texts([prompt], 5, pad_id=1, task=task, streamer=seen)
        assert seen.tokens == sequence[len(prompt) :]
        lengths.append(len(seen.tokens))
    assert max(lengths) > 1, "the check covers decoding from the grown cache"


class Collect:
    """A streamer that keeps the new tokens (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.prompt_seen, self.ended = False, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.tokens += value.reshape(-1).tolist()
        self.prompt_seen = True

    def end(self) -> None:
        self.ended = True


@pytest.fixture
def bad_setup(tmp_path, tiny_causal_lm, write_jsonl):
    config = generation_config(tiny_causal_lm, tmp_path, write_jsonl)
    earlier = tmp_path / "runs" / "tiny"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text('{"earlier": true}', encoding="utf-8")
    return tmp_path, config


def test_bad_verbalizer_label(bad_setup, capsys):
    tmp_path, config = bad_setup
    data = tmp_path / "sst.tsv"
    data.write_text("sentence\tlabel\ngood\t1\nbad\t2\n", encoding="utf-8")
    config["tasks"]["copy"].update(
        source={"format": "tsv", "train": str(data)},
        text_fields=["sentence"],
        label_field="label",
        verbalizer={"0": "negative", "1": "positive"},
    )
    err = run_bad(tmp_path, config, capsys)
    assert err == f"multitune: error: {data}:3: field 'label': label '2' is not in the verbalizer (it maps: 0, 1)"


def test_bad_target_format_value(bad_setup, capsys):
    tmp_path, config = bad_setup
    data = tmp_path / "sts.tsv"
    data.write_text("a\tb\t3.2\nc\td\tn/a\n", encoding="utf-8")
    config["tasks"]["copy"].update(
        source={"format": "tsv", "header": False, "train": str(data)},
        text_fields=[0, 1],
        label_field=2,
        target_format="{:.1f}",
    )
    err = run_bad(tmp_path, config, capsys)
    assert err == f"multitune: error: {data}:2: field '2': target_format needs a number, got 'n/a'"


def test_misaligned_parallel_files(bad_setup, capsys):
    tmp_path, config = bad_setup
    (tmp_path / "t.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "t.de").write_text("eins\nzwei\n", encoding="utf-8")
    config["tasks"]["copy"]["source"] = {
        "format": "parallel",
        "train": [str(tmp_path / "t.en"), str(tmp_path / "t.de")],
    }
    err = run_bad(tmp_path, config, capsys)
    assert err == (
        f"multitune: error: {tmp_path / 't.en'}:3: has more lines than {tmp_path / 't.de'} "
        "(parallel files must be line-aligned)"
    )


def test_parallel_needs_a_pair_of_files(bad_setup, capsys):
    tmp_path, config = bad_setup
    config["tasks"]["copy"]["source"] = {"format": "parallel", "train": str(tmp_path / "t.en")}
    err = run_bad(tmp_path, config, capsys)
    assert "field 'tasks.copy.source': format 'parallel' takes train: [source_file, target_file]" in err


def test_verbalizer_on_a_classification_task(bad_setup, capsys):
    tmp_path, config = bad_setup
    config["tasks"]["copy"]["type"] = "classification"
    config["tasks"]["copy"]["verbalizer"] = {"0": "no"}
    del config["tasks"]["copy"]["instruction"]
    err = run_bad(tmp_path, config, capsys)
    assert "field 'tasks.copy': verbalizer: only generation tasks take it (this task is classification)" in err


def test_packed_training_reaches_the_padded_weights(tiny_causal_lm, tmp_path, write_jsonl):
    """Mixed batches packed into rows train to the same weights as the same batches padded."""
    from safetensors.torch import load_file

    data = generation_config(tiny_causal_lm, tmp_path, write_jsonl)
    data["training"].update(mixed_batches=True, eval_every=6, checkpoint_every=None)
    data["model"]["dropout"] = 0.0
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["train", str(path), "run.name=padded"]) == 0
    assert main(["train", str(path), "run.name=packed", "training.packing=true", "training.pack_length=64"]) == 0
    padded = load_file(str(tmp_path / "runs" / "padded" / "model.safetensors"))
    packed = load_file(str(tmp_path / "runs" / "packed" / "model.safetensors"))
    assert padded.keys() == packed.keys()
    for name, tensor in padded.items():
        torch.testing.assert_close(packed[name], tensor, rtol=1e-4, atol=1e-5)
    history = [json.loads(line) for line in (tmp_path / "runs" / "packed" / "history.jsonl").read_text().splitlines()]
    assert {name for h in history if "losses" in h for name in h["losses"]} == {"sentiment", "copy"}


@pytest.mark.parametrize("method", ["lora", "prefix"])
@pytest.mark.parametrize("shared", [False, True])
def test_packing_refuses_per_task_adapters_even_beside_a_shared_one(
    tiny_causal_lm, tmp_path, write_jsonl, method, shared
):
    """A packed row holds several tasks' examples and the packed forward routes no adapter: with a shared
    adapter beside the per-task ones, packing used to pass the config and train no adapter at all."""
    from multitune.catalogue import validate_config
    from multitune.errors import ConfigError

    data = generation_config(tiny_causal_lm, tmp_path, write_jsonl)
    data["model"]["peft"] = {"method": method, "shared": shared}
    data["training"].update(packing=True)
    with pytest.raises(ConfigError, match="a packed row holds several tasks' examples") as error:
        validate_config(data)
    assert error.value.field == "training.packing"


def test_mixed_generation_batches_train_in_bf16_with_the_fused_head_across_chunks(
    tiny_causal_lm, tmp_path, write_jsonl
):
    """bf16 mixed precision (accelerate's autocast on the CPU) with both generation tasks in every batch and a
    loss chunk smaller than a batch's target tokens: the one fused LM-head pass runs over several chunks in
    bf16 and trains (its first chunk's gradient was bf16 and the next chunk's in-place add refused fp32)."""
    config = generation_config(tiny_causal_lm, tmp_path, write_jsonl)
    config["training"].update(mixed_precision="bf16", mixed_batches=True, batch_size=8, log_every=1)
    config["model"]["lm_loss_chunk"] = 4
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    history = [json.loads(line) for line in (tmp_path / "runs" / "gen" / "history.jsonl").read_text().splitlines()]
    steps = [h for h in history if "losses" in h]
    assert len(steps) == 6 and all(len(h["losses"]) == 2 and 0 < h["loss"] < 100 for h in steps)
