"""IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
ICLR 2021), the gradient part.

Find weights α (Σα = 1) whose update d = Σα_i g_i has equal projections on every task's unit gradient
u_i: dᵀ(u_1 − u_i) = 0. Closed form α_{2:T} = g_1Uᵀ(DUᵀ)⁻¹ with D_i = g_1 − g_i, U_i = u_1 − u_i, all
inner products read off the Gramian.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from multitune.balancing.gradients.base import GRADIENT_AGGREGATORS, SOURCES, to_numpy, to_tensor, via_gramian


@GRADIENT_AGGREGATORS.register("imtl_g")
class IMTLG:
    """Weights that give the update equal projections on every task's unit gradient (Liu et al. 2021, IMTL)."""

    sources: tuple[str, ...] = SOURCES
    paper = "Liu et al. 2021 (IMTL)"
    cost = "Gramian [T, T] + a T x T solve"

    def weights(self, gramian: Tensor, tasks: Sequence[str]) -> Tensor:
        g = to_numpy(gramian)
        t = g.shape[0]
        if t == 1:
            return to_tensor(np.ones(1))
        norms = np.sqrt(np.maximum(np.diag(g), 1e-30))
        dot_unit = g / norms[None, :]  # [a, b] = g_a · u_b
        rhs = dot_unit[0, 0] - dot_unit[0, 1:]  # g_1 · (u_1 − u_k)
        # (g_1 − g_j) · (u_1 − u_k)
        matrix = dot_unit[0, 0] - dot_unit[0, 1:][None, :] - dot_unit[1:, 0][:, None] + dot_unit[1:, 1:]
        rest = np.linalg.lstsq(matrix.T, rhs, rcond=None)[0]  # α_{2:T} solves α Mat = rhs
        alpha = np.concatenate([[1 - rest.sum()], rest])
        return to_tensor(alpha * t)  # × T: the sum convention of the other aggregators

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor:
        return via_gramian(self, grads, tasks)
