"""Continuous batching against whole batches: generations arriving over time on SmolLM2-135M-Instruct with a
LoRA adapter per task, served by one inference thread the two ways, side by side in one process.

- whole batches (the server before continuous batching): the generations waiting when the thread is free
  run as one batch to its end; every answer of that batch is sent when the batch ends, and the requests
  that arrived meanwhile wait for it;
- continuous: Engine.generate_many with `more` and `done`, as the server calls it: a generation that
  arrives joins the running batch between two steps, and each answer is sent as soon as its row ends.

Requests arrive at seeded exponential intervals (--rate per second), alternate between the two tasks and
ask up to --tokens new tokens each. Reports each way's latency (arrival to answer: mean, p50, p90, max),
the time until the last answer, and how many texts are the same both ways.

    python benchmarks/serve_continuous.py --requests 16 --rate 2 --tokens 32 \
        --out benchmarks/results/serve_continuous.json
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_generation_batch import PROMPTS, trained_run

from multitune.serving.engine import Asked, Engine


def serve(engine: Engine, asked: list[Asked], arrivals: list[float], continuous: bool) -> dict[str, Any]:
    """Serve `asked` (arriving at `arrivals` seconds) on this thread; each one's (answer second, text)."""
    waiting = collections.deque(range(len(asked)))
    answered: dict[int, tuple[float, Any]] = {}
    index = {id(item): k for k, item in enumerate(asked)}
    start = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - start

    def arrived(room: int, accept: Callable[[Asked], bool] = lambda _: True) -> list[Asked]:
        taken: list[Asked] = []
        while waiting and len(taken) < room and arrivals[waiting[0]] <= now() and accept(asked[waiting[0]]):
            taken.append(asked[waiting.popleft()])
        return taken

    def done(item: Asked, text: Any) -> None:
        answered[index[id(item)]] = (now(), text)

    while waiting:
        if arrivals[waiting[0]] > now():
            time.sleep(arrivals[waiting[0]] - now())
        first = arrived(engine.batch_size)
        if continuous:
            engine.generate_many(first, lambda accept, room: arrived(room, accept), done)
        else:
            texts = engine.generate_many(first)
            ended = now()  # the batch's answers are sent together, when it ends
            for item, text in zip(first, texts, strict=True):
                answered[index[id(item)]] = (ended, text)
    latencies = [answered[k][0] - arrivals[k] for k in range(len(asked))]
    return {
        "latency_mean": statistics.fmean(latencies),
        "latency_p50": percentile(latencies, 50),
        "latency_p90": percentile(latencies, 90),
        "latency_max": max(latencies),
        "last_answer_seconds": max(at for at, _ in answered.values()),
        "texts": [answered[k][1] for k in range(len(asked))],
    }


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (exponential gaps)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    arrivals, at = [], 0.0
    for _ in range(args.requests):
        arrivals.append(at)
        at += rng.expovariate(args.rate)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(trained_run(Path(tmp)), batch_size=args.batch_size)
        tasks = list(engine.tasks)

        def requests() -> list[Asked]:
            return [
                Asked(task, engine.encode(task, [{"input": PROMPTS[k % len(PROMPTS)]}])[0], None, args.tokens)
                for k in range(args.requests)
                for task in [tasks[k % len(tasks)]]
            ]

        engine.generate_many(requests()[:1])  # warm-up
        whole = serve(engine, requests(), arrivals, continuous=False)
        continuous = serve(engine, requests(), arrivals, continuous=True)
    same = sum(a == b for a, b in zip(whole.pop("texts"), continuous.pop("texts"), strict=True))
    result = {
        "requests": args.requests,
        "rate_per_second": args.rate,
        "max_new_tokens": args.tokens,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "whole_batches": whole,
        "continuous": continuous,
        "same_text": same,
        "mean_latency_ratio": continuous["latency_mean"] / whole["latency_mean"],
        "p90_latency_ratio": continuous["latency_p90"] / whole["latency_p90"],
    }
    for name, figures in (("whole batches", whole), ("continuous", continuous)):
        print(
            f"{name}: latency mean {figures['latency_mean']:.2f} s, p50 {figures['latency_p50']:.2f}, "
            f"p90 {figures['latency_p90']:.2f}, max {figures['latency_max']:.2f}; "
            f"last answer at {figures['last_answer_seconds']:.2f} s"
        )
    print(
        f"continuous / whole: mean latency {result['mean_latency_ratio']:.2f}x, "
        f"p90 {result['p90_latency_ratio']:.2f}x; "
        f"{same} of {args.requests} texts the same both ways"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
