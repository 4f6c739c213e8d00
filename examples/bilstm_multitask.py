"""A model trained from scratch: one word embedding and BiLSTM encoder shared by a sentiment head and a
topic head, through `multitune.fit`.

No pretrained weights: the vocabulary is built from the training sentences of both tasks, and the shared
encoder (a 100-wide embedding, a one-layer BiLSTM of 128 units each way) learns from the two tasks together.
Each head reads the mean of the BiLSTM's outputs over the real tokens (the padding mask travels with the
inputs):

- sentiment: SST-2 (positive / negative movie-review phrases), 4,000 training sentences, tested on the GLUE
  dev set (872). Read from the shared data folder beside the project (`--sst2 DIR`, a folder holding
  `train_full.tsv` and `dev.tsv`, tab-separated `sentence<TAB>label` with a header): that data is not
  bundled, so a user without it points `--sst2` at a file pair of their own in that format.
- topic: TREC question types (6 coarse classes: abbreviation, entity, description, person, location,
  number), the 5,452 training questions bundled with multitune, tested on its 500 test questions.

Run: `.venv/bin/python examples/bilstm_multitask.py [--steps N] [--sst2 DIR] [--seed S]` (offline; about a minute on
2 CPU cores). It prints each task's test score next to a single-task model of the same shape trained on that
task alone for as many examples.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from multitune import Task, fit
from multitune.config import package_path

SEED = 13
MAX_TOKENS = 40
VOCABULARY = 20_000
ROOT = Path(__file__).resolve().parents[1]


class BiLSTMEncoder(nn.Module):
    """Token ids [B, L] and their mask [B, L] -> token features [B, L, 2·hidden] (zero at padding)."""

    def __init__(self, vocabulary: int, width: int = 100, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width, padding_idx=0)
        self.lstm = nn.LSTM(width, hidden, batch_first=True, bidirectional=True)

    def forward(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        lengths = attention_mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        features, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return features


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+|[^\sa-z0-9']", text.lower())


class Vocabulary:
    """The most frequent words of the training sentences; 0 pads, 1 stands for any other word."""

    def __init__(self, sentences: list[str], size: int = VOCABULARY) -> None:
        counts = Counter(word for sentence in sentences for word in words(sentence))
        self.ids = {word: i + 2 for i, (word, _) in enumerate(counts.most_common(size - 2))}

    def __len__(self) -> int:
        return len(self.ids) + 2

    def encode(self, sentences: list[str]) -> dict[str, np.ndarray]:
        ids = np.zeros((len(sentences), MAX_TOKENS), dtype=np.int64)
        for row, sentence in enumerate(sentences):
            tokens = [self.ids.get(word, 1) for word in words(sentence)][:MAX_TOKENS] or [1]
            ids[row, : len(tokens)] = tokens
        return {"ids": ids, "attention_mask": (ids != 0).astype(np.int64)}


def read_sst2(folder: Path, rows: int, seed: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """(train sentences, train labels, test sentences, test labels): `rows` seeded training rows, the dev set."""

    def read(path: Path) -> tuple[list[str], list[str]]:
        with path.open(encoding="utf-8", newline="") as handle:
            table = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        return [r["sentence"] for r in table], ["positive" if r["label"] == "1" else "negative" for r in table]

    sentences, labels = read(folder / "train_full.tsv")
    pick = np.random.default_rng(seed).permutation(len(sentences))[:rows]
    test_sentences, test_labels = read(folder / "dev.tsv")
    return [sentences[i] for i in pick], [labels[i] for i in pick], test_sentences, test_labels


def read_trec(split: str) -> tuple[list[str], list[str]]:
    lines = package_path(f"quickstart/trec/{split}.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r["text"] for r in records], [r["label"] for r in records]


def tasks(sst2: Path, seed: int = SEED) -> tuple[list[Task], int]:
    """The two tasks on one vocabulary, and the vocabulary's size."""
    sentiment_train, sentiment_labels, sentiment_test, sentiment_test_labels = read_sst2(sst2, 4000, seed)
    topic_train, topic_labels = read_trec("train")
    topic_test, topic_test_labels = read_trec("test")
    vocabulary = Vocabulary(sentiment_train + topic_train)
    built = [
        Task(
            "sentiment",
            "classification",
            (vocabulary.encode(sentiment_train), np.array(sentiment_labels)),
            test=(vocabulary.encode(sentiment_test), np.array(sentiment_test_labels)),
        ),
        Task(
            "topic",
            "classification",
            (vocabulary.encode(topic_train), np.array(topic_labels)),
            test=(vocabulary.encode(topic_test), np.array(topic_test_labels)),
            metrics=["accuracy", "macro_f1"],
        ),
    ]
    return built, len(vocabulary)


def main() -> None:
    parser = argparse.ArgumentParser(description="multitune.fit on an embedding + BiLSTM trained from scratch")
    parser.add_argument("--steps", type=int, default=1200, help="joint training steps (default 1200)")
    parser.add_argument("--sst2", type=Path, default=ROOT.parent / "shared" / "data" / "sst2")
    parser.add_argument("--seed", type=int, default=SEED, help=f"the SST-2 sample and training seed ({SEED})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    both, size = tasks(args.sst2, args.seed)
    settings = {"batch_size": 32, "lr": 2e-3, "eval_every": 200, "seed": args.seed, "progress": False}
    torch.manual_seed(args.seed)
    joint = fit(BiLSTMEncoder(size), both, steps=args.steps, **settings)
    print(f"{'task':10}{'metric':10}{'multi-task':>11}{'single-task':>12}{'Δ':>8}")
    for task in both:
        seen = joint.metrics["task_rows"][task.name]
        torch.manual_seed(args.seed)
        alone = fit(BiLSTMEncoder(size), [task], steps=math.ceil(seen / 32), **settings)
        multi, single = joint.metrics["tasks"][task.name], alone.metrics["tasks"][task.name]
        print(
            f"{task.name:10}{multi['main_metric']:10}{multi['main_score']:>11.4f}{single['main_score']:>12.4f}"
            f"{multi['main_score'] - single['main_score']:>+8.4f}"
        )
    print(f"{args.steps} joint steps; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
