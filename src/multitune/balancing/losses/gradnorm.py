"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018).

Weights w_i move so that each task's weighted gradient norm G_i = w_i·‖∇L_i‖ approaches
Ḡ·r_i^α, with r_i the task's relative inverse training rate (L_i/L_i(0) over its mean). The gradient
norms are taken w.r.t. the shared representation, the cheap variant (one extra backward through the
heads only). After each update the weights are renormalised to average 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multitune.balancing.losses.base import LOSS_WEIGHTINGS, task_index


@LOSS_WEIGHTINGS.register("gradnorm")
class GradNormWeighting(nn.Module):
    """Weights that equalise task gradient norms, scaled by relative training rate^α (Chen et al. 2018)."""

    paper = "Chen et al. 2018"
    cost = "+T head-only backwards"
    task_weights: Tensor
    initial_losses: Tensor  # [T], NaN until a task is seen

    def __init__(
        self,
        task_names: Sequence[str],
        alpha: float = 1.5,
        lr: float = 0.025,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.alpha, self.lr = alpha, lr
        self.register_buffer("task_weights", torch.ones(len(self.task_names)))
        self.register_buffer("initial_losses", torch.full((len(self.task_names),), math.nan))

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        weights = self.task_weights.to(losses.device)[task_index(self.task_names, tasks)]
        return weights * losses / len(tasks)

    @torch.no_grad()
    def observe_gradient_norms(self, norms: Tensor, losses: Tensor, tasks: Sequence[str], step: int) -> None:
        index = task_index(self.task_names, tasks)
        device = self.task_weights.device  # the state lives where the module was put
        norms, losses = norms.detach().float().to(device), losses.detach().float().to(device)
        if not (torch.isfinite(norms).all() and torch.isfinite(losses).all()):
            return  # a non-finite step is skipped by the loop; learn nothing from it
        unseen = torch.isnan(self.initial_losses[index])
        self.initial_losses[torch.tensor(index, device=device)[unseen]] = losses[unseen].clamp_min(1e-8)
        weighted = self.task_weights[index] * norms  # G_i
        ratio = losses / self.initial_losses[index]
        target = weighted.mean() * (ratio / ratio.mean()) ** self.alpha
        self.task_weights[index] -= self.lr * torch.sign(weighted - target) * norms / norms.mean().clamp_min(1e-12)
        self.task_weights.clamp_(min=1e-3)
        self.task_weights *= len(self.task_names) / self.task_weights.sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.task_weights.tolist(), strict=True))
