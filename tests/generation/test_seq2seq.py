"""Encoder-decoder (seq2seq) LMs: targets go to the decoder, the loss is HF's own, and a run trains,
evaluates and predicts through the CLI on a tiny random T5."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from multitune.catalogue import validate_config
from multitune.cli import main
from multitune.data.collate import collate
from multitune.data.encoding import encode
from multitune.data.tasks import Example, TaskData
from multitune.data.tokens import IGNORE_INDEX
from multitune.models.causal_lm import Seq2SeqMultiTask, load_seq2seq_lm
from tests.generation.test_generation_train import generation_config


@pytest.fixture
def model_and_batch(tiny_t5):
    backbone = load_seq2seq_lm(str(tiny_t5))
    config = validate_config(
        {
            "model": {"kind": "seq2seq"},
            "tasks": {name: {"type": "generation", "source": {"format": "jsonl", "train": "x"}} for name in "ab"},
        }
    )
    data = {name: TaskData(name, config.tasks[name], {}) for name in "ab"}
    examples = {
        "a": [Example(("good",), "positive", instruction="sentiment ?"), Example(("bad movie",), "negative")],
        "b": [Example(("one",), "one two three four five six seven eight", instruction="translate")],
    }
    rows = {name: encode(examples[name], data[name], backbone.tokenizer, 64, decoder_targets=True) for name in "ab"}
    model = Seq2SeqMultiTask(backbone.model, backbone.tokenizer, {}, ["a", "b"])
    return model, collate(rows, backbone.tokenizer.pad_token_id)


def test_targets_are_padded_to_their_own_length_and_survive_trimming(model_and_batch):
    _, batch = model_and_batch
    part = batch.tasks["b"]
    assert part.labels is not None and not part.aligned
    assert part.labels.shape[1] > batch.inputs["input_ids"].shape[1]  # a target longer than every input
    assert torch.equal(batch.only("b").tasks["b"].labels, part.labels)


def test_loss_equals_the_hf_loss(model_and_batch):
    model, batch = model_and_batch
    model.eval()
    losses = model.losses(batch)
    for name, part in batch.tasks.items():
        alone = batch.only(name)
        expected = model.backbone(**alone.inputs, labels=alone.tasks[name].labels).loss
        assert losses[name].item() == pytest.approx(expected.item(), rel=1e-5)
        assert int((part.labels != IGNORE_INDEX).sum()) == model.head_outputs(model.encode(batch), batch)[name].shape[0]


def test_a_seq2seq_run_trains_evaluates_and_predicts(tiny_t5, tmp_path, write_jsonl, capsys):
    config = generation_config(tiny_t5, tmp_path, write_jsonl)
    config["model"]["kind"] = "seq2seq"
    config["training"]["mixed_batches"] = True
    config["gradient_aggregation"] = {"name": "pcgrad", "source": "representation"}
    path = tmp_path / "t5.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "gen"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"sentiment", "copy"} and metrics["steps"] == 6
    assert main(["evaluate", str(run), "--split", "validation"]) == 0
    evaluated = json.loads((run / "evaluation_validation.json").read_text())
    assert evaluated["tasks"]["copy"]["metrics"] == metrics["tasks"]["copy"]["metrics"]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "a good movie"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(run), "--task", "sentiment", "--input", str(inputs), "--output", str(out)]) == 0
    assert isinstance(json.loads(out.read_text())["prediction"], str)


def test_each_generation_tasks_decoder_runs_through_its_own_lora_adapter(tiny_t5, tmp_path, write_jsonl):
    """The decoder runs in the task's head, after the shared encoder: changing one task's adapters changes
    that task's loss and no other's (a decoder left unrouted runs every task through one adapter)."""
    from multitune.recipe.prepare import prepare

    config = generation_config(tiny_t5, tmp_path, write_jsonl)
    config["model"].update(kind="seq2seq", peft={"method": "lora", "r": 2})
    prepared = prepare(validate_config(config))
    model = prepared.model.eval()
    batch = collate({name: prepared.encoded[name]["train"][:2] for name in prepared.tasks}, prepared.pad_id)

    def losses() -> dict[str, float]:
        with torch.no_grad():
            return {name: float(loss) for name, loss in model.losses(batch).items()}

    before = losses()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "decoder" in name and "lora_B.copy" in name:
                parameter.normal_(0, 1.0)
    after = losses()
    assert after["sentiment"] == before["sentiment"]
    assert abs(after["copy"] - before["copy"]) > 1e-3


@pytest.mark.parametrize("projection", [False, True])
def test_a_seq2seq_prefix_is_the_decoders_loads_with_plain_peft_and_generates_as_recomputed(
    tiny_t5, tmp_path, write_jsonl, projection
):
    """Prefix tuning on a T5: each task's prefix sits in front of the decoder's own keys and values (the
    encoder reads the tokens alone, as peft places a seq2seq prefix). PeftModel.from_pretrained on the plain T5
    gives the logits multitune's model gives; greedy generation through the growing cache equals decoding by
    recomputing the whole target each step."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from multitune.runs.load import load_run

    config = generation_config(tiny_t5, tmp_path, write_jsonl)
    config["model"].update(
        kind="seq2seq", peft={"method": "prefix", "virtual_tokens": 3, "prefix_projection": projection}
    )
    config["training"].update(mixed_batches=True, lr=5e-2, steps=8)
    path = tmp_path / "prefix.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "gen"
    _, _, model, _ = load_run(run)
    model.eval()
    ids, targets = torch.tensor([[5, 9, 12, 7, 30, 4]]), torch.tensor([[8, 11, 6, 1]])
    mask = torch.ones_like(ids)
    with torch.no_grad(), model.task_routing("copy", 1):
        states = model.encode(_plain(ids))
        ours = model.generation_logits(states, mask, targets)
        base = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_t5)).eval()
        theirs = PeftModel.from_pretrained(base, str(run / "adapters" / "copy")).eval()
        peft_logits = theirs(input_ids=ids, attention_mask=mask, labels=targets).logits[0]
        plain = (
            AutoModelForSeq2SeqLM.from_pretrained(str(tiny_t5))
            .eval()(input_ids=ids, attention_mask=mask, labels=targets)
            .logits[0]
        )
    assert torch.allclose(ours, peft_logits, atol=1e-5) and not torch.allclose(ours, plain, atol=1e-3)

    eos = model.tokenizer.eos_token_id
    for task in ("copy", "sentiment"):
        prompt = [5, 9, 12, 7]
        text = model.generate_texts([prompt], 5, pad_id=0, task=task)[0]
        target: list[int] = []
        for _ in range(5):  # recomputed: the target so far through the decoder, with a fresh prefix
            start = int(model.backbone.config.decoder_start_token_id)
            with torch.no_grad(), model.task_routing(task, 1):
                decoder = torch.tensor([[start, *target]])
                output = model.backbone(
                    input_ids=torch.tensor([prompt]),
                    decoder_input_ids=decoder,
                    **model.decoder_prefix(torch.device("cpu")),
                )
            target.append(int(output.logits[0, -1].argmax()))
            if target[-1] == eos:
                break
        assert text == model.tokenizer.decode(target, skip_special_tokens=True).strip()


def _plain(ids: torch.Tensor):
    from multitune.data.collate import Batch, TaskRows

    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, {"copy": TaskRows(slice(0, 1), None)})
