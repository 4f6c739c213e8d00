"""Merge methods against merges computed by hand on known task vectors, and the registry's contract."""

from __future__ import annotations

import pytest
import torch

from multitune.models.merging import MERGE_METHODS, merge_weights

T1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
T2 = torch.tensor([1.0, 2.0, -0.25, -4.0])
VECTORS = torch.stack([T1, T2])


def test_average_is_the_mean_of_the_fine_tuned_weights():
    assert MERGE_METHODS.build("average")(VECTORS).tolist() == [2.0, 0.5, 0.125, -1.0]


def test_task_arithmetic_scales_the_sum():
    assert MERGE_METHODS.build("task_arithmetic", scaling=0.5)(VECTORS).tolist() == [2.0, 0.5, 0.125, -1.0]
    assert MERGE_METHODS.build("task_arithmetic", scaling=1.0)(VECTORS).tolist() == [4.0, 1.0, 0.25, -2.0]


def test_ties_trims_elects_the_sign_and_takes_the_disjoint_mean():
    """density 0.5 keeps each vector's two largest magnitudes: τ1 -> [3, 0, 0, 2], τ2 -> [0, 2, 0, -4]. Elected
    signs (sign of the trimmed sum): +, +, (none), − (2 − 4 < 0). Disjoint mean of the agreeing non-zero
    entries: [3, 2, 0, −4]; λ = 0.5 halves it."""
    assert MERGE_METHODS.build("ties", density=0.5, scaling=1.0)(VECTORS).tolist() == [3.0, 2.0, 0.0, -4.0]
    assert MERGE_METHODS.build("ties", density=0.5, scaling=0.5)(VECTORS).tolist() == [1.5, 1.0, 0.0, -2.0]
    agreeing = torch.stack([torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])])
    assert MERGE_METHODS.build("ties", density=1.0)(agreeing).tolist() == [2.0, 3.0]  # all kept: the mean


def test_dare_drops_at_one_minus_density_and_rescales_the_rest():
    assert MERGE_METHODS.build("dare", density=1.0, scaling=1.0)(VECTORS).tolist() == [4.0, 1.0, 0.25, -2.0]
    vector = torch.linspace(0.5, 1.5, 20_000)[None]
    merged = MERGE_METHODS.build("dare", density=0.25, scaling=1.0, seed=3)(vector)
    kept = merged != 0
    assert torch.allclose(merged[kept], 4 * vector[0][kept])  # survivors rescaled by 1/density
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    again = MERGE_METHODS.build("dare", density=0.25, scaling=1.0, seed=3)(vector)
    assert torch.equal(merged, again)  # seeded


def test_dare_ties_without_drops_is_ties_without_trimming():
    assert (
        MERGE_METHODS.build("dare_ties", density=1.0)(VECTORS).tolist()
        == MERGE_METHODS.build("ties", density=1.0)(VECTORS).tolist()
    )


def test_tsv_keeps_tasks_with_orthogonal_singular_vectors_exactly():
    """Two tasks of rank 2 on disjoint rows and columns of a 4 x 4 matrix: each keeps ⌊4 / 2⌋ = 2 singular
    triplets, all four left (and right) vectors are already orthonormal, so the merge is the plain sum."""
    first = torch.zeros(4, 4)
    first[0, 1], first[1, 3] = 3.0, 1.0
    second = torch.zeros(4, 4)
    second[2, 0], second[3, 2] = 2.0, -0.5
    expected = [[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, -0.5, 0.0]]
    merged = MERGE_METHODS.build("tsv")(torch.stack([first, second]))
    assert torch.allclose(merged, torch.tensor(expected), atol=1e-6)
    halved = MERGE_METHODS.build("tsv", scaling=0.5)(torch.stack([first, second]))
    assert torch.allclose(halved, 0.5 * torch.tensor(expected), atol=1e-6)


def test_tsv_turns_overlapping_task_directions_orthogonal():
    """τ1 = 2·a·e1ᵀ and τ2 = 1·c·e2ᵀ with a = (1, 0) and c at 60° from it (2 x 2, one triplet each). The
    orthonormal pair nearest to (a, c) is the pair at ±45° around their bisector (30°): a' at −15°, c' at
    75°; the merge is 2·a'·e1ᵀ + c'·e2ᵀ. The SVD's sign choices cancel (a flipped column flips back)."""
    import math

    a = torch.tensor([1.0, 0.0])
    c = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)])
    first = 2.0 * torch.outer(a, torch.tensor([1.0, 0.0]))
    second = torch.outer(c, torch.tensor([0.0, 1.0]))
    rad = math.radians
    expected = torch.tensor([[2 * math.cos(rad(-15)), math.cos(rad(75))], [2 * math.sin(rad(-15)), math.sin(rad(75))]])
    merged = MERGE_METHODS.build("tsv")(torch.stack([first, second]))
    assert torch.allclose(merged, expected, atol=1e-5)


