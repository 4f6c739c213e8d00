"""balanced_backward: the one function that writes `.grad`.

Per step: per-task losses -> the loss weighting's per-task terms -> either one plain backward of their
sum, or per-task gradients combined by a gradient aggregator:

- source `representation`: gradients w.r.t. the shared representation Z [B, L, H] (one cheap backward
  through the heads per task), aggregated, then a single backward through the backbone with that
  aggregate (the MGDA-UB trick). Tasks that feed different rows of the batch have gradients on disjoint
  rows of Z, so there the aggregators act as per-task gradient scalings.
- source `parameters`: exact per-task gradients of every shared parameter, kept on the device in one
  preallocated [T, P] buffer (float32, or bfloat16 to halve it), aggregated, and written into the shared
  parameters' `.grad`. Each task runs its own forward on its own rows, so the T backward passes together
  cost about one backward of the joint batch. Heads and learnable weightings get their ordinary gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from multitune.balancing.gradients import GradientAggregator, GramianAggregator, gramian
from multitune.balancing.gradients.base import combine_rows
from multitune.balancing.losses import LossWeighting, ObservesTaskGradients


class BalancedModel(Protocol):
    """What balanced_backward needs of a model (MultiTaskModel fits)."""

    def encode(self, batch: Any) -> Tensor: ...

    def head_losses(self, hidden: Tensor, batch: Any) -> dict[str, Tensor]: ...

    def shared_parameters(self) -> Iterator[nn.Parameter]: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


@dataclass
class Balancer:
    """The balancing choices of a run: a loss weighting, optionally a gradient aggregator and its source."""

    weighting: LossWeighting
    aggregator: GradientAggregator | None = None
    source: str = "representation"
    buffer_dtype: torch.dtype = torch.float32
    task_scale: dict[str, float] = field(default_factory=dict)  # extra per-task loss multipliers (the guard's)
    _buffer: Tensor | None = field(default=None, repr=False)

    def gradient_buffer(self, tasks: int, size: int, device: torch.device) -> Tensor:
        """The [T, P] buffer, allocated once and reused (grown only if a step has more tasks)."""
        buffer = self._buffer
        if buffer is None or buffer.shape[0] < tasks or buffer.shape[1] != size or buffer.device != device:
            buffer = self._buffer = torch.empty(tasks, size, dtype=self.buffer_dtype, device=device)
        return buffer[:tasks]


@dataclass
class StepLosses:
    losses: dict[str, Tensor]  # raw per-task losses, detached
    total: Tensor  # the objective that was differentiated, detached


def aggregate(aggregator: GradientAggregator, grads: Tensor, tasks: Sequence[str]) -> Tensor:
    if isinstance(aggregator, GramianAggregator):
        return combine_rows(aggregator.weights(gramian(grads), tasks), grads)
    return aggregator.aggregate(grads, tasks)


def balanced_backward(
    model: BalancedModel,
    batch: Any,
    balancer: Balancer,
    step: int,
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> StepLosses:
    weighting = balancer.weighting
    per_task_forward = balancer.aggregator is not None and balancer.source == "parameters" and len(batch.tasks) > 1
    if per_task_forward:  # separate graphs: task i's backward then touches only task i's rows
        losses = {}
        for name in batch.tasks:
            part = batch.only(name)
            losses.update(model.head_losses(model.encode(part), part))
        hidden = None
    else:
        hidden = model.encode(batch)  # [B, L, H]: the shared representation
        losses = model.head_losses(hidden, batch)
    names = list(losses)
    stacked = torch.stack([losses[n] for n in names])  # [T]
    terms = weighting.combine(stacked, names, step)  # [T], objective = terms.sum()
    if any(balancer.task_scale.get(n, 1.0) != 1.0 for n in names):
        terms = terms * torch.tensor([balancer.task_scale.get(n, 1.0) for n in names], device=terms.device)
    aggregator = balancer.aggregator if len(names) > 1 else None
    total = terms.sum()
    needs_representation = isinstance(weighting, ObservesTaskGradients) or (
        aggregator is not None and balancer.source == "representation"
    )
    coefficients = torch.ones(len(names), device=stacked.device)
    if needs_representation or aggregator is not None:
        # c_i = d(Σ terms)/dL_i: task i's gradient is c_i·∇L_i, taken from task i's own graph only
        # (differentiating terms[i] directly would push zeros through every other task's graph).
        coefficients = torch.autograd.grad(total, stacked, retain_graph=True)[0].detach()  # [T]
    task_grads = torch.empty(0)
    if needs_representation and hidden is not None:
        task_grads = torch.stack(
            [
                torch.autograd.grad(losses[n], hidden, grad_outputs=coefficients[i], retain_graph=True)[0].flatten()
                for i, n in enumerate(names)
            ]
        )  # [T, B*L*H]
        if isinstance(weighting, ObservesTaskGradients):
            norms = task_grads.norm(dim=1) / coefficients.abs().clamp_min(1e-12)  # ‖∇_Z L_i‖ of the raw loss
            weighting.observe_gradient_norms(norms, stacked.detach(), names, step)
    if aggregator is None:
        backward(total)
    elif balancer.source == "representation" and hidden is not None:
        update = aggregate(aggregator, task_grads, names).view_as(hidden)
        head_side = _unshared_parameters(model, weighting)
        if head_side:
            torch.autograd.backward(total, inputs=head_side, retain_graph=True)
        torch.autograd.backward(hidden, grad_tensors=update.to(hidden.dtype))
    else:
        _parameter_source_backward(model, balancer, aggregator, losses, coefficients, total, step)
    return StepLosses({n: losses[n].detach() for n in names}, total.detach())


def _parameter_source_backward(
    model: BalancedModel,
    balancer: Balancer,
    aggregator: GradientAggregator,
    losses: dict[str, Tensor],
    coefficients: Tensor,
    total: Tensor,
    step: int,
) -> None:
    names = list(losses)
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    sizes = [p.numel() for p in shared]
    buffer = balancer.gradient_buffer(len(names), sum(sizes), coefficients.device)
    for i, name in enumerate(names):
        grads = torch.autograd.grad(
            losses[name], shared, grad_outputs=coefficients[i], retain_graph=True, allow_unused=True
        )
        offset = 0
        for g, n in zip(grads, sizes, strict=True):
            target = buffer[i, offset : offset + n]
            if g is None:
                target.zero_()
            else:
                target.copy_(g.flatten())
            offset += n
    weighting = balancer.weighting
    if isinstance(weighting, ObservesTaskGradients):
        raw = torch.stack([losses[n].detach() for n in names])
        norms = buffer.float().norm(dim=1) / coefficients.abs().clamp_min(1e-12)
        weighting.observe_gradient_norms(norms, raw, names, step)
    update = aggregate(aggregator, buffer, names)  # [P]
    others = _unshared_parameters(model, weighting)
    if others:
        torch.autograd.backward(total, inputs=others)
    offset = 0
    for p, n in zip(shared, sizes, strict=True):
        piece = update[offset : offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.add_(piece)
        offset += n


def _unshared_parameters(model: BalancedModel, weighting: LossWeighting) -> list[nn.Parameter]:
    """Trainable parameters outside the shared backbone: the heads, and a weighting's own (uncertainty)."""
    shared = {id(p) for p in model.shared_parameters()}
    out = [p for p in model.parameters() if p.requires_grad and id(p) not in shared]
    if isinstance(weighting, nn.Module):
        out += [p for p in weighting.parameters() if p.requires_grad]
    return out
