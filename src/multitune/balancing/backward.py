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

The two sources are the entries of GRADIENT_SOURCES, each declaring its capabilities where it is
registered (`parameters` needs whole per-task gradients: not sharded, no micro-batches); `balanced_backward`
runs the forward, the weighting and the representation gradients, then `plain_backward` or the source's.

Gradient accumulation (`micro_batches` > 1, representation source or a plain backward) splits only the
backbone's work, and stays exact for every loss weighting and aggregator: the backbone first runs on each
micro-batch without a graph, giving the whole batch's representation Z as a leaf; the heads, the
weighting and the aggregator then see the whole batch exactly as without accumulation; finally the
backbone runs again on each micro-batch, with the random state it had the first time (dropout masks
repeat), and back-propagates its slice of dL/dZ (Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup"). Peak activation memory is one micro-batch's; the price is one
more forward pass of the backbone.
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
from multitune.core.processes import ALONE, Processes
from multitune.core.rng import rng_state, set_rng_state
from multitune.registry import Capabilities, Registry


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
    source: str = "representation"  # a name in GRADIENT_SOURCES
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


# Each entry is the source's backward: (model, balancer, aggregator, weighed, step, group) -> None, run when
# an aggregator combines two or more tasks; `balanced_backward` picks one by the config's `source`.
GRADIENT_SOURCES: Registry[None] = Registry("gradient source")


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
    group: Processes = ALONE,
    shares: dict[str, float] | None = None,
    micro_batches: int = 1,
) -> StepLosses:
    """With several processes (training/distributed.py), `shares` gives each task of the global step its
    local share of rows (n_local / n_global, 0 for a task without rows here); every process then balances
    the same tasks with the global loss values and global task gradients, and sums its gradients.
    `micro_batches` > 1: gradient accumulation, exact (see the module's docstring)."""
    weighting, aggregator = balancer.weighting, balancer.aggregator
    source: Callable[..., None] | None = None
    whole = False  # the source takes per-task gradients of the whole shared weights (else of Z)
    if aggregator is not None:
        source = GRADIENT_SOURCES.get(balancer.source, field="gradient_aggregation.source")
        whole = GRADIENT_SOURCES.capabilities(balancer.source).whole_gradients
    losses, hidden, replay = _forward(model, batch, whole and len(batch.tasks) > 1, micro_batches)
    weighed = _weigh(losses, balancer, step, group, shares, batch)
    weighed.hidden, weighed.replay = hidden, replay
    if len(weighed.names) == 1:
        aggregator = None
    observer = weighting if isinstance(weighting, ObservesTaskGradients) else None
    if aggregator is not None and whole:
        # The source observes its whole gradients' norms. A process holding one task's rows here encodes Z
        # and must not observe Z's too: that sum over the processes would meet no partner (gloo aborts).
        observer = None
    needs_representation = observer is not None or (aggregator is not None and not whole)
    if needs_representation or aggregator is not None:
        # c_i = d(Σ terms)/dL_i: task i's gradient is c_i·∇L_i, taken from task i's own graph only
        # (differentiating terms[i] directly would push zeros through every other task's graph).
        weighed.coefficients = torch.autograd.grad(weighed.total, weighed.stacked, retain_graph=True)[0].detach()
    if needs_representation and hidden is not None:
        _representation_gradients(weighed, observer, step, group)
    if aggregator is None:
        plain_backward(model, weighed, backward, group)
    else:
        assert source is not None
        source(model, balancer, aggregator, weighed, step, group)
    stacked = weighed.stacked
    return StepLosses({n: stacked[i].detach() for i, n in enumerate(weighed.names)}, weighed.total.detach())


@dataclass
class Weighed:
    """One step's losses after the loss weighting: what every gradient source starts from."""

    names: list[str]  # the step's tasks (the global step's, in the same order on every process)
    parts: dict[str, Tensor]  # what each task's gradient is taken of: its own loss (its local share)
    stacked: Tensor  # [T] the (global) loss values; gradients flow to the local shares
    total: Tensor  # Σ terms: the objective that is differentiated
    coefficients: Tensor  # [T] c_i = d total / dL_i (ones until taken)
    hidden: Tensor | None = None  # [B, L, H] the shared representation Z; None after per-task forwards
    replay: Callable[[Tensor], None] | None = None  # micro-batches: back-propagates dZ into the backbone
    task_grads: Tensor = field(default_factory=lambda: torch.empty(0))  # [T, B*L*H] c_i·∇_Z L_i


