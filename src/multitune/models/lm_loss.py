"""Cross-entropy of an LM head without the [N, V] logits: the head's matmul fused with the loss, by chunks.

For N target tokens and a vocabulary of V, the plain route materialises logits [N, V] in float32 plus their
softmax for backward: 2·4·N·V bytes (N = 16k, V = 151k: 19 GiB). Here the logits of `chunk` tokens at a
time are computed, turned into that chunk's loss and its gradients (softmax − one-hot, divided by the
task's token count) at once, multiplied back into the gradients of the hidden states and of the head's
weight, and dropped. Peak extra memory is one chunk's logits; the work is the same three matmuls as the
plain route (the forward, and the two gradient matmuls that backward would do), done in the forward pass,
as Liger-Kernel's fused linear cross-entropy does on GPUs. Gradients are kept only when the inputs need them.

Every generation task of a mixed batch goes through one such pass (`linear_cross_entropy_per_task`): one
[V, H] weight gradient per step whatever the number of tasks in the batch, where a pass per task would
hold one per task. The result is one mean loss per task, so loss weightings and gradient methods
(PCGrad, MGDA...) still see each task's loss on its own: backward with equal weights on every task (the
usual case) scales the gradients computed in the forward; with unequal weights (a weighting, or one
task's gradient alone) the hidden states' gradient is rescaled row by row, and the weight's gradient is
computed again for the rows whose task has a non-zero weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the head's matmuls: autocast's where it is on (bf16/fp16 mixed precision), else the
    weight's. The Function casts explicitly and runs with autocast off, so every product has one dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """h [n, H] and weight [V, H] in the compute dtype -> float32 logits [n, V]."""
    logits = (h @ weight.t()).float()
    if bias is not None:
        logits += bias.float()
    return logits


def _add_product(total: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """total + a @ b, kept in float32 whatever the dtype of a and b (the first product starts it)."""
    if total is None:
        return (a @ b).float()
    if a.dtype == torch.float32:
        return total.addmm_(a, b)  # in place: no [V, H] temporary
    return total.add_(a @ b)


def _softmax_minus_onehot(logits: Tensor, lse: Tensor, t: Tensor, row_scale: Tensor) -> Tensor:
    """d(Σ_rows row_scale · CE)/d(logits) for one chunk, in place of its logits [n, V]."""
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
    return probs.mul_(row_scale[:, None])


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        tasks: Tensor,
        k: int,
        chunk: int,
    ) -> Tensor:
        counts = torch.bincount(tasks, minlength=k).clamp_(min=1).float()  # [k] target tokens per task
        row_scale = counts.reciprocal()[tasks]  # [N]: each row's share of its task's mean
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight: Tensor | None = None  # float32 while it accumulates
        grad_bias: Tensor | None = None
        totals = torch.zeros(k, dtype=torch.float32, device=hidden.device)
        compute = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute)
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start : start + chunk].to(compute), targets[start : start + chunk]
                logits = _chunk_logits(h, w, bias)
                lse = torch.logsumexp(logits, dim=-1)
                totals.index_add_(0, tasks[start : start + chunk], lse - logits.gather(1, t[:, None]).squeeze(1))
                if not (need_h or need_w or need_b):
                    continue
                probs = _softmax_minus_onehot(logits, lse, t, row_scale[start : start + chunk])
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = (probs.to(compute) @ w).to(hidden.dtype)
                if need_w:
                    grad_weight = _add_product(grad_weight, probs.t().to(compute), h)
                if need_b:
                    grad_bias = probs.sum(0) if grad_bias is None else grad_bias.add_(probs.sum(0))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        # kept as saved tensors: freed after the backward unless the graph is retained (a gradient method
        # takes each task's gradient from this one node in turn)
        ctx.save_for_backward(hidden, weight, bias, targets, tasks, row_scale, grad_hidden, grad_weight, grad_bias)
        ctx.chunk, ctx.compute, ctx.bias_dtype = chunk, compute, None if bias is None else bias.dtype
        return totals / counts

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, targets, tasks, row_scale, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        g = grad_output.float()  # [k]: the weight of each task's loss in what is differentiated
        if bool((g == g[0]).all()):  # one factor for every task: the forward's gradients, scaled
            scale = float(g[0])
            grads = [
                None if x is None else (x if scale == 1.0 else x * scale) for x in (grad_hidden, grad_weight, grad_bias)
            ]
        else:
            factor = g[tasks]  # [N]
            grads = [None if grad_hidden is None else grad_hidden * factor[:, None].to(grad_hidden.dtype), None, None]
            if grad_weight is not None or grad_bias is not None:
                grads[1], grads[2] = _weight_gradients(
                    hidden, weight, bias, targets, row_scale * factor, ctx.chunk, ctx.compute
                )
                grads[1] = None if grad_weight is None else grads[1]
                grads[2] = None if grad_bias is None else grads[2]
        if grads[2] is not None and ctx.bias_dtype is not None:
            grads[2] = grads[2].to(ctx.bias_dtype)
        return grads[0], grads[1], grads[2], None, None, None, None


def _weight_gradients(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    row_scale: Tensor,
    chunk: int,
    compute: torch.dtype,
) -> tuple[Tensor, Tensor | None]:
    """Gradients of Σ_rows row_scale · CE for the head's weight [V, H] and bias [V], over the rows whose
    scale is not zero (the logits computed again, by chunks, in the forward's compute dtype). Also run when
    only the hidden states' gradient is asked for (autograd.grad of one task's loss): backward cannot tell
    which inputs a call wants; its cost is that task's rows, as a pass of its own would be."""
    keep = row_scale != 0
    hidden, targets, row_scale = hidden[keep], targets[keep], row_scale[keep]
    grad_weight: Tensor | None = None
    grad_bias = None if bias is None else torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(compute)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk].to(compute), targets[start : start + chunk]
            logits = _chunk_logits(h, w, bias)
            lse = torch.logsumexp(logits, dim=-1)
            probs = _softmax_minus_onehot(logits, lse, t, row_scale[start : start + chunk])
            grad_weight = _add_product(grad_weight, probs.t().to(compute), h)
            if grad_bias is not None:
                grad_bias += probs.sum(0)
    return (torch.zeros_like(weight) if grad_weight is None else grad_weight.to(weight.dtype)), grad_bias


def linear_cross_entropy_per_task(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, tasks: Tensor, k: int, chunk: int
) -> Tensor:
    """Per task j < k, mean over the rows i with tasks_i = j of CE(hidden_i @ weightᵀ + bias, targets_i),
    never holding more than `chunk` rows of logits; a task with no rows has loss 0 (still in the graph).

    hidden [N, H]; weight [V, H]; bias [V] or None; targets [N] (token ids); tasks [N] (ints in [0, k));
    returns [k] float32. Raises ValueError when k < 1 or the row counts differ."""
    if k < 1 or not (hidden.shape[0] == targets.shape[0] == tasks.shape[0]):
        raise ValueError(f"{k} tasks and {hidden.shape[0]}/{targets.shape[0]}/{tasks.shape[0]} rows")
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, tasks, k, max(1, chunk))  # type: ignore[no-any-return]


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
    """mean_i CE(hidden_i @ weightᵀ + bias, targets_i), never holding more than `chunk` rows of logits.
    hidden [N, H], weight [V, H], bias [V] or None, targets [N]; returns a float32 scalar (0 when N = 0)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    tasks = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    return linear_cross_entropy_per_task(hidden, weight, bias, targets, tasks, 1, chunk)[0]
