"""Every registered sampler, loss weighting, head and metric runs through the same checks."""

import random

import pytest
import torch

from multitune.balancing.backward import balanced_backward
from multitune.balancing.weighting import LOSS_WEIGHTINGS
from multitune.data.encoding import IGNORE_INDEX
from multitune.data.samplers import SAMPLERS, TaskSampler
from multitune.evaluation.metrics import METRICS, Metric
from multitune.models.heads import HEADS, Head

TASKS = ["a", "b", "c"]
SIZES = {"a": 500, "b": 50, "c": 5}


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_contract(name):
    sampler = SAMPLERS.build(name, injected={"sizes": SIZES, "weights": {"b": 3.0}})
    assert isinstance(sampler, TaskSampler)
    probabilities = sampler.probabilities()
    assert set(probabilities) == set(SIZES) and sum(probabilities.values()) == pytest.approx(1.0)
    assert all(p > 0 for p in probabilities.values())
    for step in range(50):
        chosen = sampler.tasks_for_step(step, random.Random(step))
        assert chosen and set(chosen) <= set(SIZES)
        assert chosen == sampler.tasks_for_step(step, random.Random(step))  # a pure function of (step, rng)


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS.names())
def test_loss_weighting_contract(name):
    weighting = LOSS_WEIGHTINGS.build(name, injected={"task_names": TASKS, "loss_weights": {"a": 2.0}})
    losses = torch.tensor([0.5, 1.5, 3.0], requires_grad=True)
    total = weighting.combine(losses, TASKS, step=0)
    assert total.ndim == 0 and torch.isfinite(total)
    total.backward()
    assert losses.grad is not None and torch.all(losses.grad >= 0) and torch.any(losses.grad > 0)
    # a subset of tasks in any order gives the same value as the same tasks in canonical order
    subset = weighting.combine(torch.tensor([3.0, 0.5]), ["c", "a"], step=1)
    assert subset == pytest.approx(float(weighting.combine(torch.tensor([0.5, 3.0]), ["a", "c"], step=1)))
    assert set(weighting.weights()) == set(TASKS)
    if isinstance(weighting, torch.nn.Module):
        again = LOSS_WEIGHTINGS.build(name, injected={"task_names": TASKS, "loss_weights": {"a": 2.0}})
        again.load_state_dict(weighting.state_dict())
        assert again.weights() == weighting.weights()


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS.names())
def test_balanced_backward_writes_gradients_through_the_weighting(name):
    weighting = LOSS_WEIGHTINGS.build(name, injected={"task_names": TASKS, "loss_weights": None})
    parameter = torch.nn.Parameter(torch.ones(3))
    losses = {task: (parameter[i] * (i + 1)) ** 2 for i, task in enumerate(TASKS)}
    total = balanced_backward(losses, weighting, step=0)
    assert parameter.grad is not None and torch.isfinite(total)
    assert torch.all(parameter.grad > 0)


@pytest.mark.parametrize("name", HEADS.names())
def test_head_contract(name):
    torch.manual_seed(0)
    head = HEADS.build(name, hidden_size=8, num_labels=3, dropout=0.0)
    assert isinstance(head, Head)
    if head.level == "token":
        features, labels = torch.randn(2, 5, 8), torch.tensor([[IGNORE_INDEX, 0, 2, 1, IGNORE_INDEX]] * 2)
    elif name == "regression":
        features, labels = torch.randn(4, 8), torch.randn(4)
    else:
        features, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 1])
    outputs = head(features)
    assert outputs.shape[0] == features.shape[0]
    loss = head.loss(outputs, labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


PERFECT = {
    "sequence": (["a", "b", "a", "c"], ["a", "b", "a", "c"]),
    "scores": ([0.1, 0.5, 0.9, 2.0], [0.1, 0.5, 0.9, 2.0]),
    "tags": ([["B-x", "I-x", "O"], ["O", "B-y"]], [["B-x", "I-x", "O"], ["O", "B-y"]]),
}


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_contract(name):
    metric = METRICS.build(name, injected={"positive_label": "a"})
    assert isinstance(metric, Metric) and metric.name == name
    kind = {"pearson": "scores", "spearman": "scores", "mse": "scores", "entity_f1": "tags", "token_accuracy": "tags"}
    predictions, references = PERFECT[kind.get(name, "sequence")]
    best = metric(predictions, references)
    assert best == pytest.approx(1.0 if metric.higher_is_better else 0.0)
