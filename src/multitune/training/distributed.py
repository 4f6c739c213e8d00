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

Sharded (`training.fsdp`, or an accelerate config asking for FSDP): the backbone is split across the
processes with torch's FSDP2 (`fully_shard`, one unit per transformer block plus the rest), so each process
keeps 1/P of the backbone's weights, gradients and optimizer state and gathers a block's weights only while
it runs. Backward reduce-scatters the backbone's gradients as sums (the losses are already shares), the
heads stay whole and are summed as above; the rest of the step is unchanged, so equal weighting, every loss
weighting and the Gramian-based aggregators on the `representation` source are exact. The gradient norm
for clipping is summed over the shards. Checkpoints hold whole tensors (gathered to the main process), so a
sharded run resumes on any number of processes. Per-task gradients of the shared weights (the `parameters`
source, task relations, the guard) need whole parameters and are refused.

DeepSpeed ZeRO (training/zero.py) partitions the optimizer state and gradients instead, after all of the
above: the summed gradients reach its engine through a surrogate loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from multitune.core.processes import Processes, is_sharded


def shard_backbone(backbone: nn.Module) -> list[nn.Module]:
    """FSDP2 over `backbone`: each block of its longest ModuleList (the transformer layers) is one unit and
    the backbone the root unit; gradients are reduce-scattered as sums. Returns the units."""
    from torch.distributed.fsdp import fully_shard

    blocks: list[nn.Module] = []
    for module in backbone.modules():
        children = list(module.children())
        if isinstance(module, nn.ModuleList) and len(children) > len(blocks):
            blocks = children
    units = [*blocks, backbone]
    for unit in units:
        fully_shard(unit)
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]  # a plain SUM (gloo has no PREMUL_SUM)
    return units


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, group: Processes) -> Tensor:
    """torch's clip_grad_norm_ over sharded and whole parameters together: the squares of the sharded
    gradients are summed over the processes, the whole ones (equal everywhere) counted once."""
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [g.to_local() for g in grads if is_sharded(g)]  # type: ignore[attr-defined]
    whole = [g for g in grads if not is_sharded(g)]
    device = (sharded or whole)[0].device if grads else torch.device("cpu")
    square = torch.zeros((), device=device)
    for g in sharded:
        square += g.float().pow(2).sum()
    group.sum_(square)
    for g in whole:
        square += g.float().pow(2).sum()
    total = square.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in sharded + whole:
        g.mul_(scale.to(g.dtype))
    return total


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` with every sharded tensor gathered whole (on CPU). Every process must call it."""
    return {
        key: (value.full_tensor() if is_sharded(value) else value.clone()).detach().cpu().contiguous()  # type: ignore[attr-defined]
        for key, value in module.state_dict().items()
    }


def local_shard(value: Tensor, like: Tensor) -> Tensor:
    """This process's piece of the whole tensor `value`, cut as the sharded tensor `like` is cut (each
    `Shard(dim)` placement splits as torch.chunk does; a process past the last chunk holds an empty piece).
    No communication: every process holds the whole tensor already."""
    from torch.distributed.tensor import Shard

    mesh = like.device_mesh  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate() or [0] * mesh.ndim
    piece = value
    for axis, placement in enumerate(like.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Shard):
            chunks = torch.chunk(piece, mesh.size(axis), dim=placement.dim)
            index = coordinate[axis]
            piece = chunks[index] if index < len(chunks) else piece.narrow(placement.dim, 0, 0)
    return piece


def load_full_state_dict(module: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Copy whole tensors into `module`, each sharded one cut to this process's shard. Returns the missing
    and the unexpected keys."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    with torch.no_grad():
        for key in set(own) & set(state):
            target, value = own[key], state[key]
            if is_sharded(target):
                target.to_local().copy_(local_shard(value, target))  # type: ignore[attr-defined]
            else:
                target.copy_(value)
    return missing, unexpected


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with sharded state tensors gathered whole. Every process must call it."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {k: v.full_tensor() if is_sharded(v) else v for k, v in entry.items()}  # type: ignore[attr-defined]
        for index, entry in state["state"].items()
    }
    return state


def shard_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of a whole state: cut the state of each sharded parameter to its shard."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            entry = optimizer.state.get(p, {})
            for key, value in entry.items():
                if isinstance(value, Tensor) and not is_sharded(value) and value.shape == p.shape:
                    piece = local_shard(value.to(p.device), p).contiguous()
                    entry[key] = DTensor.from_local(
                        piece,
                        p.device_mesh,  # type: ignore[attr-defined]
                        p.placements,  # type: ignore[attr-defined]
                        run_check=False,
                        shape=p.shape,
                        stride=p.stride(),
                    )
