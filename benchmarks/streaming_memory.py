"""Memory flat in the data: synthetic instruction mixtures of 10k, 100k and 1M rows across 10 and 300 tasks
(a folder of JSONL files, one per task, found by `discover`), trained a few steps on a tiny causal LM with
streamed train splits, beside the in-memory path. Each run is its own process; it records its peak RSS,
its time to the first step (from the process start: imports, reading, counting, tokenizing, building) and
its training steps per second in the middle half of the run (by when each step's history line appeared).
The in-memory and streamed runs on 10k rows are also compared step by step: with every task's rows inside
the shuffle buffer both draw the same rows, so their loss curves must agree.

    python benchmarks/streaming_memory.py --out benchmarks/results/streaming_memory.json [--sizes 10000,100000,1000000]

With `--read-ahead 0,64` each streamed case runs once reading in the loop and once with 64 rows per task
read and tokenized ahead on the reader thread (training.read_ahead), side by side: their losses must agree.
With `--tokenize-workers 0,2` each read-ahead case also runs with its rows tokenized by 2 worker processes
(training.tokenize_workers); the losses must agree too.

Nothing is downloaded: the data is generated here and the model is a 2-layer Llama with a word-level
tokenizer, built from a config.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from multitune.core.history import filled

WORDS = [f"w{i}" for i in range(400)]
CHILD = """
import json, resource, sys, threading, time
from pathlib import Path
started = time.perf_counter()
history = Path(sys.argv[2]) / "history.jsonl"
seen = {}  # history lines (one per step, log_every 1) -> when they were first there

def watch():  # only the bytes added since the last look: the file grows by a line of every task's values a step
    lines, handle = 0, None
    while not done.is_set():
        if handle is None and history.exists():
            handle = open(history, "rb")
        if handle is not None:
            lines += handle.read().count(b"\\n")
            seen.setdefault(lines, time.perf_counter() - started)
        time.sleep(0.005)

