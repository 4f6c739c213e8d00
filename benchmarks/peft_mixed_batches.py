"""Per-task LoRA on mixed-task batches vs one shared LoRA: step time and memory, same batches, one process.

Both models are the same frozen encoder with LoRA (peft) on the same modules and the same rank, and the
same T classification heads. The baseline is what a user writes with one adapter: plain peft, every row
through the one adapter. multitune gives every task its own adapter and routes each row of a mixed batch
to its task's adapter (models/peft_tasks.py). Each round times one full training step (zero_grad,
forward, backward, AdamW step) of each in turn; the figure is the median over rounds.

Memory: on CUDA the peak allocated bytes of a step; on CPU, where torch keeps no allocator statistics,
the bytes of the tensors autograd saves for the backward pass (the activation memory) plus the trainable
parameters with their gradients and AdamW moments.

    python benchmarks/peft_mixed_batches.py --tasks 2 4 8 --rounds 7              # MiniLM on CPU
    python benchmarks/peft_mixed_batches.py --model bert-base --device cuda --rows 64 --length 128
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from balancing_overhead import MINILM, batches  # type: ignore[import-not-found]

from multitune.models.backbone import load_backbone
from multitune.models.heads import ClassificationHead
from multitune.models.multitask import MultiTaskModel
from multitune.models.peft_tasks import TaskAdapters


def build(name: str, tasks: int, rank: int, device: torch.device) -> tuple[dict[str, MultiTaskModel], object]:
    from peft import LoraConfig, inject_adapter_in_model

    backbone = load_backbone(MINILM)
    if name == "bert-base":
        from transformers import BertConfig, BertModel

        backbone.model = BertModel(BertConfig())  # random weights: speed only
    names = [f"task{i}" for i in range(tasks)]
    heads = {n: ClassificationHead(backbone.hidden_size, 2) for n in names}
    shared_backbone = copy.deepcopy(backbone.model)
    for p in shared_backbone.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0), shared_backbone)
    one = MultiTaskModel(shared_backbone, copy.deepcopy(heads))
    per_task = MultiTaskModel(backbone.model, heads)
    per_task.attach_adapters(TaskAdapters(backbone.model, names, "lora", rank, 2 * rank, 0.0, None, False, False, 64))
    return {"one shared LoRA": one.to(device), "per-task LoRA, mixed": per_task.to(device)}, backbone.tokenizer


def step(model: MultiTaskModel, optimizer: torch.optim.Optimizer, batch: object) -> None:
    optimizer.zero_grad(set_to_none=True)
    sum(model.losses(batch).values()).backward()  # type: ignore[union-attr]
    optimizer.step()


def saved_bytes(model: MultiTaskModel, batch: object) -> int:
    """Bytes autograd keeps for the backward pass of one forward (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model.losses(batch)  # type: ignore[arg-type]
    del losses
    return sum(seen.values())


def measure(args: argparse.Namespace, tasks: int) -> dict[str, object]:
    device = torch.device(args.device)
    models, tokenizer = build(args.model, tasks, args.rank, device)
    rows = max(1, args.rows // tasks)  # the same batch size whatever T: rows spread over the tasks
    data = [b.to(device) for b in batches(tokenizer, tasks, rows, args.length, args.rounds + 2)]
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()
    }
    for name, model in models.items():  # warm-up
        model.train()
        for batch in data[:2]:
            step(model, optimizers[name], batch)
    times: dict[str, list[float]] = {k: [] for k in models}
    peaks: dict[str, int] = {}
    for batch in data[2:]:
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step(model, optimizers[name], batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
            times[name].append(time.perf_counter() - start)
    out: dict[str, object] = {"tasks": tasks, "rows": rows * tasks, "length": args.length}
    for name, model in models.items():
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        memory = peaks[name] if device.type == "cuda" else saved_bytes(model, data[2]) + 4 * trainable
        out[name] = {"step_seconds": statistics.median(times[name]), "memory_bytes": memory}
    base, ours = out["one shared LoRA"], out["per-task LoRA, mixed"]
    out["time_ratio"] = ours["step_seconds"] / base["step_seconds"]  # type: ignore[index]
    out["memory_ratio"] = ours["memory_bytes"] / base["memory_bytes"]  # type: ignore[index]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "bert-base"], default="minilm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rows", type=int, default=32, help="rows per step, spread over the tasks")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peft_mixed_batches.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = [measure(args, t) for t in args.tasks]
    print("| T | one shared LoRA s/step | per-task LoRA s/step | time ratio | memory ratio |")
    print("|---|---|---|---|---|")
    for r in results:
        one, per = r["one shared LoRA"], r["per-task LoRA, mixed"]
        print(
            f"| {r['tasks']} | {one['step_seconds']:.3f} | {per['step_seconds']:.3f} | "  # type: ignore[index]
            f"{r['time_ratio']:.2f}x | {r['memory_ratio']:.2f}x |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
