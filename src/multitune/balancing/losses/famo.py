"""FAMO: Fast Adaptive Multitask Optimization (Liu, Liang, Chen & Liu, NeurIPS 2023).

Task weights z = softmax(ξ). The objective Σ z_i·log L_i / c with c = Σ z_i / L_i moves every task's
log-loss at a balanced rate, at the cost of one backward pass. ξ then follows the observed log-loss
decrease δ_i (gradient Jᵀδ of the softmax, Adam with weight decay, as in the paper's code). The paper
re-evaluates the loss on the same batch after each step; here δ_i is measured between consecutive
observations of task i, which needs no extra forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multitune.balancing.losses.base import LOSS_WEIGHTINGS, task_index

EPSILON = 1e-8


@LOSS_WEIGHTINGS.register("famo")
class FAMOWeighting(nn.Module):
    """Balanced log-loss decrease, weights softmax(ξ) learned from observed decreases (Liu et al. 2023)."""

    paper = "Liu et al. 2023"
    needs_several_tasks = True  # with one task per step it reduces exactly to equal weighting
    cost = "O(T)"
    logits: Tensor
    first_moment: Tensor
    second_moment: Tensor
    previous_log_loss: Tensor  # [T], NaN until a task is seen
    updates: Tensor

    def __init__(
        self,
        task_names: Sequence[str],
        lr: float = 0.025,
        weight_decay: float = 0.001,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.lr, self.weight_decay = lr, weight_decay
        n = len(self.task_names)
        self.register_buffer("logits", torch.zeros(n))
        self.register_buffer("first_moment", torch.zeros(n))
        self.register_buffer("second_moment", torch.zeros(n))
        self.register_buffer("previous_log_loss", torch.full((n,), math.nan))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update(self, log_losses: Tensor, index: list[int]) -> None:
        decrease = torch.zeros_like(self.logits)
        decrease[index] = torch.nan_to_num(self.previous_log_loss[index] - log_losses, nan=0.0)
        self.previous_log_loss[index] = log_losses
        if not bool(decrease.any()):
            return
        z = torch.softmax(self.logits, dim=0)
        gradient = z * (decrease - (z * decrease).sum()) + self.weight_decay * self.logits  # Jᵀδ + decay
        self.updates += 1
        t = int(self.updates)
        self.first_moment.mul_(0.9).add_(0.1 * gradient)
        self.second_moment.mul_(0.999).add_(0.001 * gradient**2)
        m_hat = self.first_moment / (1 - 0.9**t)
        v_hat = self.second_moment / (1 - 0.999**t)
        self.logits -= self.lr * m_hat / (v_hat.sqrt() + 1e-8)

    def combine(self, losses: Tensor, tasks: Sequence[str], step: int) -> Tensor:
        index = task_index(self.task_names, tasks)
        clamped = losses.clamp_min(EPSILON)
        log_losses = torch.log(clamped.detach().float()).to(self.logits.device)  # beside the state
        if torch.isfinite(log_losses).all():  # a non-finite step is skipped by the loop
            self._update(log_losses, index)
        z = torch.softmax(self.logits[index], dim=0).to(losses.device)  # [T]
        c = (z / clamped.detach()).sum()
        return z * torch.log(clamped) / c

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, (len(self.task_names) * torch.softmax(self.logits, 0)).tolist(), strict=True))