def _forward(
    model: BalancedModel, batch: Any, per_task: bool, micro_batches: int
) -> tuple[dict[str, Tensor], Tensor | None, Callable[[Tensor], None] | None]:
    """Per-task losses, the shared representation Z (None with per-task forwards) and the micro-batch replay."""
    if per_task:  # separate graphs: task i's backward then touches only task i's rows
        losses = {}
        for name in batch.tasks:
            part = batch.only(name)
            losses.update(model.head_losses(model.encode(part), part))
        return losses, None, None
    replay: Callable[[Tensor], None] | None = None
    if micro_batches > 1 and batch.size > 1:
        hidden, replay = encode_in_parts(model, batch, micro_batches)
    else:
        hidden = model.encode(batch)  # [B, L, H]: the shared representation
    return model.head_losses(hidden, batch), hidden, replay


def _weigh(
    losses: dict[str, Tensor],
    balancer: Balancer,
    step: int,
    group: Processes,
    shares: dict[str, float] | None,
    batch: Any,
) -> Weighed:
    """The loss weighting's objective over the step's tasks: with several processes, over the global values."""
    if group.several:
        assert shares is not None, "several processes need each task's share of the rows"
        names = list(shares)  # the global step's tasks, in the same order on every process
        device = next(iter(losses.values())).device if losses else batch.inputs["attention_mask"].device
        zero = torch.zeros((), device=device)  # a task without rows on this process
        local = torch.stack([losses.get(n, zero) for n in names])  # [T]
        scaled = local * torch.tensor([shares[n] for n in names], device=device, dtype=local.dtype)
        global_values = group.sum_(scaled.detach().clone())
        stacked = scaled + (global_values - scaled.detach())  # the global values; gradients of this share
        parts = {n: losses[n] * shares[n] if n in losses else zero for n in names}
    else:
        names = list(losses)
        stacked = torch.stack([losses[n] for n in names])  # [T]
        parts = dict(losses)
    # What each task's gradient is taken of: the task's own loss (its local share), never an entry of
    # `stacked`, whose backward would push zeros through every other task's graph (3x the step at T=4).
    terms = balancer.weighting.combine(stacked, names, step)  # [T], objective = terms.sum()
    scale = balancer.task_scale
    if any(scale.get(n, 1.0) != 1.0 for n in names):
        terms = terms * torch.tensor([scale.get(n, 1.0) for n in names], device=terms.device)
    coefficients = torch.ones(len(names), device=stacked.device)  # [T]
    return Weighed(names, parts, stacked, terms.sum(), coefficients)


def _representation_gradients(
    weighed: Weighed, observer: ObservesTaskGradients | None, step: int, group: Processes
) -> None:
    """Each task's c_i·∇_Z L_i (one backward through the heads per task); their norms go to `observer`."""
    hidden, coefficients = weighed.hidden, weighed.coefficients
    assert hidden is not None
    weighed.task_grads = torch.stack(
        [_grad_or_zeros(weighed.parts[n], hidden, coefficients[i]).flatten() for i, n in enumerate(weighed.names)]
    )  # [T, B*L*H]
    if observer is not None:
        squares = group.sum_(weighed.task_grads.float().pow(2).sum(1))  # [T]; rows are disjoint across processes
        norms = squares.sqrt() / coefficients.abs().clamp_min(1e-12)  # ‖∇_Z L_i‖ of the raw loss
        observer.observe_gradient_norms(norms, weighed.stacked.detach(), weighed.names, step)


def plain_backward(
    model: BalancedModel, weighed: Weighed, backward: Callable[[Tensor], None], group: Processes
) -> None:
    """No aggregator: one backward of the objective (through `backward`, the loss scaler's when there is one)."""
    backward(weighed.total)
    hidden = weighed.hidden
    if weighed.replay is not None and hidden is not None:  # dZ of the whole batch, into each micro-batch
        weighed.replay(hidden.grad if hidden.grad is not None else torch.zeros_like(hidden))
    group.sum_grads_(_trainable(model, group))


@GRADIENT_SOURCES.register("representation")
def representation_backward(
    model: BalancedModel,
    balancer: Balancer,
    aggregator: GradientAggregator,
    weighed: Weighed,
    step: int,
    group: Processes = ALONE,
) -> None:
    """Per-task gradients of the shared representation Z [B, ..., H], aggregated, then one backward.

    The backward through the backbone carries the aggregate (Sener & Koltun 2018, MGDA-UB); heads and
    learnable weightings get their ordinary gradients."""
    hidden, task_grads, names = weighed.hidden, weighed.task_grads, weighed.names
    assert hidden is not None, "the representation source always encodes the whole batch"
    if group.several:
        assert isinstance(aggregator, GramianAggregator), "checked when the run is built"
        weights = aggregator.weights(group.sum_(gramian(task_grads)), names)  # [T], from the global Gramian
        update = combine_rows(weights, task_grads).view_as(hidden)  # [B, L, H]
    else:
        update = aggregate(aggregator, task_grads, names).view_as(hidden)  # [B, L, H]
    head_side = _unshared_parameters(model, balancer.weighting)
    if head_side:
        torch.autograd.backward(weighed.total, inputs=head_side, retain_graph=True)
    if weighed.replay is not None:
        weighed.replay(update.to(hidden.dtype))
    else:
        torch.autograd.backward(hidden, grad_tensors=update.to(hidden.dtype))
    group.sum_grads_(_trainable(model, group))