def test_tsv_turns_overlapping_right_vectors_orthogonal_too():
    """The transposes of the tasks above: the overlap is now between the right singular vectors, and the
    merge is the transpose of that one."""
    import math

    c = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)])
    first = 2.0 * torch.outer(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    second = torch.outer(torch.tensor([0.0, 1.0]), c)
    rad = math.radians
    expected = torch.tensor([[2 * math.cos(rad(-15)), 2 * math.sin(rad(-15))], [math.cos(rad(75)), math.sin(rad(75))]])
    assert torch.allclose(MERGE_METHODS.build("tsv")(torch.stack([first, second])), expected, atol=1e-5)


def test_tsv_keeps_the_floor_of_min_over_t_triplets_per_task():
    """Three tasks on a 5 x 5 matrix keep ⌊5 / 3⌋ = 1 triplet each: 3·e1e1ᵀ, 2·e3e3ᵀ and 4·e5e5ᵀ; their second
    triplets (1, 0.5, 0.25) are dropped."""
    e = torch.eye(5)
    tasks = [
        3 * torch.outer(e[0], e[0]) + torch.outer(e[1], e[1]),
        2 * torch.outer(e[2], e[2]) + 0.5 * torch.outer(e[3], e[3]),
        4 * torch.outer(e[4], e[4]) + 0.25 * torch.outer(e[1], e[3]),
    ]
    merged = MERGE_METHODS.build("tsv")(torch.stack(tasks))
    assert torch.allclose(merged, torch.diag(torch.tensor([3.0, 0.0, 2.0, 0.0, 4.0])), atol=1e-6)


def test_tsv_leaves_out_zero_singular_values_so_low_rank_tasks_add_exactly():
    """Two orthogonal rank-1 tasks on a 4 x 4 matrix keep k = 2 triplets each, one of them zero: left in, its
    arbitrary vectors would turn the others; left out, the merge is the exact sum. A zero task adds nothing."""
    e = torch.eye(4)
    first, second = 2 * torch.outer(e[0], e[1]), -3 * torch.outer(e[2], e[3])
    merged = MERGE_METHODS.build("tsv")(torch.stack([first, second]))
    assert torch.allclose(merged, first + second, atol=1e-6)
    alone = MERGE_METHODS.build("tsv")(torch.stack([first, torch.zeros(4, 4)]))
    assert torch.allclose(alone, first, atol=1e-6)
    assert torch.equal(MERGE_METHODS.build("tsv")(torch.zeros(2, 4, 4)), torch.zeros(4, 4))


def test_svd_merges_average_what_is_not_a_matrix_that_holds_t_directions():
    """Biases, a ViT class token [1, 1, d], a convolution kernel and a [2, d] matrix merged from three tasks
    (min(out, in) = 2 < T): λ · the mean task vector, as the methods' authors treat them."""
    for name in ("tsv", "iso_c"):
        method = MERGE_METHODS.build(name, scaling=2.0)
        assert torch.allclose(method(VECTORS), 2.0 * torch.tensor([2.0, 0.5, 0.125, -1.0]))
        for shape in ((3, 1, 1, 6), (3, 4, 2, 3, 3), (3, 2, 6)):
            tensors = torch.randn(shape)
            assert torch.allclose(method(tensors), 2.0 * tensors.mean(0), atol=1e-6), (name, shape)


def test_iso_c_flattens_the_summed_spectrum_to_its_mean():
    """τ1 + τ2 = diag(3, −1): singular values 3 and 1 (mean 2), U·Vᵀ = diag(1, −1), so the merge is
    diag(2, −2); rotated by R the sum is R·diag(3, 1) and the merge 2·R. A rank-1 sum 3·e1e2ᵀ keeps its one
    direction at strength 3 (the zero singular values are no directions)."""
    first, second = torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, -1.0]])
    merged = MERGE_METHODS.build("iso_c")(torch.stack([first, second]))
    assert torch.allclose(merged, torch.tensor([[2.0, 0.0], [0.0, -2.0]]), atol=1e-6)
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    pair = torch.stack([rotation @ torch.diag(torch.tensor(d)) for d in ([3.0, 0.0], [0.0, 1.0])])
    assert torch.allclose(MERGE_METHODS.build("iso_c", scaling=0.5)(pair), rotation, atol=1e-6)
    e = torch.eye(4)
    rank_one = torch.stack([2 * torch.outer(e[0], e[1]), torch.outer(e[0], e[1])])
    assert torch.allclose(MERGE_METHODS.build("iso_c")(rank_one), 3 * torch.outer(e[0], e[1]), atol=1e-6)


