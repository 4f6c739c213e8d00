"""Packing: examples of several tasks share rows, yet every task's loss and every gradient equal the padded
batch's (no token attends across examples); the fused chunked LM loss equals plain cross-entropy."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from multitune.catalogue import validate_config
from multitune.data.collate import collate, pack
from multitune.data.encoding import encode
from multitune.data.tasks import Example, TaskData
from multitune.data.tokens import IGNORE_INDEX
from multitune.models.causal_lm import CausalLMMultiTask, load_causal_lm
from multitune.models.lm_loss import linear_cross_entropy, linear_cross_entropy_per_task
from tests.conftest import WORDS


@pytest.fixture
def model_and_rows(tiny_causal_lm):
    backbone = load_causal_lm(str(tiny_causal_lm))
    config = validate_config(
        {"tasks": {name: {"type": "generation", "source": {"format": "jsonl", "train": "x"}} for name in "abc"}}
    )
    rng = random.Random(0)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    rows = {}
    for name, (low, high) in zip("abc", [(1, 4), (3, 12), (8, 20)], strict=True):
        examples = [Example((sentence(low, high),), sentence(1, high), instruction="translate") for _ in range(5)]
        rows[name] = encode(examples, TaskData(name, config.tasks[name], {}), backbone.tokenizer, 64)
    model = CausalLMMultiTask(backbone.model, backbone.tokenizer, {}, list("abc"))
    model.eval()
    return model, rows, backbone.tokenizer.pad_token_id


def _grads(model, losses):
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_losses_and_gradients_equal_the_padded_ones(model_and_rows):
    model, rows, pad = model_and_rows
    padded = collate(rows, pad)
    packed = pack(rows, pad, 48)
    examples = sum(len(r) for r in rows.values())
    assert packed.packed and packed.size < examples  # several examples per row
    real = int(packed.inputs["attention_mask"].sum())
    assert real == sum(len(row.input_ids) for r in rows.values() for row in r)
    assert real / packed.inputs["input_ids"].numel() > real / padded.inputs["input_ids"].numel()
    want, got = model.losses(padded), model.losses(packed)
    assert set(want) == set(got) == set("abc")
    for name in want:
        assert got[name].item() == pytest.approx(want[name].item(), rel=1e-5)
    grads_padded, grads_packed = _grads(model, model.losses(padded)), _grads(model, model.losses(packed))
    assert grads_padded.keys() == grads_packed.keys()
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-6)


def test_a_packed_example_does_not_see_its_neighbours(model_and_rows):
    model, rows, pad = model_and_rows
    batch = pack(rows, pad, 64)
    first = model.losses(batch)
    changed = {name: list(r) for name, r in rows.items()}
    other = changed["c"][0]
    changed["c"][0] = type(other)(list(reversed(other.input_ids)), None, other.label, prompt_length=other.prompt_length)
    second = model.losses(pack(changed, pad, 64))
    assert second["a"].item() == pytest.approx(first["a"].item(), rel=1e-6)
    assert second["b"].item() == pytest.approx(first["b"].item(), rel=1e-6)
    assert second["c"].item() != pytest.approx(first["c"].item(), rel=1e-6)


def test_only_one_task_of_a_packed_batch_keeps_its_loss(model_and_rows):
    model, rows, pad = model_and_rows
    batch = pack(rows, pad, 48)
    for name in "abc":
        part = batch.only(name)
        assert list(part.tasks) == [name]
        assert model.losses(part)[name].item() == pytest.approx(model.losses(batch)[name].item(), rel=1e-5)


def test_an_example_longer_than_the_pack_is_refused(model_and_rows):
    _, rows, pad = model_and_rows
    with pytest.raises(ValueError, match="does not fit"):
        pack(rows, pad, 8)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_fused_linear_cross_entropy_equals_plain_cross_entropy(bias, chunk):
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, 50, (23,))
    fused = linear_cross_entropy(hidden, weight, b, targets, chunk)
    (3.0 * fused).backward()
    got = [hidden.grad.clone(), weight.grad.clone(), *([b.grad.clone()] if b is not None else [])]
    for t in [hidden, weight, *([b] if b is not None else [])]:
        t.grad = None
    plain = F.cross_entropy(F.linear(hidden, weight, b), targets)
    (3.0 * plain).backward()
    want = [hidden.grad, weight.grad, *([b.grad] if b is not None else [])]
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)


def _per_task_case(bias: bool):
    torch.manual_seed(1)
    hidden = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, 40, (30,))
    tasks = torch.tensor([2] * 4 + [0] * 19 + [2] * 7)  # task 1 has no rows; task 2's rows in two runs
    leaves = [hidden, weight, *([b] if b is not None else [])]

    def plain() -> list[torch.Tensor]:  # each task's mean cross-entropy on its own rows; no rows: 0
        logits = F.linear(hidden, weight, b)
        return [
            F.cross_entropy(logits[tasks == j], targets[tasks == j]) if (tasks == j).any() else logits.sum() * 0.0
            for j in range(3)
        ]

    return hidden, weight, b, targets, tasks, leaves, plain


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 6, 1000])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.3, 2.0, 1.5)])
def test_fused_per_task_losses_and_gradients_equal_plain_cross_entropy(bias, chunk, weights):
    hidden, weight, b, targets, tasks, leaves, plain = _per_task_case(bias)
    fused = linear_cross_entropy_per_task(hidden, weight, b, targets, tasks, 3, chunk)
    got = torch.autograd.grad(sum(w * loss for w, loss in zip(weights, fused, strict=True)), leaves)
    want_losses = plain()
    want = torch.autograd.grad(sum(w * loss for w, loss in zip(weights, want_losses, strict=True)), leaves)
    torch.testing.assert_close(fused.double(), torch.stack(want_losses), rtol=1e-6, atol=1e-9)
    assert fused[1].item() == 0.0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 2.0)])
def test_the_fused_pass_under_bf16_autocast_matches_plain_cross_entropy_under_it(weights):
    """Mixed precision (accelerate's autocast): the head's products in bf16, several chunks (gradients summed
    across chunks in float32), fp32 leaves. Plain cross-entropy under the same autocast is the reference, to
    bf16's precision; the fp32 result bounds both."""
    torch.manual_seed(2)
    hidden = torch.randn(70, 16, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16)).requires_grad_()
    b = (0.1 * torch.randn(50)).requires_grad_()
    targets, tasks = torch.randint(0, 50, (70,)), torch.tensor([0] * 30 + [1] * 40)
    leaves = [hidden, weight, b]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy_per_task(hidden, weight, b, targets, tasks, 2, 16)  # 5 chunks
        logits = F.linear(hidden, weight, b).float()
        plain = torch.stack([F.cross_entropy(logits[tasks == j], targets[tasks == j]) for j in range(2)])
    assert fused.dtype == torch.float32
    got = torch.autograd.grad(sum(w * x for w, x in zip(weights, fused, strict=True)), leaves)
    want = torch.autograd.grad(sum(w * x for w, x in zip(weights, plain, strict=True)), leaves)
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-3)


