"""Data parallelism over several processes (`accelerate launch` or `torchrun`), exact for every balancer.

Every process holds the whole model and draws the same global batch (the samplers and task streams are
seeded, so their draws agree without communication); process r keeps rows r, r+P, r+2P... of each task.
A task's loss on a process is its local mean times n_local / n_global, so the sum over processes is the
global mean, and the sum of the processes' gradients is the gradient of the global batch.

Instead of DistributedDataParallel (whose hooks assume one plain backward per step) gradients are summed
explicitly where each method needs them:
- the loss values every loss weighting sees are the global ones (summed first), so stateful weightings
  (DWA, FAMO, the dynamic sampler...) evolve the same way on every process;
- a plain backward: the parameters' gradients are summed after it;
- the `parameters` source: the per-task gradient matrix [T, P] is summed before aggregation, so the
  aggregator sees the global task gradients and every process writes the same update;
- the `representation` source: task gradients live on each process's own rows, so the Gramian [T, T]
  (which sums over rows) is summed before a Gramian-based aggregator picks its weights; aggregators that
  need the gradient vectors themselves are refused there with several processes.
Weights then stay identical on every process without a broadcast. Only the main process writes files.
Token-level losses average over tokens; with uneven token counts across processes their global mean is
approximated by the share of rows (exact for sequence-level tasks and for equal splits).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place in the data-parallel group: rank and world size (1 when alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def shard(self, rows: Sequence[T]) -> list[T]:
        """This process's rows of one task's global rows."""
        return list(rows[self.rank :: self.world]) if self.several else list(rows)

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum over the processes, in place (a no-op alone)."""
        if self.several:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_grads_(self, parameters: Iterable[nn.Parameter]) -> None:
        """Sum `.grad` over the processes in one flat all-reduce. A parameter keeps `grad = None` only when
        no process has a gradient for it (so the optimizer skips it, as it would in one process)."""
        if not self.several:
            return
        params = list(parameters)
        if not params:
            return
        device = params[0].device
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])
        self.sum_(present)
        self.sum_(flat)
        offset = 0
        for p, count in zip(params, present.tolist(), strict=True):
            piece = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            if count > 0:
                p.grad = piece.clone()

    def broadcast(self, value: Any) -> Any:
        """The main process's value, on every process."""
        if not self.several:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.several:
            import torch.distributed as dist

            dist.barrier()


ALONE = Processes()


def from_accelerator(accelerator: Any) -> Processes:
    return Processes(int(accelerator.process_index), int(accelerator.num_processes))