PER_TENSOR = [
    name
    for name in MERGE_METHODS.names()
    if not getattr(MERGE_METHODS.get(name), "learns", False)
    and not getattr(MERGE_METHODS.get(name), "needs_inputs", False)
]


@pytest.mark.parametrize("name", PER_TENSOR)
def test_every_method_returns_one_tensor_of_the_shape_and_merges_identical_vectors_to_themselves(name):
    vector = torch.randn(3, 5)
    same = torch.stack([vector, vector])
    method = MERGE_METHODS.build(name)
    merged = method(same)
    assert merged.shape == vector.shape and torch.isfinite(merged).all()
    scale = getattr(method, "scaling", None)
    if name in ("average", "ties"):  # a vector agreeing with itself: the mean (TIES: of the kept entries)
        kept = merged != 0
        assert torch.allclose(merged[kept], (scale or 1.0) * vector[kept])


@pytest.mark.parametrize("settings", [{"scaling": 0.0}, {"density": 0.0}, {"density": 1.5}])
def test_bad_settings_are_refused(settings):
    from multitune.errors import ConfigError

    with pytest.raises(ConfigError, match="must be"):
        MERGE_METHODS.build("ties", **settings)


def test_merge_weights_adds_the_merged_task_vector_to_the_pretrained_weights():
    base = {"w": torch.zeros(4), "position_ids": torch.arange(4)}
    tuned = [{"w": T1, "position_ids": torch.arange(4)}, {"w": T2, "position_ids": torch.arange(4)}]
    merged = merge_weights(base, tuned, MERGE_METHODS.build("average"))
    assert merged["w"].tolist() == [2.0, 0.5, 0.125, -1.0] and torch.equal(merged["position_ids"], torch.arange(4))
    with pytest.raises(ValueError, match="not a copy of the same backbone"):
        merge_weights(base, [{"w": torch.zeros(5), "position_ids": torch.arange(4)}], MERGE_METHODS.build("average"))


def test_task_vector_cosines_overall_and_per_layer_by_hand():
    """τ_1 = ([1, 0], [1]) and τ_2 = ([0, 1], [1]) in layers encoder.layer.0 and encoder.layer.1: layer 0 is
    orthogonal (0), layer 1 parallel (1), and overall (1·0 + 0·1 + 1·1) / (√2·√2) = 0.5."""
    from multitune.models.merging import task_vector_cosines

    base = {"encoder.layer.0.w": torch.zeros(2), "encoder.layer.1.b": torch.zeros(1), "ids": torch.arange(2)}
    tuned = [
        {
            "encoder.layer.0.w": torch.tensor([1.0, 0.0]),
            "encoder.layer.1.b": torch.tensor([1.0]),
            "ids": torch.arange(2),
        },
        {
            "encoder.layer.0.w": torch.tensor([0.0, 1.0]),
            "encoder.layer.1.b": torch.tensor([1.0]),
            "ids": torch.arange(2),
        },
    ]
    overall, per_layer = task_vector_cosines(base, tuned)
    assert overall == [[1.0, 0.5], [0.5, 1.0]]
    assert per_layer == {"encoder.layer.0": [[1.0, 0.0], [0.0, 1.0]], "encoder.layer.1": [[1.0, 1.0], [1.0, 1.0]]}


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare", "dare_ties", "tsv", "iso_c"])
def test_running_statistics_are_the_fine_tuned_models_mean_never_a_merged_task_vector(name):
    """BatchNorm's running variance of 1.0 tuned to 0.2 and 0.4: a scaled or trimmed difference would give
    1 + λ·(−0.8 − 0.6) < 0 for λ = 1; the mean, 0.3, is what the merged model keeps."""
    from multitune.models.merging import task_vector_cosines

    base = {"w": torch.zeros(2), "bn.running_var": torch.ones(2), "bn.num_batches_tracked": torch.tensor(5)}
    tuned = [
        {"w": torch.tensor(w), "bn.running_var": torch.tensor([v, v]), "bn.num_batches_tracked": torch.tensor(n)}
        for w, v, n in (([1.0, 0.0], 0.2, 9), ([0.0, 1.0], 0.4, 7))
    ]
    statistics = {"bn.running_var", "bn.num_batches_tracked"}
    settings = {"density": 1.0} if name in ("ties", "dare", "dare_ties") else {}
    merged = merge_weights(base, tuned, MERGE_METHODS.build(name, scaling=1.0, **settings), statistics)
    assert torch.allclose(merged["bn.running_var"], torch.tensor([0.3, 0.3]))
    assert int(merged["bn.num_batches_tracked"]) == 5
    overall, _ = task_vector_cosines(base, tuned, statistics)
    assert overall[0][1] == 0.0  # the weights' vectors alone: orthogonal (the statistics' differences would add)