def _trainable(model: BalancedModel, group: Processes) -> list[nn.Parameter]:
    """The parameters whose gradients are summed over the processes (none to sum alone)."""
    return [p for p in model.parameters() if p.requires_grad] if group.several else []


def encode_in_parts(model: BalancedModel, batch: Any, parts: int) -> tuple[Tensor, Callable[[Tensor], None]]:
    """The whole batch's representation, computed `parts` rows at a time without a graph, as a leaf that
    requires grad; and `replay(dZ)`, which re-runs each part with its first random state and
    back-propagates dZ's slice of it into the backbone."""
    size = batch.size
    bounds = [(size * k // parts, size * (k + 1) // parts) for k in range(parts)]
    bounds = [(a, b) for a, b in bounds if b > a]
    states: list[dict[str, Any]] = []
    pieces = []
    with torch.no_grad():
        for a, b in bounds:
            states.append(rng_state())
            pieces.append(model.encode(batch.rows(a, b)))
    after = rng_state()
    first = pieces[0]
    # [B, L, H] padded to the batch's length; any other features (a CNN's [B, C, h, w]) are one size for all rows
    length = batch.inputs["attention_mask"].shape[1:] if first.ndim == 3 else first.shape[1:2]
    hidden = first.new_zeros((size, *length, *first.shape[2:]))
    for (a, b), piece in zip(bounds, pieces, strict=True):
        hidden[a:b, : piece.shape[1]] = piece
    del pieces
    hidden.requires_grad_(True)

    def replay(grad: Tensor) -> None:
        for (a, b), state in zip(bounds, states, strict=True):
            set_rng_state(state)
            piece = model.encode(batch.rows(a, b))
            torch.autograd.backward(piece, grad_tensors=grad[a:b, : piece.shape[1]].to(piece.dtype))
        set_rng_state(after)

    return hidden, replay


def _grad_or_zeros(loss: Tensor, wrt: Tensor, scale: Tensor) -> Tensor:
    """d(scale·loss)/d(wrt), zeros where the loss does not depend on it (a task without rows here)."""
    if not loss.requires_grad:
        return torch.zeros_like(wrt)
    (grad,) = torch.autograd.grad(loss, wrt, grad_outputs=scale, retain_graph=True, allow_unused=True)
    return grad if grad is not None else torch.zeros_like(wrt)


@GRADIENT_SOURCES.register("parameters", capabilities=Capabilities(whole_gradients=True, sharded=False))
def parameters_backward(
    model: BalancedModel,
    balancer: Balancer,
    aggregator: GradientAggregator,
    weighed: Weighed,
    step: int,
    group: Processes = ALONE,
) -> None:
    """Exact per-task gradients of every shared parameter [T, P], aggregated into their `.grad`.

    The [T, P] buffer is reused across steps; heads and learnable weightings get their ordinary gradients."""
    losses, names, coefficients = weighed.parts, weighed.names, weighed.coefficients
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    sizes = [p.numel() for p in shared]
    buffer = balancer.gradient_buffer(len(names), sum(sizes), coefficients.device)  # [T, P]
    for i, name in enumerate(names):
        if not losses[name].requires_grad:  # a task without rows on this process
            buffer[i].zero_()
            continue
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
    if group.several:  # the global per-task gradients (summed in float32: not every backend sums bf16)
        buffer.copy_(group.sum_(buffer.float()))
    weighting = balancer.weighting
    if isinstance(weighting, ObservesTaskGradients):
        norms = buffer.float().norm(dim=1) / coefficients.abs().clamp_min(1e-12)  # [T] ‖∇_θ L_i‖ of the raw loss
        weighting.observe_gradient_norms(norms, weighed.stacked.detach(), names, step)
    update = aggregate(aggregator, buffer, names)  # [P]
    others = _unshared_parameters(model, weighting)
    if others:
        torch.autograd.backward(weighed.total, inputs=others)
        shared_ids = {id(p) for p in shared}
        own = {id(p) for p in others}
        group.sum_grads_(p for p in model.parameters() if p.requires_grad and id(p) in own and id(p) not in shared_ids)
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
