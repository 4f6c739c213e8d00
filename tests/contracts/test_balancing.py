"""Every registered gradient aggregator and loss weighting, through the same checks, plus closed forms."""

import copy

import numpy as np
import pytest
import torch

from multitune.balancing.backward import Balancer, balanced_backward
from multitune.balancing.gradients import GRADIENT_AGGREGATORS, GramianAggregator, gramian
from multitune.balancing.losses import LOSS_WEIGHTINGS
from multitune.data.collate import collate
from multitune.data.tokens import Encoded

TASKS = ["a", "b", "c", "d", "e"]
NON_CONFLICTING = {"mgda", "upgrad", "nash_mtl"}


def build(name, tasks=TASKS, **params):
    return GRADIENT_AGGREGATORS.build(name, injected={"task_names": tasks, "seed": 0}, **params)


def grads(t, p=40, seed=0):
    return torch.randn(t, p, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", GRADIENT_AGGREGATORS.names())
@pytest.mark.parametrize("t", [2, 3, 5])
def test_shape_and_finiteness(name, t):
    update = build(name).aggregate(grads(t), TASKS[:t])
    assert update.shape == (40,) and torch.isfinite(update).all()


@pytest.mark.parametrize("name", GRADIENT_AGGREGATORS.names())
def test_identical_task_gradients_give_a_parallel_update(name):
    g = grads(1)[0]
    update = build(name).aggregate(g.repeat(4, 1), TASKS[:4])
    assert update.norm() > 1e-3 * g.norm()
    assert torch.nn.functional.cosine_similarity(update, g, dim=0) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", GRADIENT_AGGREGATORS.names())
def test_permutation_equivariance(name):
    # a randomized method visits the other tasks in a random order: with two tasks there is only one order
    t = 2 if getattr(GRADIENT_AGGREGATORS.get(name), "randomized", False) else 4
    m = grads(t, seed=3)
    perm = torch.tensor([2, 0, 3, 1] if t == 4 else [1, 0])
    first, second = build(name), build(name)
    for step in range(3):  # stateful methods (GradVac's targets, Nash-MTL's warm start) stay equivariant
        update = first.aggregate(m + step, TASKS[:t])
        permuted = second.aggregate((m + step)[perm], [TASKS[i] for i in perm])
        assert torch.allclose(update, permuted, atol=1e-4 * update.norm().item() + 1e-6)


DEGENERATE = {
    "opposite": torch.stack([torch.arange(1.0, 7.0), -torch.arange(1.0, 7.0)]),
    "zero row": torch.stack([torch.arange(1.0, 7.0), torch.zeros(6), torch.ones(6)]),
    "collinear": torch.stack([torch.arange(1.0, 7.0), 1e-3 * torch.arange(1.0, 7.0), -2 * torch.arange(1.0, 7.0)]),
    "tiny": 1e-20 * torch.stack([torch.arange(1.0, 7.0), torch.ones(6)]),
}


@pytest.mark.parametrize("name", GRADIENT_AGGREGATORS.names())
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_task_gradients_give_a_finite_update(name, case):
    m = DEGENERATE[case]
    method = build(name)
    for _ in range(3):  # and the method's state stays usable afterwards
        update = method.aggregate(m, TASKS[: len(m)])
        assert update.shape == (6,) and torch.isfinite(update).all(), update
    assert torch.isfinite(method.aggregate(grads(len(m), p=6), TASKS[: len(m)])).all()
    if name in NON_CONFLICTING and case == "opposite":  # no direction helps both: stand still
        assert update.norm() <= 1e-3 * m.norm()


@pytest.mark.parametrize("name", sorted(NON_CONFLICTING))
@pytest.mark.parametrize("seed", range(5))
def test_update_never_conflicts_with_a_task(name, seed):
    m = grads(4, p=6, seed=seed)  # few dimensions: conflicts are common
    update = build(name).aggregate(m, TASKS[:4])
    assert (m @ update >= -1e-5 * m.norm(dim=1) * update.norm()).all()


@pytest.mark.parametrize("name", GRADIENT_AGGREGATORS.names())
def test_gramian_weights_match_the_matrix_form(name):
    method = build(name)
    if not isinstance(method, GramianAggregator):
        pytest.skip("works on the matrix itself")
    m = grads(3, seed=5)
    twin = copy.deepcopy(method)
    alpha = method.weights(gramian(m), TASKS[:3])
    assert torch.allclose(alpha @ m, twin.aggregate(m, TASKS[:3]), atol=1e-5)


@pytest.mark.parametrize("name", GRADIENT_AGGREGATORS.names())
def test_state_round_trip_continues_identically(name):
    method = build(name)
    for seed in range(3):
        method.aggregate(grads(3, seed=seed), TASKS[:3])
    if not hasattr(method, "state_dict"):
        return
    restored = build(name)
    restored.load_state_dict(copy.deepcopy(method.state_dict()))
    m = grads(3, seed=9)
    assert torch.allclose(method.aggregate(m, TASKS[:3]), restored.aggregate(m, TASKS[:3]))


def test_mgda_two_task_closed_form():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 1.0])
    alpha = float(torch.clamp((g2 - g1) @ g2 / (g1 - g2).norm() ** 2, 0, 1))
    expected = alpha * g1 + (1 - alpha) * g2
    assert torch.allclose(build("mgda").aggregate(torch.stack([g1, g2]), TASKS[:2]), expected, atol=1e-6)
    # one gradient inside the other's half-space with smaller norm: MGDA returns the smaller one
    small, large = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0])
    assert torch.allclose(build("mgda").aggregate(torch.stack([small, large]), TASKS[:2]), small, atol=1e-6)