done = threading.Event()
threading.Thread(target=watch, daemon=True).start()
from multitune.cli import main
code = main(["train", sys.argv[1]])
done.set()
wall = time.perf_counter() - started
from multitune.recipe.session import peak_memory_bytes
import torch
peak = peak_memory_bytes(torch.device("cpu")) / 2**20  # this process's own high-water mark
# the largest tokenizing process, if any: an upper bound, since a forked worker's figure includes what it
# shared with this process when it was forked
worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"code": code, "wall_seconds": wall, "peak_rss_mb": peak, "worker_peak_rss_mb": worker, "seen": seen}))
"""


def build_model(folder: Path) -> Path:
    """A 2-layer, 64-wide Llama with a word-level tokenizer and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate([*special, *WORDS, "user", "assistant", "\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
        eos_token_id=vocab["<|im_end|>"], bos_token_id=vocab["<|im_start|>"],
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_mixture(folder: Path, rows: int, tasks: int, seed: int = 0) -> None:
    """`rows` training rows spread evenly over `tasks` JSONL files (folder/train/task_K.jsonl) and 20
    validation rows per task (folder/validation/): {"text": 8-24 words, "label": 2-6 words}."""
    rng = random.Random(seed)
    for split, per_task in (("train", None), ("validation", 20)):
        (folder / split).mkdir(parents=True)
        for task in range(tasks):
            n = per_task or rows // tasks + (task < rows % tasks)
            with open(folder / split / f"task_{task:03d}.jsonl", "w", encoding="utf-8") as out:
                for _ in range(n):
                    text = " ".join(rng.choices(WORDS, k=rng.randint(8, 24)))
                    label = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
                    out.write(json.dumps({"text": text, "label": label}) + "\n")


def config(
    data: Path, model: Path, out: Path, streaming: bool, steps: int, read_ahead: int = 64, workers: int = 0
) -> dict:
    source = {"format": "jsonl", "train": str(data / "train"), "validation": str(data / "validation")}
    if streaming:
        source["streaming"] = True
    return {
        "run": {"name": "run", "output_dir": str(out), "seed": 13},
        "model": {"backbone": str(model), "max_length": 64},
        "training": {
            "steps": steps, "batch_size": 8, "lr": 1e-3, "eval_every": steps, "eval_batch_size": 64,
            "log_every": 1, "progress": False, "checkpoint_every": None, "mixed_batches": True,
            "read_ahead": read_ahead, "tokenize_workers": workers,
        },
        "discover": {
            "source": source, "type": "generation", "defaults": {"max_new_tokens": 4, "metrics": ["exact_match"]}
        },
    }  # fmt: skip


def run(
    data: Path, model: Path, work: Path, streaming: bool, steps: int, read_ahead: int = 64, workers: int = 0
) -> dict:
    import yaml

    out = work / f"runs-{'streamed' if streaming else 'memory'}-{time.time_ns()}"
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config(data, model, out, streaming, steps, read_ahead, workers)), encoding="utf-8")
    child = [sys.executable, "-c", CHILD, str(path), str(out / "run")]
    done = subprocess.run(child, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    written = (out / "run" / "history.jsonl").read_text().splitlines()
    history = filled(json.loads(line) for line in written)
    trained = [(line, entry) for line, entry in zip(written, history, strict=True) if "losses" in entry]
    seen = {int(lines): at for lines, at in result.pop("seen").items()}
    first = min(at for lines, at in seen.items() if lines >= 1)  # the first step's line: everything before it
    # steady state: the steps between a quarter and three quarters of the run, by when their lines appeared
    low, high = steps // 4, 3 * steps // 4
    t_low = min(at for lines, at in seen.items() if lines >= low)
    t_high = min(at for lines, at in seen.items() if lines >= high)
    result.update(
        steps=metrics["steps"],
        first_step_seconds=first,  # process start to the first step: imports, reading, counting, building
        steps_per_second=(high - low) / (t_high - t_low),
        losses=[h["loss"] for h in history if "loss" in h],
        # a training line's size as written (weights and probabilities only where they changed), and the
        # same lines with them filled in: what a line held when every line carried them
        history_line_bytes=sum(len(line) + 1 for line, _ in trained) / len(trained),
        history_line_bytes_filled=sum(len(json.dumps(entry)) + 1 for _, entry in trained) / len(trained),
    )
    shutil.rmtree(out)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--tasks", default="10,300")
    parser.add_argument("--memory-sizes", default="10000,100000", help="row counts also run in memory")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--read-ahead", default="64", help="streamed runs: training.read_ahead values, each run")
    parser.add_argument("--tokenize-workers", default="0", help="streamed runs read ahead: training.tokenize_workers")
    args = parser.parse_args()
    aheads = [int(a) for a in args.read_ahead.split(",")]
    workers = [int(w) for w in args.tokenize_workers.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    memory_sizes = {int(s) for s in args.memory_sizes.split(",") if s}
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model = build_model(work / "model")
        write_mixture(work / "warm", 200, 2)  # one run first, not recorded: later runs find the imports cached
        run(work / "warm", model, work, True, 2)
        for tasks in (int(t) for t in args.tasks.split(",")):
            for rows in sizes:
                data = work / f"data-{rows}-{tasks}"
                started = time.perf_counter()
                write_mixture(data, rows, tasks)
                generated = time.perf_counter() - started
                size_mb = sum(f.stat().st_size for f in (data / "train").iterdir()) / 2**20
                cases = [(True, ahead, w) for ahead in aheads for w in workers if ahead or not w]
                cases += [(False, 0, 0)] * (rows in memory_sizes)
                for streaming, ahead, pool in cases:
                    result = run(data, model, work, streaming, args.steps, ahead, pool)
                    entry = {"rows": rows, "tasks": tasks, "streaming": streaming, "train_mb": round(size_mb, 1),
                             "read_ahead": ahead if streaming else None, "tokenize_workers": pool,
                             "generate_seconds": round(generated, 1), **result}  # fmt: skip
                    results.append(entry)
                    shown = {k: v for k, v in entry.items() if k != "losses"}
                    print(json.dumps(shown), flush=True)
                shutil.rmtree(data)
    same, ahead_same = {}, {}
    for tasks in {r["tasks"] for r in results}:
        pair = [r for r in results if r["tasks"] == tasks and r["rows"] == min(sizes)]
        if len(pair) >= 2:  # every run on the smallest mixture: streamed (each read-ahead) and in memory
            same[str(tasks)] = all(r["losses"] == pair[0]["losses"] for r in pair)
        for rows in sizes:
            streamed = [r for r in results if r["tasks"] == tasks and r["rows"] == rows and r["streaming"]]
            if len(streamed) >= 2:
                ahead_same[f"{tasks}x{rows}"] = all(r["losses"] == streamed[0]["losses"] for r in streamed)
    summary = {"same_losses_streamed_vs_memory": same, "same_losses_by_read_ahead": ahead_same}
    Path(args.out).write_text(json.dumps({"runs": results, **summary}, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
