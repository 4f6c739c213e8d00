"""Cross-entropy of an LM head without the [N, V] logits: the head's matmul fused with the loss, by chunks.

For N target tokens and a vocabulary of V, the plain route materialises logits [N, V] in float32 plus their
softmax for backward: 2·4·N·V bytes (N = 16k, V = 151k: 19 GiB). Here the logits of `chunk` tokens at a
time are computed, turned into that chunk's loss and its gradients (softmax − one-hot, divided by N) at
once, multiplied back into the gradients of the hidden states and of the head's weight, and dropped. Peak
extra memory is one chunk's logits; the work is the same three matmuls as the plain route (the forward,
and the two gradient matmuls that backward would do), done in the forward pass, as Liger-Kernel's fused
linear cross-entropy does on GPUs. Gradients are kept only when the inputs need them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int
    ) -> Tensor:
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight: Tensor | None = None
        grad_bias: Tensor | None = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = (h @ weight.t()).float()
            if bias is not None:
                logits += bias.float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            probs /= n  # d(mean loss)/d(logits)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:  # the first chunk writes, later ones add in place: no [V, H] zeros, no extra copies
                part = probs.t().to(weight.dtype)
                if grad_weight is None:
                    grad_weight = part @ h.to(weight.dtype)
                else:
                    grad_weight.addmm_(part, h.to(weight.dtype))
            if need_b:
                grad_bias = probs.sum(0) if grad_bias is None else grad_bias.add_(probs.sum(0))
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return total / max(n, 1)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        scale = float(grad_output)  # the loss is a scalar: usually 1, or a loss weight
        if scale != 1.0:
            for grad in (grad_hidden, grad_weight, grad_bias):
                if grad is not None:
                    grad.mul_(scale)
        if grad_bias is not None and ctx.bias_dtype is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
    """mean_i CE(hidden_i @ weightᵀ + bias, targets_i), never holding more than `chunk` rows of logits."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, max(1, chunk))  # type: ignore[no-any-return]
