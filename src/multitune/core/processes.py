"""The data-parallel process group as training sees it: rank, world size, sums and broadcasts over the
processes, and leaving the group at the end (training/distributed.py has the design)."""

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
    sharded: bool = False  # the backbone is sharded across the processes (FSDP2)

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
        params = [p for p in parameters if not is_sharded(p)]  # FSDP reduced those in backward already
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


def end_process_group(wait: bool) -> None:
    """Leave the process group before the interpreter exits (a gloo group left to the exit's destructors can
    abort a process that has finished its work: "terminate called without an active exception").
    `wait`: first wait for the others (the command ended well on every process, and none may leave while
    the main one still writes); after an error, leave at once. A no-op without a process group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def from_accelerator(accelerator: Any, sharded: bool = False) -> Processes:
    world = int(accelerator.num_processes)
    return Processes(int(accelerator.process_index), world, sharded and world > 1)


def is_sharded(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