def test_each_tasks_gradient_from_the_one_fused_pass(model_and_rows):
    """A gradient method takes every task's gradient from the same node in turn (the graph retained): each
    equals that task's plain gradient, and asking twice gives the same answer."""
    hidden, weight, b, targets, tasks, leaves, plain = _per_task_case(True)
    fused = linear_cross_entropy_per_task(hidden, weight, b, targets, tasks, 3, 5)
    want_losses = plain()
    for j in (0, 2, 0, 1):
        got = torch.autograd.grad(fused[j], leaves, retain_graph=True)
        want = torch.autograd.grad(want_losses[j], leaves, retain_graph=True, allow_unused=True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), torch.zeros_like(g) if w is None else w, rtol=1e-5, atol=1e-7)


def test_one_fused_pass_for_every_generation_task_of_a_batch(model_and_rows, monkeypatch):
    """A mixed batch of three generation tasks: one pass through the LM head, and the same losses and
    weighted gradients as the plain cross-entropy of each task."""
    import multitune.models.causal_lm as causal_lm

    model, rows, pad = model_and_rows
    batch = collate(rows, pad)
    calls = []
    real = causal_lm.linear_cross_entropy_per_task
    monkeypatch.setattr(causal_lm, "linear_cross_entropy_per_task", lambda *a: calls.append(a[-2]) or real(*a))
    weights = {"a": 0.2, "b": 1.0, "c": 3.0}
    model.loss_chunk = 7
    fused = model.losses(batch)
    fused_grads = _grads(model, {n: weights[n] * loss for n, loss in fused.items()})
    assert calls == [3]
    model.loss_chunk = 0
    plain = model.losses(batch)
    plain_grads = _grads(model, {n: weights[n] * loss for n, loss in plain.items()})
    for name in plain:
        assert fused[name].item() == pytest.approx(plain[name].item(), rel=1e-5)
    assert set(fused_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_fused_loss_is_what_the_model_trains_on(model_and_rows):
    model, rows, pad = model_and_rows
    batch = collate(rows, pad)
    model.loss_chunk = 5
    fused = model.losses(batch)
    model.loss_chunk = 0
    plain = model.losses(batch)
    for name in plain:
        assert fused[name].item() == pytest.approx(plain[name].item(), rel=1e-5)
    assert all((part.labels != IGNORE_INDEX).any() for part in batch.tasks.values())


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "flex_attention", "eager"])
def test_packing_isolates_examples_on_a_gpu(model_and_rows, attention):
    """Opt-in (pytest -m gpu): the packed losses equal the padded ones under bf16 autocast on CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, rows, pad = model_and_rows
    model = model.cuda()
    model.backbone.set_attn_implementation(attention)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = model.losses(collate(rows, pad).to("cuda"))
        got = model.losses(pack(rows, pad, 48).to("cuda"))
    for name in want:
        assert got[name].item() == pytest.approx(want[name].item(), rel=2e-2)
