"""Which tasks help each other: gradient cosines, TAG-style lookahead affinity, and a grouping.

- Gradient cosine: cos(g_i, g_j) of the per-task gradients of the shared parameters (each task on its own
  rows), averaged over the sampled steps. Negative values are conflicts.
- Lookahead affinity (Fifty, Amid, Zhao, Yu, Anil & Finn, "Efficiently Identifying Task Groupings for
  Multi-Task Learning", NeurIPS 2021): take a step of the shared parameters along task i's gradient
  alone and measure how task j's loss changes, Z_ij = 1 − L_j(θ − η·g_i) / L_j(θ). Positive: i's update
  helps j. Unlike TAG, which measures on the training batch itself, g_i comes from a training batch and
  L_j from a held-out (validation) batch: then the diagonal Z_ii says whether task i's own update
  generalizes to its own unseen rows. A task whose Z_ii is not positive on average is flagged: what it
  learns is noise or memorisation (a task with corrupted labels is the textbook case), so it can only
  move the shared weights at the others' expense.
- Grouping: the partition of the tasks into k groups that maximises the mean within-group affinity
  (symmetrised), by exhaustive search (fine up to about 10 tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn


def cosine_matrix(gramian: Tensor) -> Tensor:
    """[T, T] Gramian -> [T, T] cosines."""
    norms = gramian.diagonal().clamp_min(1e-30).sqrt()
    return gramian / (norms[:, None] * norms[None, :])


@torch.no_grad()
def lookahead_affinity(
    shared: Sequence[nn.Parameter],
    grads: Tensor,
    losses: Callable[[], Tensor],
    lr: float,
) -> Tensor:
    """Z [T, T]: Z_ij = 1 − L_j(θ − lr·g_i) / L_j(θ), with θ the shared parameters (restored afterwards).

    `grads` is [T, P] (flattened in `shared` order); `losses()` evaluates every task's loss on its batch."""
    before = losses()  # [T]
    saved = [p.detach().clone() for p in shared]
    rows = []
    for i in range(grads.shape[0]):
        offset = 0
        for p in shared:
            n = p.numel()
            p.sub_(lr * grads[i, offset : offset + n].view_as(p).to(p.dtype))
            offset += n
        rows.append(1.0 - losses() / before.clamp_min(1e-12))
        for p, original in zip(shared, saved, strict=True):
            p.copy_(original)
    return torch.stack(rows)


def partitions(items: list[int], k: int) -> Iterator[list[list[int]]]:
    """Every partition of `items` into exactly k non-empty groups (each once, groups in first-item order)."""
    if k == 1:
        yield [items]
        return
    if len(items) < k:
        return
    first, rest = items[0], items[1:]
    for smaller in partitions(rest, k - 1):  # `first` alone
        yield [[first], *smaller]
    for partition in partitions(rest, k):  # `first` joins one of the k groups
        for g in range(len(partition)):
            yield [sorted([first, *group]) if i == g else group for i, group in enumerate(partition)]


def best_grouping(names: Sequence[str], affinity: Tensor, k: int) -> tuple[list[list[str]], float]:
    """The k-group partition with the highest mean within-group symmetrised affinity (singletons score 0)."""
    symmetric = ((affinity + affinity.T) / 2).tolist()
    best: tuple[float, list[list[int]]] = (float("-inf"), [])
    for partition in partitions(list(range(len(names))), min(k, len(names))):
        scores = []
        for group in partition:
            pairs = [(a, b) for a in group for b in group if a < b]
            scores.append(sum(symmetric[a][b] for a, b in pairs) / len(pairs) if pairs else 0.0)
        score = sum(scores) / len(scores)
        if score > best[0]:
            best = (score, partition)
    return [[names[i] for i in group] for group in best[1]], best[0]


NO_SELF_TRANSFER = "their own steps did not lower their own held-out loss on average (nothing they learn generalizes)"


class AffinityTracker:
    """Averages the gradient cosines and lookahead affinities measured during a run."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.cosine = torch.zeros(len(self.names), len(self.names), dtype=torch.float64)
        self.lookahead = torch.zeros_like(self.cosine)
        self.samples = 0
        self.steps: list[int] = []

    def add(self, step: int, cosine: Tensor, lookahead: Tensor) -> None:
        self.cosine += cosine.double().cpu()
        self.lookahead += lookahead.double().cpu()
        self.samples += 1
        self.steps.append(step)

    def summary(self, groups: int) -> dict[str, object]:
        n = max(self.samples, 1)
        cosine, lookahead = self.cosine / n, self.lookahead / n
        grouping, score = best_grouping(self.names, lookahead, groups) if self.samples else ([], 0.0)
        own = lookahead.diagonal().tolist()
        return {
            "tasks": self.names,
            "samples": self.samples,
            "steps": self.steps,
            "gradient_cosine": [[round(v, 6) for v in row] for row in cosine.tolist()],
            "lookahead_affinity": [[round(v, 8) for v in row] for row in lookahead.tolist()],
            "groups": grouping,
            "group_score": round(score, 8),
            # tasks whose own steps did not lower their own held-out loss on average: nothing they learn generalizes
            "no_self_transfer": [n for n, z in zip(self.names, own, strict=True) if self.samples and z <= 0],
        }