def test_pcgrad_two_task_closed_form():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert torch.allclose(build("pcgrad").aggregate(torch.stack([g1, g2]), TASKS[:2]), p1 + p2, atol=1e-6)
    agreeing = torch.tensor([[1.0, 0.2], [0.5, 1.0]])
    assert torch.allclose(build("pcgrad").aggregate(agreeing, TASKS[:2]), agreeing.sum(0), atol=1e-6)


def test_cagrad_without_radius_is_the_plain_sum():
    m = grads(3, seed=2)
    assert torch.allclose(build("cagrad", c=0.0).aggregate(m, TASKS[:3]), m.sum(0), atol=1e-5)


def test_imtl_g_projects_equally_on_every_unit_gradient():
    m = grads(4, seed=4)
    update = build("imtl_g").aggregate(m, TASKS[:4])
    projections = (m / m.norm(dim=1, keepdim=True)) @ update
    assert torch.allclose(projections, projections.mean().expand(4), atol=1e-4)


def test_nash_mtl_solves_the_bargaining_condition():
    m = grads(3, seed=6)
    g = (m @ m.T).double()
    alpha = build("nash_mtl").weights(g.float(), TASKS[:3]).double()
    assert torch.allclose(g @ alpha, 1 / alpha, rtol=1e-4)


def test_aligned_mtl_aligns_to_equal_norm_orthogonal_gradients():
    m = grads(3, seed=7)
    g = (m @ m.T).double().numpy()
    values, vectors = np.linalg.eigh(g)
    balance = np.sqrt(values.min()) * (vectors / np.sqrt(values)) @ vectors.T
    aligned = torch.from_numpy(balance).float() @ m  # [T, P]
    aligned_gram = aligned @ aligned.T
    assert torch.allclose(aligned_gram, aligned_gram[0, 0] * torch.eye(3), atol=1e-3)
    assert torch.allclose(build("aligned_mtl").aggregate(m, TASKS[:3]), aligned.sum(0), atol=1e-4)


def test_graddrop_keeps_agreeing_signs():
    m = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 0.25]])  # every element agrees in sign
    assert torch.allclose(build("graddrop").aggregate(m, TASKS[:2]), m.sum(0))


# --- loss weightings ------------------------------------------------------------------------------


def weighting(name):
    return LOSS_WEIGHTINGS.build(name, injected={"task_names": TASKS[:3], "loss_weights": {"a": 2.0}, "seed": 1})


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS.names())
def test_weighting_terms_are_finite_and_positive_in_each_loss(name):
    method = weighting(name)
    for step in range(3):
        losses = torch.tensor([0.5, 1.5, 3.0], requires_grad=True)
        terms = method.combine(losses, TASKS[:3], step)
        assert terms.shape == (3,) and torch.isfinite(terms).all()
        (grad,) = torch.autograd.grad(terms.sum(), losses)
        assert (grad > 0).all()


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS.names())
def test_weighting_learnable_parameters_receive_gradients(name):
    method = weighting(name)
    learnable = [p for p in method.parameters() if p.requires_grad] if isinstance(method, torch.nn.Module) else []
    if not learnable:
        return
    method.combine(torch.tensor([0.5, 1.5, 3.0]), TASKS[:3], 0).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learnable)


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS.names())
def test_weighting_permutation_equivariance(name):
    first, second = weighting(name), weighting(name)
    perm = [2, 0, 1]
    rng = torch.Generator().manual_seed(4)
    for step in range(5):
        losses = torch.rand(3, generator=rng) + 0.1
        terms = first.combine(losses, TASKS[:3], step)
        permuted = second.combine(losses[perm], [TASKS[i] for i in perm], step)
        assert torch.allclose(terms[perm], permuted, atol=1e-6), (terms, permuted)
        for method, order in ((first, [0, 1, 2]), (second, perm)):
            if hasattr(method, "observe_gradient_norms"):
                method.observe_gradient_norms(losses[order] * 2, losses[order], [TASKS[i] for i in order], step)


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS.names())
def test_weighting_resume_equality(name):
    method = weighting(name)
    rng = torch.Generator().manual_seed(0)
    sequence = [torch.rand(3, generator=rng) + 0.1 for _ in range(12)]
    for step, losses in enumerate(sequence[:6]):
        method.combine(losses, TASKS[:3], step)
        if hasattr(method, "observe_gradient_norms"):
            method.observe_gradient_norms(losses * 2, losses, TASKS[:3], step)
    restored = weighting(name)
    restored.load_state_dict(copy.deepcopy(method.state_dict()))
    for step, losses in enumerate(sequence[6:], start=6):
        assert torch.allclose(method.combine(losses, TASKS[:3], step), restored.combine(losses, TASKS[:3], step))


