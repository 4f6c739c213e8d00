"""Every loss weighting and every gradient aggregator (with each gradient source it takes) trains on the
device the model and the weighting were moved to, as the training session moves them: a stateful method
whose state stays on the CPU while the losses live on the GPU fails here. The CUDA cases are opt-in
(pytest -m gpu); the CPU cases run everywhere."""

from __future__ import annotations

import pytest
import torch

from multitune.balancing.backward import GRADIENT_SOURCES, balanced_backward
from multitune.balancing.gradients import GRADIENT_AGGREGATORS
from multitune.balancing.losses import LOSS_WEIGHTINGS
from multitune.config import GradientConfig, MethodConfig
from multitune.data.collate import collate
from multitune.data.tokens import Encoded
from multitune.models.heads import ClassificationHead
from multitune.models.multitask import MultiTaskModel
from multitune.recipe.components import build_balancer

TASKS = ["a", "b", "c"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PAIRS = [
    (name, source)
    for name in GRADIENT_AGGREGATORS.names()
    for source in GRADIENT_SOURCES.names()
    if source in getattr(GRADIENT_AGGREGATORS.get(name), "sources", ())
]


def _model(device: str) -> MultiTaskModel:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    heads = {name: ClassificationHead(16, 2) for name in TASKS}
    return MultiTaskModel(BertModel(config, add_pooling_layer=False), heads).to(device)


def _batch(step: int, device: str):
    generator = torch.Generator().manual_seed(step)
    rows = {}
    for name in TASKS:
        ids = torch.randint(5, 50, (4, 6), generator=generator).tolist()
        labels = torch.randint(2, (4,), generator=generator).tolist()
        rows[name] = [Encoded(i, None, y) for i, y in zip(ids, labels, strict=True)]
    return collate(rows, pad_id=0).to(device)


def _train(device: str, weighting: str, gradient: GradientConfig | None) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = _model(device)
    balancer = build_balancer(MethodConfig(name=weighting), gradient, TASKS, {}, 0)
    if isinstance(balancer.weighting, torch.nn.Module):
        balancer.weighting.to(device)  # what the training session does
    for step in range(4):  # windowed methods (DWA) roll over; FAMO and GradNorm update their state
        model.zero_grad(set_to_none=True)
        result = balanced_backward(model, _batch(step, device), balancer, step)
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in result.losses.values())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == device and torch.isfinite(g).all() for g in grads)
    weights = balancer.weighting.weights()
    assert set(weights) == set(TASKS) and all(isinstance(w, float) for w in weights.values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighting", LOSS_WEIGHTINGS.names())
def test_every_loss_weighting_trains_on_the_models_device(device, weighting):
    _train(device, weighting, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("aggregator", "source"), PAIRS)
def test_every_gradient_aggregator_trains_on_the_models_device(device, aggregator, source):
    _train(device, "equal", GradientConfig(name=aggregator, source=source))


@pytest.mark.parametrize("device", DEVICES)
def test_l2_sp_keeps_its_start_on_the_models_device(device):
    """θ⁰ taken on the CPU (before the model is placed) moves beside its parameter once; Ω and its
    gradient are the hand-computed ones: θ⁰ = 0, θ = 1 (3 values), α = 2 → Ω_S = ½·2·3 = 3, ∂ = 2;
    θ_N = 2 (2 values), β = 0.5 → Ω_N = ½·0.5·8 = 2, ∂ = 1."""
    from multitune.models.regularization import L2SP

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    shared, new = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.full((2,), 2.0))
    penalty = L2SP([shared], [new], alpha=2.0, beta=0.5)
    with torch.no_grad():
        shared.data = torch.ones(3, device=device)
        new.data = new.data.to(device)
    assert penalty.apply_() == pytest.approx(5.0)
    assert penalty.start[0].device.type == device
    assert shared.grad.tolist() == [2.0, 2.0, 2.0] and new.grad.tolist() == [1.0, 1.0]
