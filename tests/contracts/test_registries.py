"""Every registered sampler, loss weighting, head and metric runs through the same checks."""

import copy
import random
from collections import Counter

import pytest
import torch

from multitune.data.samplers import SAMPLERS, ObservesTraining, TaskSampler
from multitune.data.tokens import IGNORE_INDEX
from multitune.evaluation.metrics import METRICS, Metric
from multitune.models.heads import HEADS, Head

SIZES = {"a": 500, "b": 50, "c": 5}


EXAMPLE_PARAMS = {"manual": {"probabilities": {"a": 0.5, "b": 0.3, "c": 0.2}}}


def build_sampler(name):
    injected = {"sizes": SIZES, "weights": {"b": 3.0}, "total_steps": 100}
    return SAMPLERS.build(name, injected=injected, **EXAMPLE_PARAMS.get(name, {}))


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_contract(name):
    sampler = build_sampler(name)
    assert isinstance(sampler, TaskSampler)
    for step in (0, 50, 99):
        probabilities = sampler.probabilities(step)
        assert set(probabilities) == set(SIZES) and sum(probabilities.values()) == pytest.approx(1.0)
        assert all(p >= 0 for p in probabilities.values())
    # every task gets trained at some point of the run (a curriculum may leave a task out of one stage)
    assert all(sum(sampler.probabilities(s)[t] for s in range(100)) > 0 for t in SIZES)
    for step in range(50):
        chosen = sampler.tasks_for_step(step, random.Random(step))
        assert chosen and set(chosen) <= set(SIZES)
        assert chosen == sampler.tasks_for_step(step, random.Random(step))  # a pure function of (step, rng, state)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_frequencies_match_probabilities(name):
    sampler = build_sampler(name)
    steps = 20_000
    counts = Counter(t for step in range(steps) for t in sampler.tasks_for_step(step % 100, random.Random(f"7:{step}")))
    expected = {t: sum(sampler.probabilities(s)[t] for s in range(100)) / 100 for t in SIZES}
    total = sum(counts.values())
    for task, p in expected.items():
        assert counts[task] / total == pytest.approx(p, abs=0.015), task


@pytest.mark.parametrize("name", [n for n in SAMPLERS.names() if isinstance(build_sampler(n), ObservesTraining)])
def test_stateful_sampler_resumes_the_same_sequence(name):
    sampler = build_sampler(name)
    for step in range(30):
        sampler.observe_losses({t: 1.0 / (step + 1) if t == "a" else 1.0 for t in SIZES}, step)
    sampler.observe_validation({"a": 0.9, "b": 0.4, "c": 0.7}, 30)
    restored = build_sampler(name)
    restored.load_state_dict(copy.deepcopy(sampler.state_dict()))
    first = [sampler.tasks_for_step(s, random.Random(s)) for s in range(30, 80)]
    assert first == [restored.tasks_for_step(s, random.Random(s)) for s in range(30, 80)]


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