def test_uncertainty_downweights_a_noisy_task():
    method = weighting("uncertainty")
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    for step in range(300):
        optimizer.zero_grad()
        method.combine(torch.tensor([0.1, 1.0, 10.0]), TASKS[:3], step).sum().backward()
        optimizer.step()
    weights = method.weights()
    assert weights["a"] > weights["b"] > weights["c"]  # optimum: exp(-s_i) = 1 / L_i
    assert weights["c"] == pytest.approx(0.5 / 10.0, rel=0.05)


def test_dwa_gives_weight_to_the_task_whose_loss_stalls():
    method = LOSS_WEIGHTINGS.build("dwa", injected={"task_names": TASKS[:2], "loss_weights": None, "seed": 0}, period=2)
    for step in range(8):
        method.combine(torch.tensor([1.0 / (step + 1), 1.0]), TASKS[:2], step)  # a falls, b stalls
    assert method.weights()["b"] > method.weights()["a"]
    assert sum(method.weights().values()) == pytest.approx(2.0)


def test_geometric_and_log_are_scale_invariant():
    for name in ("geometric", "log"):
        a = torch.tensor([0.5, 2.0], requires_grad=True)
        b = torch.tensor([0.5, 2.0], requires_grad=True)
        method = LOSS_WEIGHTINGS.build(name, injected={"task_names": TASKS[:2], "loss_weights": None, "seed": 0})
        (ga,) = torch.autograd.grad(method.combine(a, TASKS[:2], 0).sum(), a)
        (gb,) = torch.autograd.grad(method.combine(b * torch.tensor([1.0, 100.0]), TASKS[:2], 0).sum(), b)
        # scaling task b's loss by 100 leaves the direction of the update on the (unscaled) losses unchanged
        assert torch.allclose(ga / ga.norm(), gb / gb.norm(), atol=1e-5), name


# --- the one writer of .grad --------------------------------------------------------------------------


class TwoHeadModel(torch.nn.Module):
    """A tiny embedding + linear 'backbone' and two regression heads, fed real `Batch`es like MultiTaskModel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = torch.nn.Sequential(torch.nn.Embedding(12, 4), torch.nn.Linear(4, 3))
        self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 1), "b": torch.nn.Linear(3, 1)})

    def encode(self, batch):
        return self.backbone(batch.inputs["input_ids"])  # [B, L, 3]

    def head_losses(self, hidden, batch):
        mask = batch.inputs["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return {
            name: (self.heads[name](pooled[part.rows]).squeeze(-1) - part.labels).pow(2).mean()
            for name, part in batch.tasks.items()
        }

    def shared_parameters(self):
        return self.backbone.parameters()


BATCH = collate(
    {
        "a": [Encoded([1, 2, 3], None, 0.5), Encoded([4, 5], None, -1.0), Encoded([6], None, 2.0)],
        "b": [Encoded([7, 8, 9, 10, 11], None, 1.0), Encoded([2, 2], None, 0.0), Encoded([3], None, -0.5)],
    },
    pad_id=0,
)


def gradients_after(balancer):
    model = TwoHeadModel()
    balanced_backward(model, BATCH, balancer, step=0)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("source", ["representation", "parameters"])
def test_sum_aggregation_reproduces_the_plain_backward(source):
    plain = gradients_after(Balancer(weighting("equal")))
    for dtype in (torch.float32, torch.bfloat16) if source == "parameters" else (torch.float32,):
        summed = gradients_after(Balancer(weighting("equal"), build("sum"), source, dtype))
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        for name in plain:
            assert torch.allclose(plain[name], summed[name], atol=tolerance, rtol=tolerance), (source, dtype, name)


@pytest.mark.parametrize("source", ["representation", "parameters"])
def test_gradient_methods_write_shared_and_head_gradients(source):
    grads_by_name = gradients_after(Balancer(weighting("uncertainty"), build("mgda"), source))
    expected = {"backbone.0.weight", "backbone.1.weight", "backbone.1.bias"}
    assert set(grads_by_name) == expected | {f"heads.{t}.{p}" for t in "ab" for p in ("weight", "bias")}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads_by_name.values())


def test_parameter_buffer_is_allocated_once():
    balancer = Balancer(weighting("equal"), build("pcgrad"), "parameters")
    model = TwoHeadModel()
    balanced_backward(model, BATCH, balancer, step=0)
    first = balancer._buffer
    balanced_backward(model, BATCH, balancer, step=1)
    assert balancer._buffer is first and first.shape == (2, 12 * 4 + 4 * 3 + 3)


@pytest.mark.parametrize("name", ["gradnorm", "uncertainty"])
def test_parameter_source_matches_the_plain_backward_for_any_weighting(name):
    plain = gradients_after(Balancer(weighting(name)))
    summed = gradients_after(Balancer(weighting(name), build("sum"), "parameters"))
    for key in plain:
        assert torch.allclose(plain[key], summed[key], atol=1e-5), key
