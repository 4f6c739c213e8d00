"""Model merging: one backbone from several fine-tuned copies of the same pretrained backbone, each task then
keeping its own head. A task vector is τ_t = θ_t − θ_0 (fine-tuned minus pretrained weights, per tensor);
a merge method combines the T task vectors of each tensor into one, and the merged weights are θ_0 + that.
The arithmetic of the sparsifying methods is peft's (peft.utils.merge_utils), the library's well-kept
implementation; each method here fixes how its paper scales and combines.

Methods (MERGE_METHODS), each called with a tensor's stacked task vectors [T, ...] -> merged vector [...]:
- `average`: (1/T)·Σ τ_t, i.e. the average of the fine-tuned weights (a uniform model soup, Wortsman et al.
  2022, "Model soups", ICML);
- `task_arithmetic`: λ·Σ τ_t (Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR);
- `ties`: λ · the disjoint mean of the task vectors trimmed to their `density` largest magnitudes, over the
  entries whose sign agrees with the elected (total-mass) sign (Yadav et al. 2023, "TIES-Merging", NeurIPS);
- `dare`: λ·Σ DARE(τ_t): each entry dropped with probability 1 − `density` and the rest rescaled by
  1/`density` (Yu et al. 2024, "Language Models are Super Mario", ICML), seeded;
- `dare_ties`: DARE's drop and rescale, then TIES' sign election and disjoint mean, times λ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from multitune.registry import Registry

MERGE_METHODS: Registry[object] = Registry("merge method")


def _checked(scaling: float, density: float | None = None) -> None:
    if not scaling > 0:
        raise ValueError(f"scaling must be positive, got {scaling}")
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")


@MERGE_METHODS.register("average")
class Average:
    """(1/T)·Σ τ_t: the fine-tuned weights averaged (Wortsman et al. 2022)."""

    paper = "Wortsman et al. 2022"

    def __call__(self, vectors: Tensor) -> Tensor:
        return vectors.mean(0)


@MERGE_METHODS.register("task_arithmetic")
class TaskArithmetic:
    """λ·Σ τ_t (Ilharco et al. 2023)."""

    paper = "Ilharco et al. 2023"

    def __init__(self, scaling: float = 0.3) -> None:
        _checked(scaling)
        self.scaling = scaling

    def __call__(self, vectors: Tensor) -> Tensor:
        from peft.utils.merge_utils import task_arithmetic

        return task_arithmetic(list(vectors), torch.full((len(vectors),), self.scaling, dtype=vectors.dtype))


@MERGE_METHODS.register("ties")
class Ties:
    """λ · disjoint mean of the trimmed task vectors agreeing with the elected sign (Yadav et al. 2023)."""

    paper = "Yadav et al. 2023"

    def __init__(self, density: float = 0.2, scaling: float = 1.0) -> None:
        _checked(scaling, density)
        self.density, self.scaling = density, scaling

    def __call__(self, vectors: Tensor) -> Tensor:
        from peft.utils.merge_utils import ties

        weights = torch.full((len(vectors),), self.scaling, dtype=vectors.dtype)
        return ties(list(vectors), weights, self.density, majority_sign_method="total")


class _Dare:
    def __init__(self, density: float = 0.5, scaling: float = 1.0, seed: int = 0) -> None:
        _checked(scaling, density)
        self.density, self.scaling, self.seed = density, scaling, seed
        self.calls = 0

    def _seeded(self) -> None:
        torch.manual_seed(self.seed * 1_000_003 + self.calls)  # each tensor its own draws, reproducibly
        self.calls += 1


@MERGE_METHODS.register("dare")
class Dare(_Dare):
    """λ·Σ of the task vectors with entries dropped at rate 1 − density and rescaled (Yu et al. 2024)."""

    paper = "Yu et al. 2024"

    def __call__(self, vectors: Tensor) -> Tensor:
        from peft.utils.merge_utils import dare_linear

        self._seeded()
        weights = torch.full((len(vectors),), self.scaling, dtype=vectors.dtype)
        return dare_linear(list(vectors), weights, self.density)


@MERGE_METHODS.register("dare_ties")
class DareTies(_Dare):
    """DARE's drop and rescale, then TIES' sign election and disjoint mean, times λ (Yu et al. 2024)."""

    paper = "Yu et al. 2024"

    def __call__(self, vectors: Tensor) -> Tensor:
        from peft.utils.merge_utils import dare_ties

        self._seeded()
        weights = torch.full((len(vectors),), self.scaling, dtype=vectors.dtype)
        return dare_ties(list(vectors), weights, self.density, majority_sign_method="total")


def merge_weights(
    base: Mapping[str, Tensor], tuned: Sequence[Mapping[str, Tensor]], method: object
) -> dict[str, Tensor]:
    """θ_0 + method([θ_t − θ_0 for each t]) for every floating-point tensor of `base` (others, such as integer
    position ids, are kept as they are). Raises ValueError when a fine-tuned model lacks a tensor or has
    another shape: then they are not copies of one backbone."""
    merged = {}
    for key, start in base.items():
        for index, state in enumerate(tuned):
            if key not in state or state[key].shape != start.shape:
                raise ValueError(f"model {index + 1} is not a copy of the same backbone: tensor '{key}' differs")
        if not start.is_floating_point():
            merged[key] = start.clone()
            continue
        vectors = torch.stack([state[key].float() - start.float() for state in tuned])  # [T, ...]
        merged[key] = (start.float() + method(vectors)).to(start.dtype)  # type: ignore[operator]
    return merged


def task_vector_cosines(
    base: Mapping[str, Tensor], tuned: Sequence[Mapping[str, Tensor]]
) -> tuple[list[list[float]], dict[str, list[list[float]]]]:
    """Cosine similarity between the task vectors τ_t = θ_t − θ_0: over all floating-point tensors together
    ([T, T]), and per layer ({layer: [T, T]}, a layer being a key's path up to its first number, e.g.
    `encoder.layer.3`; other tensors under "other"). Tasks whose vectors point the same way merge with
    little interference (Ilharco et al. 2023 report near-orthogonal task vectors across tasks)."""
    count = len(tuned)
    dots: dict[str, Tensor] = {}
    for key, start in base.items():
        if not start.is_floating_point():
            continue
        vectors = torch.stack([(state[key].float() - start.float()).flatten() for state in tuned])  # [T, P]
        parts = key.split(".")
        cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), 0)
        layer = ".".join(parts[:cut]) if cut else "other"
        gram = vectors.double() @ vectors.double().T  # [T, T]
        dots[layer] = dots.get(layer, torch.zeros(count, count, dtype=torch.float64)) + gram
    overall = sum(dots.values(), torch.zeros(count, count, dtype=torch.float64))

    def cosine(gram: Tensor) -> list[list[float]]:
        norms = gram.diagonal().clamp_min(1e-30).sqrt()
        return [[round(float(v), 6) for v in row] for row in gram / norms[:, None] / norms[None, :]]

    return cosine(overall), {layer: cosine(gram) for layer, gram in dots.items()}
