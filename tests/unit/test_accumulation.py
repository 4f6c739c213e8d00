"""Gradient accumulation splits only the backbone's work: for every loss weighting and representation-source
aggregator, the gradients equal those of the whole batch at once; dropout masks repeat on the replay."""

import pytest
import torch

from multitune.balancing.backward import balanced_backward, encode_in_parts
from multitune.catalogue import validate_config
from multitune.data.collate import collate
from multitune.errors import ConfigError
from multitune.recipe.prepare import prepare
from tests.conftest import balancer_for, classification_rows, tiny_config, token_rows


@pytest.fixture
def prepared(tmp_path, tiny_backbone, write_jsonl):
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    return prepare(validate_config(tiny_config(tiny_backbone, a, b, tmp_path / "runs")))


def _batch(prepared, n=5):
    return collate({name: prepared.encoded[name]["train"][:n] for name in ("sentiment", "ner")}, prepared.pad_id)


def _gradients(prepared, balancing, micro_batches):
    config = validate_config({**prepared.config.model_dump(mode="json"), **balancing})
    balancer = balancer_for(config, ["sentiment", "ner"])
    model = prepared.model
    model.eval()  # no dropout: one pass and several passes see the same function
    model.zero_grad(set_to_none=True)
    result = balanced_backward(model, _batch(prepared), balancer, 0, micro_batches=micro_batches)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return result, grads


@pytest.mark.parametrize(
    "balancing",
    [
        {},
        {"loss_weighting": {"name": "uncertainty"}},
        {"loss_weighting": {"name": "geometric"}},
        {"loss_weighting": {"name": "gradnorm"}, "training": {"mixed_batches": True}},
        {"gradient_aggregation": {"name": "pcgrad"}, "training": {"mixed_batches": True}},
        {"gradient_aggregation": {"name": "mgda"}, "training": {"mixed_batches": True}},
        {"gradient_aggregation": {"name": "upgrad"}, "training": {"mixed_batches": True}},
    ],
    ids=["equal", "uncertainty", "geometric", "gradnorm", "pcgrad", "mgda", "upgrad"],
)
def test_accumulated_gradients_equal_the_whole_batch(prepared, balancing):
    _check_accumulation(prepared, balancing, 3)


def test_one_row_per_part(prepared):
    _check_accumulation(prepared, {"loss_weighting": {"name": "uncertainty"}}, 10)


def _check_accumulation(prepared, balancing, parts):
    whole, want = _gradients(prepared, balancing, 1)
    split, got = _gradients(prepared, balancing, parts)
    assert want.keys() == got.keys() and any("backbone" in n for n in got)
    for name in whole.losses:
        assert split.losses[name].item() == pytest.approx(whole.losses[name].item(), rel=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)


def test_the_replay_repeats_each_parts_dropout(prepared):
    model = prepared.model
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    batch = _batch(prepared)
    torch.manual_seed(7)
    hidden, replay = encode_in_parts(model, batch, 3)
    after = torch.get_rng_state()
    grad = torch.randn_like(hidden)
    model.zero_grad(set_to_none=True)
    replay(grad)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(torch.get_rng_state(), after)  # later randomness is as without the replay

    torch.manual_seed(7)  # reference: the same parts in the same order, with a graph
    model.zero_grad(set_to_none=True)
    bounds = [(0, 3), (3, 6), (6, 10)]
    for a, b in bounds:
        piece = model.encode(batch.rows(a, b))
        torch.testing.assert_close(piece, hidden[a:b, : piece.shape[1]].detach())
        piece.backward(grad[a:b, : piece.shape[1]])
    for name, value in got.items():
        torch.testing.assert_close(value, model.get_parameter(name).grad)


def test_rows_of_a_batch_keep_their_tasks_and_labels(prepared):
    batch = _batch(prepared)
    part = batch.rows(3, 7)
    assert part.size == 4
    assert part.tasks["sentiment"].rows == slice(0, 2) and part.tasks["ner"].rows == slice(2, 4)
    assert torch.equal(part.tasks["sentiment"].labels, batch.tasks["sentiment"].labels[3:5])
    width = part.inputs["input_ids"].shape[1]
    assert int(part.inputs["attention_mask"].sum(1).max()) == width  # trimmed to its own longest row
    assert torch.equal(part.tasks["ner"].labels, batch.tasks["ner"].labels[:2, :width])


@pytest.mark.parametrize(
    ("training", "extra", "message"),
    [
        ({"gradient_accumulation": 8}, {}, "into more parts than it has rows"),
        (
            {"gradient_accumulation": 2, "mixed_batches": True},
            {"gradient_aggregation": {"name": "pcgrad", "source": "parameters"}},
            "with the parameters source",
        ),
        ({"packing": True}, {}, "packing puts several generation examples"),
    ],
)
def test_speed_options_that_cannot_apply_are_config_errors(prepared, training, extra, message):
    data = prepared.config.model_dump(mode="json")
    data["training"].update(training)
    with pytest.raises(ConfigError, match=message):
        validate_config({**data, **extra})
