"""balanced_backward: the one function that writes `.grad`.

Per step: per-task losses -> the loss weighting's per-task terms -> either one plain backward of their
sum, or per-task gradients combined by a gradient aggregator:

- source `representation`: gradients w.r.t. the shared representation Z [B, L, H] (one cheap backward
  through the heads per task), aggregated, then a single backward through the backbone with that
  aggregate (the MGDA-UB trick). Tasks that feed different rows of the batch have gradients on disjoint
  rows of Z, so there the aggregators act as per-task gradient scalings.
- source `parameters`: exact per-task gradients of every shared parameter (T backward passes), kept on
  the device in one preallocated [T, P] buffer (float32, or bfloat16 to halve it), aggregated, and
  written into the shared parameters' `.grad`. Heads and learnable weightings get their ordinary gradients.
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
    hidden = model.encode(batch)  # [B, L, H]: the shared representation
    losses = model.head_losses(hidden, batch)
    names = list(losses)
    stacked = torch.stack([losses[n] for n in names])  # [T]
    terms = balancer.weighting.combine(stacked, names, step)  # [T], objective = terms.sum()
    weighting = balancer.weighting
    aggregator = balancer.aggregator if len(names) > 1 else None
    if isinstance(weighting, ObservesTaskGradients) or (aggregator and balancer.source == "representation"):
        task_grads = torch.stack(
            [torch.autograd.grad(terms[i], hidden, retain_graph=True)[0].flatten() for i in range(len(names))]
        )  # [T, B*L*H]
        if isinstance(weighting, ObservesTaskGradients):
            scale = torch.stack([terms[i].detach() / stacked[i].detach().clamp_min(1e-12) for i in range(len(names))])
            norms = task_grads.norm(dim=1) / scale.abs().clamp_min(1e-12)  # ‖∇_Z L_i‖ of the raw loss
            weighting.observe_gradient_norms(norms, stacked.detach(), names, step)
    total = terms.sum()
    if aggregator is None:
        backward(total)
    elif balancer.source == "representation":
        update = aggregate(aggregator, task_grads, names).view_as(hidden)
        head_side = _unshared_parameters(model, weighting)
        if head_side:
            torch.autograd.backward(total, inputs=head_side, retain_graph=True)
        torch.autograd.backward(hidden, grad_tensors=update.to(hidden.dtype))
    else:
        _parameter_source_backward(model, balancer, aggregator, terms, names, total)
    return StepLosses({n: losses[n].detach() for n in names}, total.detach())


def _parameter_source_backward(
    model: BalancedModel,
    balancer: Balancer,
    aggregator: GradientAggregator,
    terms: Tensor,
    names: list[str],
    total: Tensor,
) -> None:
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    sizes = [p.numel() for p in shared]
    buffer = balancer.gradient_buffer(len(names), sum(sizes), terms.device)
    for i in range(len(names)):
        grads = torch.autograd.grad(terms[i], shared, retain_graph=True, allow_unused=True)
        offset = 0
        for g, n in zip(grads, sizes, strict=True):
            target = buffer[i, offset : offset + n]
            if g is None:
                target.zero_()
            else:
                target.copy_(g.flatten())
            offset += n
    update = aggregate(aggregator, buffer, names)  # [P]
    others = _unshared_parameters(model, balancer.weighting)
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
