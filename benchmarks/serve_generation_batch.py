"""Generations served together as one batch against one after another, on SmolLM2-135M-Instruct with a LoRA
adapter per task (the server's two ways: Engine.generate_many over all of them, and each alone).

Trains a two-step run with two generation tasks (per-task LoRA on the frozen LM; the adapters' weights do not
matter here, only their cost), then asks it N generations of alternating tasks, each up to --tokens new
tokens, in the same process: one after another (what the server did before), then all in one call. Reports
new tokens per second each way and checks that both give the same texts.

    python benchmarks/serve_generation_batch.py --requests 8 --tokens 32 \
        --out benchmarks/results/serve_generation_batch.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from multitune.cli import main as cli
from multitune.serving.engine import Asked, Engine, Watch

PROMPTS = [
    "Write one sentence about a dog that runs in the park.",
    "Name three colours of the rainbow.",
    "What is the capital of France? Answer in a sentence.",
    "Describe the sea in a few words.",
    "Give a short reason to learn a second language.",
    "Say hello to a new colleague.",
    "Explain what a bicycle is to a child.",
    "List two fruits that are yellow.",
]


def trained_run(folder: Path) -> Path:
    rows = [{"input": f"say {word}", "output": word} for word in ("yes", "no", "maybe", "sure") * 4]
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    task = {
        "type": "generation",
        "source": {"format": "jsonl", "train": str(data)},
        "text_fields": ["input"],
        "label_field": "output",
        "max_new_tokens": 64,
        "metrics": ["exact_match"],
    }
    config = {
        "run": {"name": "gen-batch", "output_dir": str(folder / "runs"), "seed": 13},
        "model": {"backbone": "HuggingFaceTB/SmolLM2-135M-Instruct", "max_length": 128, "peft": {"method": "lora"}},
        "training": {"steps": 2, "batch_size": 4, "eval_every": 2, "progress": False, "eval_batch_size": 32},
        "tasks": {"first": task, "second": dict(task)},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert cli(["train", str(path)]) == 0
    return folder / "runs" / "gen-batch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(trained_run(Path(tmp)))
        tasks = list(engine.tasks)
        asked = [
            Asked(
                tasks[i % len(tasks)],
                engine.encode(tasks[i % len(tasks)], [{"input": PROMPTS[i % len(PROMPTS)]}])[0],
                None,
                args.tokens,
            )
            for i in range(args.requests)
        ]
        engine.generate_many(asked[:1])  # warm-up
        alone_seconds, together_seconds = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            alone = [engine.generate_one(item.task, item.row, None, item.max_new_tokens) for item in asked]
            alone_seconds.append(time.perf_counter() - started)
            watches = [Watch() for _ in asked]  # each counts its row's new tokens
            counted = [
                Asked(item.task, item.row, watch, item.max_new_tokens)
                for item, watch in zip(asked, watches, strict=True)
            ]
            started = time.perf_counter()
            together = engine.generate_many(counted)
            together_seconds.append(time.perf_counter() - started)
        new_tokens = sum(watch.tokens for watch in watches)
        same = sum(a == b for a, b in zip(alone, together, strict=True))  # greedy: equal unless a near-tie flips
    alone_best, together_best = min(alone_seconds), min(together_seconds)
    result = {
        "requests": args.requests,
        "max_new_tokens": args.tokens,
        "torch_threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "same_text": same,
        "one_after_another_seconds": alone_best,
        "batched_seconds": together_best,
        "speedup": alone_best / together_best,
    }
    print(
        f"{args.requests} generations of up to {args.tokens} tokens: one after another {alone_best:.2f} s, "
        f"batched {together_best:.2f} s ({alone_best / together_best:.2f}x); {new_tokens} new tokens; "
        f"{same} of {args.requests} texts the same both ways"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
