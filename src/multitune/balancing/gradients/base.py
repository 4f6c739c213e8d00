"""The GradientAggregator protocol, its registry, and the small solvers the methods share.

An aggregator is a pure function of the task-gradient matrix M [T, P]: it returns one update [P] and
never touches a model. Most methods only need the Gramian G = M Mᵀ [T, T]: they give per-task weights
α [T] and the update is αᵀM. Those expose `weights(G)`, which lets the caller build G in chunks (or from
a bf16 buffer) and never hold a second [T, P] copy. The T x T problems are solved in float64 on the CPU:
they are tiny, and moving a T x T matrix costs nothing next to moving the gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from multitune.registry import Registry

SOURCES = ("representation", "parameters")


@runtime_checkable
class GradientAggregator(Protocol):
    """Per-task gradients [T, P] -> one update [P]; `sources` says which gradient sources it is defined for."""

    sources: tuple[str, ...]

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor: ...


@runtime_checkable
class GramianAggregator(GradientAggregator, Protocol):
    """An aggregator whose update is αᵀM with α [T] a function of the Gramian [T, T] only."""

    def weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor: ...


GRADIENT_AGGREGATORS: Registry[GradientAggregator] = Registry("gradient aggregator")
AGGREGATOR_INJECTED = ("task_names", "seed")


def gramian(grads: Tensor, chunk: int = 1 << 22) -> Tensor:
    """G = M Mᵀ in float32, accumulated over column chunks so a bf16 M is never copied whole."""
    t, p = grads.shape
    out = torch.zeros(t, t, dtype=torch.float32, device=grads.device)
    for start in range(0, p, chunk):
        block = grads[:, start : start + chunk].float()
        out += block @ block.T
    return out


def combine_rows(alpha: Tensor, grads: Tensor) -> Tensor:
    """αᵀM [P], in the precision of the update (float32 at least)."""
    dtype = torch.promote_types(grads.dtype, torch.float32)
    return alpha.to(grads.device, dtype) @ grads.to(dtype)


def via_gramian(method: GramianAggregator, grads: Tensor, tasks: Sequence[str]) -> Tensor:
    return combine_rows(method.weights(gramian(grads), tasks), grads)


def to_numpy(gramian_matrix: Tensor) -> np.ndarray:
    g = gramian_matrix.detach().double().cpu().numpy()
    return (g + g.T) / 2


def to_tensor(weights: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float64)).float()


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {x >= 0, Σx = 1} (sort-based, Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1
    k = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - cumulative / k > 0)[0][-1]
    return np.maximum(v - cumulative[rho] / (rho + 1), 0)


def accelerated_projected_gradient(
    gradient: Callable[[np.ndarray], np.ndarray],
    project: Callable[[np.ndarray], np.ndarray],
    start: np.ndarray,
    step: float,
    iterations: int,
    tolerance: float,
) -> np.ndarray:
    """FISTA: minimise a smooth convex function over a convex set, given its gradient and the projection."""
    x = start
    y, momentum = x.copy(), 1.0
    for _ in range(iterations):
        new = project(y - step * gradient(y))
        next_momentum = (1 + np.sqrt(1 + 4 * momentum**2)) / 2
        y = new + (momentum - 1) / next_momentum * (new - x)
        if np.abs(new - x).max() < tolerance:
            return new
        x, momentum = new, next_momentum
    return x


def _scaled(g: np.ndarray) -> tuple[np.ndarray, float] | None:
    """G divided by its mean eigenvalue (the solutions are scale-free), and the step 1/λ_max; None if G = 0."""
    scale = np.trace(g) / g.shape[0]
    if scale <= 0:
        return None
    g = g / scale
    return g, 1.0 / max(np.linalg.eigvalsh(g)[-1], 1e-12)


def min_norm_on_simplex(g: np.ndarray, iterations: int = 1000, tolerance: float = 1e-12) -> np.ndarray:
    """argmin over the simplex of αᵀGα."""
    t = g.shape[0]
    scaled = _scaled(g)
    if scaled is None:
        return np.full(t, 1.0 / t)
    g, step = scaled
    return accelerated_projected_gradient(
        lambda a: g @ a, project_simplex, np.full(t, 1.0 / t), step, iterations, tolerance
    )


def nonnegative_quadratic(g: np.ndarray, w: np.ndarray, iterations: int = 2000, tolerance: float = 1e-12) -> np.ndarray:
    """For each column w_k of W [T, K]: argmin over λ >= 0 of ½(w_k+λ)ᵀG(w_k+λ)."""
    scaled = _scaled(g)
    if scaled is None:
        return np.zeros_like(w)
    g, step = scaled
    return accelerated_projected_gradient(
        lambda lam: g @ (w + lam), lambda x: np.maximum(x, 0), np.zeros_like(w), step, iterations, tolerance
    )
