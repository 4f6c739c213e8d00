"""Weight penalties applied straight to `.grad` after the balanced backward (no autograd graph needed).

A penalty Ω(θ) adds ∂Ω/∂θ to each parameter's gradient and reports Ω for the logs. Adding it after the
task gradients were combined keeps it out of the balancing: it is not a task, and a gradient aggregator
must not project it away. The gradient is added before clipping and the optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Regularizer(Protocol):
    name: str

    def apply_(self) -> float:
        """Add this penalty's gradient to the parameters' `.grad`; return the penalty's value."""
        ...


def _add_grad(parameter: nn.Parameter, grad: torch.Tensor) -> None:
    if parameter.grad is None:
        parameter.grad = grad.to(parameter.dtype)
    else:
        parameter.grad.add_(grad.to(parameter.grad.dtype))


def _total(terms: list[torch.Tensor]) -> float:
    """The sum of per-parameter penalty terms (scalars, possibly on a GPU), read to the host once: one
    synchronisation per step instead of one per parameter."""
    if not terms:
        return 0.0
    return float(torch.stack([t.to(terms[0].device) for t in terms]).sum())


class L2SP:
    """L2-SP (Li, Grandvalet & Davoine, ICML 2018, "Explicit inductive bias for transfer learning with
    convolutional networks"): Ω = α/2·‖θ_S − θ⁰_S‖² + β/2·‖θ_N‖², pulling the pretrained (shared)
    weights θ_S toward their starting point θ⁰ instead of toward zero, and decaying new weights θ_N (heads)."""

    name = "l2_sp"

    def __init__(self, pretrained: Iterable[nn.Parameter], new: Iterable[nn.Parameter], alpha: float, beta: float):
        self.alpha, self.beta = alpha, beta
        self.pretrained = [p for p in pretrained if p.requires_grad]
        self.start = [p.detach().clone() for p in self.pretrained]
        self.new = [p for p in new if p.requires_grad]

    @torch.no_grad()
    def apply_(self) -> float:
        """Add ∂Ω/∂θ to each parameter's gradient; returns Ω. θ⁰ moves to its parameter's device once (not a
        host-to-device copy of the backbone every step), and Ω is summed on the device, read once."""
        terms: list[torch.Tensor] = []
        if self.alpha:
            for i, (p, p0) in enumerate(zip(self.pretrained, self.start, strict=True)):
                if p0.device != p.device:
                    p0 = self.start[i] = p0.to(p.device)
                diff = p - p0
                terms.append(0.5 * self.alpha * diff.double().pow(2).sum())
                _add_grad(p, self.alpha * diff)
        if self.beta:
            for p in self.new:
                terms.append(0.5 * self.beta * p.double().pow(2).sum())
                _add_grad(p, self.beta * p)
        return _total(terms)


class PullTogether:
    """Soft parameter sharing's penalty (Duong et al., ACL 2015; Yang & Hospedales, ICLR 2017 workshop):
    Ω = λ·Σ_t ‖θ_t − θ̄‖² over T copies of the same weights, θ̄ their mean; ∂Ω/∂θ_t = 2λ(θ_t − θ̄)."""

    name = "soft_sharing"

    def __init__(self, columns: Sequence[Sequence[nn.Parameter]], strength: float) -> None:
        self.columns = [list(c) for c in columns]
        self.strength = strength

    @torch.no_grad()
    def apply_(self) -> float:
        terms: list[torch.Tensor] = []
        for copies in zip(*self.columns, strict=True):
            mean = torch.stack([p.detach() for p in copies]).mean(0)
            for p in copies:
                diff = p - mean
                terms.append(self.strength * diff.double().pow(2).sum())
                if p.requires_grad:
                    _add_grad(p, 2 * self.strength * diff)
        return _total(terms)