# --- RegMean: each linear layer merged from the inputs it saw in each model ---------------------------------


def _regmean(alpha, base, tuned, inputs):
    """RegMean's merge of the models in `tuned` (state dicts) from their layers' inputs, one model at a time."""
    from multitune.models.merging import add_layer_inputs

    sums = {}
    for seen, state in zip(inputs, tuned, strict=True):
        add_layer_inputs(sums, seen, state)
    return MERGE_METHODS.build("regmean", alpha=alpha).merge(base, tuned, sums)


def _gram_of(layer, x, mask=None):
    """One model's LayerInputs for `layer`, collected by InputGrams from a forward over `x`."""
    from multitune.models.merging import InputGrams

    with InputGrams(layer) as grams:
        grams.mask = mask
        layer(x)
    return grams.layers


def _weighted_lstsq(blocks):
    """numpy's least squares over stacked (inputs, targets) blocks, each block's rows weighted by 1/its row
    count (every model weighs alike): [in + 1, out], Wᵀ over the bias."""
    import numpy as np

    design = np.concatenate([np.c_[x, np.ones(len(x))] / np.sqrt(len(x)) for x, _ in blocks])
    targets = np.concatenate([y / np.sqrt(len(y)) for _, y in blocks])
    return np.linalg.lstsq(design.astype(np.float64), targets.astype(np.float64), rcond=None)[0]


def test_regmean_with_alpha_one_is_the_least_squares_merge_of_the_layers_outputs():
    """α = 1: the merged (W, b) minimises Σ_t ||X_t Wᵀ + b − (X_t W_tᵀ + b_t)||² / N_t, computed here by
    numpy's lstsq on the stacked inputs [X_1 1; X_2 1], each block scaled by 1/√N_t, and the two models' own
    outputs. Seven rows against five, at different scales: the row weighting matters."""
    import numpy as np

    torch.manual_seed(0)
    base = torch.nn.Linear(3, 2)
    first, second = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    x1, x2 = torch.randn(7, 3), torch.randn(5, 3) * 2 + 1
    inputs = [_gram_of(first, x1), _gram_of(second, x2)]
    merged = _regmean(1.0, base.state_dict(), [first.state_dict(), second.state_dict()], inputs)
    solution = _weighted_lstsq(
        [(x1.numpy(), first(x1).detach().numpy()), (x2.numpy(), second(x2).detach().numpy())]
    )  # [4, 2]: Wᵀ over b
    assert np.allclose(merged["weight"].numpy(), solution[:3].T, atol=1e-5)
    assert np.allclose(merged["bias"].numpy(), solution[3], atol=1e-5)
    unweighted = np.linalg.lstsq(
        np.r_[np.c_[x1.numpy(), np.ones(7)], np.c_[x2.numpy(), np.ones(5)]],
        np.r_[first(x1).detach().numpy(), second(x2).detach().numpy()],
        rcond=None,
    )[0]
    assert not np.allclose(unweighted[:3].T, solution[:3].T, atol=1e-3)  # the weighting is seen


