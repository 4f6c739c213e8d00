"""Step time of every balancing method relative to equal weighting: same model, same batches, one process.

Each round times one full training step (zero_grad, forward, balanced backward, AdamW step) of every
method in turn, so slow drifts of the machine hit all methods alike; the figure is the median over rounds.
T tasks are T classification heads on one shared encoder, each fed its own batch of real sentences from
the bundled quickstart data (every task present in every step, as gradient aggregation requires).

    python benchmarks/balancing_overhead.py --tasks 2 4 8 --rounds 5                  # MiniLM on CPU
    python benchmarks/balancing_overhead.py --model bert-base --device cuda --rows 64 --length 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib
from pathlib import Path

import torch

from multitune.balancing.backward import Balancer, balanced_backward
from multitune.balancing.gradients import GRADIENT_AGGREGATORS
from multitune.balancing.losses import LOSS_WEIGHTINGS
from multitune.config import package_path
from multitune.data.collate import collate
from multitune.data.tokens import Encoded
from multitune.models.backbone import load_backbone
from multitune.models.heads import ClassificationHead
from multitune.models.multitask import MultiTaskModel

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def sentences() -> list[str]:
    texts = []
    for line in package_path("quickstart/sms_spam/train.tsv").read_text(encoding="utf-8").splitlines():
        texts.append(line.split("\t", 1)[1])
    for line in package_path("quickstart/stsb/train.tsv").read_text(encoding="utf-8").splitlines():
        texts.append(line.split("\t")[5])
    return texts


class WordIds:
    """A stand-in tokenizer for the random-weight BERT-base shape: one id per word (a stable hash into
    BERT's vocabulary) between [CLS] and [SEP]; speed depends on the lengths only, so no vocabulary file
    (and no packaged model) is needed."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, texts: list[str], truncation: bool, max_length: int) -> dict[str, list[list[int]]]:
        ids = []
        for text in texts:
            words = [1000 + zlib.crc32(w.encode("utf-8")) % (self.vocab - 1000) for w in text.split()]
            ids.append([101, *words[: max_length - 2], 102])
        return {"input_ids": ids, "token_type_ids": [[0] * len(row) for row in ids]}


def build_model(name: str, tasks: int, device: torch.device) -> tuple[MultiTaskModel, object]:
    if name == "bert-base":
        from transformers import BertConfig, BertModel

        config = BertConfig()
        model = BertModel(config, add_pooling_layer=False)  # 110M parameters, random weights: speed only
        hidden, tokenizer = config.hidden_size, WordIds(config.vocab_size)
    else:
        backbone = load_backbone(MINILM)
        model, hidden, tokenizer = backbone.model, backbone.hidden_size, backbone.tokenizer
    heads = {f"task{i}": ClassificationHead(hidden, 2) for i in range(tasks)}
    return MultiTaskModel(model, heads).to(device), tokenizer


def batches(tokenizer: object, tasks: int, rows: int, length: int, steps: int, seed: int = 0) -> list:
    texts = sentences()
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        by_task = {}
        for t in range(tasks):
            picks = torch.randint(len(texts), (rows,), generator=generator).tolist()
            encoded = tokenizer([texts[i] for i in picks], truncation=True, max_length=length)  # type: ignore[operator]
            labels = torch.randint(2, (rows,), generator=generator).tolist()
            by_task[f"task{t}"] = [
                Encoded(ids, types, label)
                for ids, types, label in zip(encoded["input_ids"], encoded["token_type_ids"], labels, strict=True)
            ]
        out.append(collate(by_task, pad_id=0))
    return out


def methods(task_names: list[str]) -> dict[str, Balancer]:
    def weighting(name: str) -> object:
        return LOSS_WEIGHTINGS.build(name, injected={"task_names": task_names, "loss_weights": None, "seed": 0})

    out: dict[str, Balancer] = {"equal": Balancer(weighting("equal"))}  # type: ignore[arg-type]
    for name in LOSS_WEIGHTINGS.names():
        if name != "equal":
            out[f"loss: {name}"] = Balancer(weighting(name))  # type: ignore[arg-type]
    for source in ("representation", "parameters"):
        for name in GRADIENT_AGGREGATORS.names():
            factory = GRADIENT_AGGREGATORS.get(name)
            if source in getattr(factory, "sources", ()):
                aggregator = GRADIENT_AGGREGATORS.build(name, injected={"task_names": task_names, "seed": 0})
                out[f"{source}: {name}"] = Balancer(weighting("equal"), aggregator, source)  # type: ignore[arg-type]
    out["parameters: pcgrad (bf16 buffer)"] = Balancer(
        weighting("equal"),  # type: ignore[arg-type]
        GRADIENT_AGGREGATORS.build("pcgrad", injected={"task_names": task_names, "seed": 0}),
        "parameters",
        torch.bfloat16,
    )
    return out


def measure(args: argparse.Namespace, tasks: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model, tokenizer = build_model(args.model, tasks, device)
    task_names = [f"task{i}" for i in range(tasks)]
    balancers = methods(task_names)
    for balancer in balancers.values():
        if isinstance(balancer.weighting, torch.nn.Module):
            balancer.weighting.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    data = [b.to(device) for b in batches(tokenizer, tasks, args.rows, args.length, args.rounds + 1)]
    times: dict[str, list[float]] = {name: [] for name in balancers}
    for round_ in range(args.rounds + 1):  # round 0 warms up every method
        for name, balancer in balancers.items():
            batch = data[round_]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                balanced_backward(model, batch, balancer, step=round_)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ > 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "bert-base"], default="minilm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rows", type=int, default=8, help="rows per task per step")
    parser.add_argument("--length", type=int, default=64, help="max tokens per row")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/balancing_overhead.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {}
    for t in args.tasks:  # each task count is written as soon as it is measured: a cut-short run keeps it
        results[t] = measure(args, t, device)
        print(f"T={t}: " + ", ".join(f"{k} {v / results[t]['equal']:.2f}x" for k, v in results[t].items()), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "seconds": results}, indent=2) + "\n", encoding="utf-8"
        )
    args.tasks = list(results)
    header = (
        "| method | "
        + " | ".join(f"T={t} ratio" for t in args.tasks)
        + " | "
        + " | ".join(f"T={t} s/step" for t in args.tasks)
        + " |"
    )
    print(header)
    print("|---" * (1 + 2 * len(args.tasks)) + "|")
    for name in results[args.tasks[0]]:
        ratios = [f"{results[t][name] / results[t]['equal']:.2f}x" for t in args.tasks]
        seconds = [f"{results[t][name]:.3f}" for t in args.tasks]
        print(f"| {name} | " + " | ".join(ratios) + " | " + " | ".join(seconds) + " |")


if __name__ == "__main__":
    main()
