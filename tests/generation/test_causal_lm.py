"""The causal-LM multi-task model: its loss is HF's loss on the target positions, and it shares everything."""

from __future__ import annotations

import pytest
import torch

from multitune.catalogue import validate_config
from multitune.data.collate import collate
from multitune.data.encoding import encode
from multitune.data.tasks import Example, TaskData
from multitune.data.tokens import IGNORE_INDEX
from multitune.models.causal_lm import CausalLMMultiTask, load_causal_lm


@pytest.fixture
def model_and_rows(tiny_causal_lm):
    backbone = load_causal_lm(str(tiny_causal_lm))
    config = validate_config(
        {"tasks": {name: {"type": "generation", "source": {"format": "jsonl", "train": "x"}} for name in "ab"}}
    )
    data = {name: TaskData(name, config.tasks[name], {}) for name in "ab"}
    examples = {
        "a": [Example(("a good movie",), "positive", instruction="sentiment ?"), Example(("bad",), "negative")],
        "b": [Example(("one two three four five",), "one two three four five", instruction="translate")],
    }
    rows = {name: encode(examples[name], data[name], backbone.tokenizer, 64) for name in "ab"}
    model = CausalLMMultiTask(backbone.model, backbone.tokenizer, {}, ["a", "b"])
    return model, collate(rows, backbone.tokenizer.pad_token_id)


def test_loss_equals_the_hf_loss_on_the_target_positions(model_and_rows):
    model, batch = model_and_rows
    model.eval()
    losses = model.losses(batch)
    for name, part in batch.tasks.items():
        ids = batch.inputs["input_ids"][part.rows]
        shifted = part.labels
        assert shifted is not None
        hf_labels = torch.full_like(ids, IGNORE_INDEX)  # HF shifts itself: the label of a token is the token
        hf_labels[:, 1:] = torch.where(shifted[:, :-1] != IGNORE_INDEX, ids[:, 1:], IGNORE_INDEX)
        assert torch.equal(hf_labels[:, 1:][shifted[:, :-1] != IGNORE_INDEX], shifted[shifted != IGNORE_INDEX])
        expected = model.backbone(
            input_ids=ids, attention_mask=batch.inputs["attention_mask"][part.rows], labels=hf_labels
        ).loss
        assert losses[name].item() == pytest.approx(expected.item(), rel=1e-5)


def test_logits_only_at_labelled_positions_and_everything_is_shared(model_and_rows):
    model, batch = model_and_rows
    hidden = model.encode(batch)
    outputs = model.head_outputs(hidden, batch)
    vocab = model.backbone.config.vocab_size
    for name, part in batch.tasks.items():
        assert part.labels is not None
        assert outputs[name].shape == (int((part.labels != IGNORE_INDEX).sum()), vocab)
        assert list(model.task_parameters(name)) == []
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.parameters())
    model.head_losses(hidden, batch)["a"].backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_generate_texts_left_pads_and_matches_one_by_one(model_and_rows):
    model, _ = model_and_rows
    model.eval()
    prompts = [[2, 66, 27, 31, 3, 2, 67], [2, 66, 27, 3, 2, 67]]
    pad = model.tokenizer.pad_token_id
    together = model.generate_texts(prompts, 5, pad)
    alone = [model.generate_texts([p], 5, pad)[0] for p in prompts]
    assert together == alone and all(isinstance(t, str) for t in together)