def test_regmean_scales_the_off_diagonal_grams_by_alpha():
    """α = 0.5 on a layer with a bias: Θ = (Σ G̃_t)⁻¹ Σ G̃_t Θ_t with G_t = X̃_tᵀX̃_t / N_t (X̃ the inputs
    with a column of ones) and G̃ = 0.5 G + 0.5 diag(G), worked out with numpy from the inputs; a tensor
    outside any linear layer (a norm's weight) is the average."""
    import numpy as np

    torch.manual_seed(1)
    layers = [torch.nn.Linear(2, 2) for _ in range(3)]
    x1, x2 = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]]), torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    inputs = [_gram_of(layers[1], x1), _gram_of(layers[2], x2)]
    states = [{**layer.state_dict(), "norm": torch.tensor([float(i)])} for i, layer in enumerate(layers)]
    merged = _regmean(0.5, states[0], states[1:], inputs)
    grams, thetas = [], []
    for x, layer in ((x1, layers[1]), (x2, layers[2])):
        tilde = np.c_[x.numpy(), np.ones(len(x))].astype(np.float64)
        g = tilde.T @ tilde / len(x)
        grams.append(0.5 * g + 0.5 * np.diag(np.diag(g)))
        thetas.append(np.r_[layer.weight.detach().numpy().T, layer.bias.detach().numpy()[None]])
    want = np.linalg.solve(grams[0] + grams[1], grams[0] @ thetas[0] + grams[1] @ thetas[1])
    assert np.allclose(merged["weight"].numpy(), want[:2].T, atol=1e-5)
    assert np.allclose(merged["bias"].numpy(), want[2], atol=1e-5)
    assert merged["norm"].tolist() == [1.5]


def test_regmean_counts_only_the_real_tokens_and_reads_gpt2_conv1d_weights_transposed():
    """A [B, L, in] input with a [B, L] mask: the Gram is over the masked-in rows only. transformers' Conv1D
    stores its weight [in, out] (y = x W + b); its merge at α = 1 is numpy's weighted least squares, biases
    drawn at random."""
    import numpy as np
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    conv = Conv1D(5, 3)
    seen = _gram_of(conv, x, mask)
    real = torch.cat([x[mask.bool()], torch.ones(5, 1)], dim=1).double()
    assert seen[""].rows == 5 and seen[""].transposed and torch.allclose(seen[""].gram, real.T @ real)
    other = Conv1D(5, 3)
    for layer in (conv, other):
        torch.nn.init.normal_(layer.bias)
    x1, x2 = torch.randn(9, 3), torch.randn(6, 3) - 1
    merged = _regmean(
        1.0, conv.state_dict(), [conv.state_dict(), other.state_dict()], [_gram_of(conv, x1), _gram_of(other, x2)]
    )
    solution = _weighted_lstsq([(x1.numpy(), conv(x1).detach().numpy()), (x2.numpy(), other(x2).detach().numpy())])
    assert np.allclose(merged["weight"].numpy(), solution[:3], atol=1e-5)  # [in, out], as Conv1D stores it
    assert np.allclose(merged["bias"].numpy(), solution[3], atol=1e-5)


@pytest.mark.parametrize("settings", [{"alpha": 0.0}, {"alpha": 1.5}, {"rows": 0}])
def test_regmean_bad_settings_are_refused(settings):
    from multitune.errors import ConfigError

    with pytest.raises(ConfigError, match="must be"):
        MERGE_METHODS.build("regmean", **settings)


def test_regmean_refuses_models_whose_forwards_went_through_other_layers():
    from multitune.models.merging import add_layer_inputs

    one, two = torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2))
    sums = add_layer_inputs({}, _gram_of(one, torch.randn(3, 2)), one.state_dict())
    with pytest.raises(ValueError, match="different linear layers"):
        add_layer_inputs(sums, _gram_of(two, torch.randn(3, 2)), two.state_dict())
    with pytest.raises(ValueError, match="the inputs of 1 models, not 2"):
        MERGE_METHODS.build("regmean").merge(one.state_dict(), [one.state_dict(), one.state_dict()], sums)


# --- RegMean++: the blocks merged in order, each from what the merged blocks before it give ---------------


