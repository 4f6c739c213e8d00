"""Our gradient methods beside LibMTL's own implementations: same model, same batches, one process.

LibMTL is not a dependency: point --libmtl at a checkout of https://github.com/median-research-group/LibMTL
(its weighting modules are loaded from there; nothing of it is copied here). Its methods take per-task
gradients of the shared parameters by one backward of the joint graph per task; ours by one backward per
task on that task's own rows (`source: parameters`). Step = zero_grad, forward, backward(s), AdamW step.

    python benchmarks/libmtl_side_by_side.py --libmtl /path/to/LibMTL --tasks 4 --rounds 5
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import balancing_overhead as overhead

from multitune.balancing.backward import Balancer, balanced_backward
from multitune.balancing.gradients import GRADIENT_AGGREGATORS
from multitune.balancing.losses import LOSS_WEIGHTINGS

# ours -> (LibMTL class, its keyword arguments)
PAIRS = {
    "pcgrad": ("PCGrad", {}),
    "mgda": ("MGDA", {"mgda_gn": "none"}),
    "cagrad": ("CAGrad", {"calpha": 0.4, "rescale": 1}),
    "gradvac": ("GradVac", {"GradVac_beta": 0.01, "GradVac_group_type": 0}),
    "imtl_g": ("IMTL", {}),
}
# Not paired: LibMTL's Aligned_MTL calls torch.symeig, removed from torch in 2.x; its Nash_MTL needs cvxpy
# (a CPU convex solver every step) and its UPGrad qpsolvers, neither a dependency of ours.


def load_libmtl(root: Path) -> dict[str, type]:
    """Import LibMTL's weighting modules without its package __init__ (it imports every optional dependency)."""
    for name, folder in (("LibMTL", root / "LibMTL"), ("LibMTL.weighting", root / "LibMTL" / "weighting")):
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    classes = {"EW": importlib.import_module("LibMTL.weighting.EW").EW}
    for class_name, _ in PAIRS.values():
        classes[class_name] = getattr(importlib.import_module(f"LibMTL.weighting.{class_name}"), class_name)
    return classes


def libmtl_method(cls: type, model: torch.nn.Module, tasks: int, device: torch.device) -> object:
    """LibMTL's weighting classes expect the trainer's attributes on themselves; provide them."""

    class Harness(cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.task_name, self.device = tasks, [f"task{i}" for i in range(tasks)], device
            self.rep_grad, self.epoch, self.step = False, 0, 0

        def get_share_params(self):  # type: ignore[no-untyped-def]
            return model.shared_parameters()

        def zero_grad_share_params(self) -> None:
            model.backbone.zero_grad(set_to_none=False)

    method = Harness()
    method.init_param()
    return method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libmtl", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["minilm", "bert-base"], default="minilm")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    classes = load_libmtl(args.libmtl)
    torch.manual_seed(0)
    model, tokenizer = overhead.build_model(args.model, args.tasks, device)
    names = [f"task{i}" for i in range(args.tasks)]
    data = [b.to(device) for b in overhead.batches(tokenizer, args.tasks, args.rows, args.length, args.rounds + 1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    equal = LOSS_WEIGHTINGS.build("equal", injected={"task_names": names, "loss_weights": None, "seed": 0})

    steps: dict[str, object] = {"multitune: equal": Balancer(equal)}  # type: ignore[arg-type]
    for ours, (theirs, kwargs) in PAIRS.items():
        aggregator = GRADIENT_AGGREGATORS.build(ours, injected={"task_names": names, "seed": 0})
        steps[f"multitune: {ours}"] = Balancer(equal, aggregator, "parameters")  # type: ignore[arg-type]
        steps[f"LibMTL: {theirs}"] = (libmtl_method(classes[theirs], model, args.tasks, device), kwargs)
    steps["LibMTL: EW"] = (libmtl_method(classes["EW"], model, args.tasks, device), {})

    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for round_ in range(args.rounds + 1):
        batch = data[round_]
        shift = round_ % len(order)  # each round starts with another method: position effects hit all alike
        for name in order[shift:] + order[:shift]:
            method = steps[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            if isinstance(method, Balancer):
                balanced_backward(model, batch, method, step=round_)
            else:
                weighting, kwargs = method  # type: ignore[misc]
                losses = model.losses(batch)
                weighting.backward(torch.stack([losses[n] for n in names]), **kwargs)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ > 0:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["multitune: equal"])
    setting = f"T={args.tasks}, {args.rows} rows x {args.length} tokens, {device.type}"
    print(f"| method | s/step | vs multitune equal | ({setting}) |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"| {name} | {median:.3f} | {median / base:.2f}x | |")


if __name__ == "__main__":
    main()