class _Chain(torch.nn.Module):
    """x · scale, two residual blocks (Linear 2→3, tanh, Linear 3→2), then a linear layer outside the blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.rand(2) + 0.5)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)) for _ in range(2)
        )
        self.pool = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale
        for block in self.layers:
            x = x + block(x)
        return self.pool(x)


def _np_chain_regmean_plusplus(states, inputs):
    """RegMean++ at α = 1, written out in numpy from the paper: the scale is the models' mean; block 0's first
    linear layer is the weighted least-squares fit of each model's outputs on the merged scale's outputs, and its
    second on what model t's own first layer and tanh make of them (model t's block, the merged inputs); block 1
    the same on block 0 merged; `pool` on both blocks merged. Returns {name: (W, b)} and the mean scale."""
    import numpy as np

    def lin(state, name):
        return state[f"{name}.weight"].double().numpy(), state[f"{name}.bias"].double().numpy()

    def fit(pairs):  # [(inputs, targets)] per model -> the weighted least-squares (W, b)
        design = np.concatenate([np.c_[x, np.ones(len(x))] / np.sqrt(len(x)) for x, _ in pairs])
        targets = np.concatenate([y / np.sqrt(len(y)) for _, y in pairs])
        theta = np.linalg.lstsq(design, targets, rcond=None)[0]
        return theta[:-1].T, theta[-1]

    scale = np.mean([s["scale"].double().numpy() for s in states], axis=0)
    current = [x.double().numpy() * scale for x in inputs]  # each model's rows as the merged model has them
    merged = {}
    for block in ("layers.0", "layers.1"):
        first_pairs, second_pairs = [], []
        for state, x in zip(states, current, strict=True):
            (a, a0), (b, b0) = lin(state, f"{block}.0"), lin(state, f"{block}.2")
            hidden = np.tanh(x @ a.T + a0)  # model t's own first layer: the block's intra-layer dependency
            first_pairs.append((x, x @ a.T + a0))
            second_pairs.append((hidden, hidden @ b.T + b0))
        merged[f"{block}.0"], merged[f"{block}.2"] = fit(first_pairs), fit(second_pairs)
        (a, a0), (b, b0) = merged[f"{block}.0"], merged[f"{block}.2"]
        current = [x + np.tanh(x @ a.T + a0) @ b.T + b0 for x in current]  # the merged block's outputs
    pools = [lin(state, "pool") for state in states]
    merged["pool"] = fit([(x, x @ w.T + w0) for x, (w, w0) in zip(current, pools, strict=True)])
    return merged, scale


def test_regmean_plusplus_merges_each_block_from_the_merged_blocks_outputs():
    """Two models of a two-block chain, 7 and 5 input rows: every linear layer of the RegMean++ merge equals
    numpy's least squares on the inputs the paper prescribes (above), the scale outside any linear layer is the
    mean; plain RegMean (each model's own inputs throughout) gives another block 1, so the order is seen."""
    import numpy as np

    torch.manual_seed(3)
    base, models = _Chain(), [_Chain(), _Chain()]
    inputs = [torch.randn(7, 2), torch.randn(5, 2) * 1.5 + 0.5]
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    work = _Chain()

    calls = []

    def forward(index, grams):
        calls.append(0)
        grams.run(lambda: calls.__setitem__(-1, work(inputs[index])))  # set only when the forward ran to its end

    method = MERGE_METHODS.build("regmean_plusplus", alpha=1.0)
    merged = method.merge_in_order(work, base.state_dict(), states, forward)
    want, scale = _np_chain_regmean_plusplus(states, inputs)
    for name, (weight, bias) in want.items():  # float32 forwards against float64: 1e-4
        assert np.allclose(merged[f"{name}.weight"].double().numpy(), weight, atol=1e-4), name
        assert np.allclose(merged[f"{name}.bias"].double().numpy(), bias, atol=1e-4), name
    assert np.allclose(merged["scale"].double().numpy(), scale, atol=1e-6)
    assert [isinstance(c, torch.Tensor) for c in calls] == [False] * 4 + [True] * 2  # each block's forwards end there
    plain = _regmean(1.0, base.state_dict(), states, [_gram_of(m, x) for m, x in zip(models, inputs, strict=True)])
    assert not np.allclose(plain["layers.1.2.weight"].numpy(), merged["layers.1.2.weight"].numpy(), atol=1e-3)


def test_regmean_plusplus_needs_blocks():
    from multitune.models.merging import layer_blocks

    assert layer_blocks(_Chain()) == ["layers.0", "layers.1"]
    two = torch.nn.Module()  # an encoder's and a decoder's blocks, the first holding an expert list of its own
    two.encoder = torch.nn.ModuleList([torch.nn.Module()])
    two.encoder[0].experts = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    two.decoder = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(2)])
    assert layer_blocks(two) == ["encoder.0", "decoder.0", "decoder.1"]
    flat = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no list of like blocks"):
        MERGE_METHODS.build("regmean_plusplus").merge_in_order(flat, flat.state_dict(), [flat.state_dict()], print)
