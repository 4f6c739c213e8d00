"""Trained tiny runs and a real `multitune serve` process to talk to over loopback HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from multitune.cli import main
from tests.conftest import classification_rows, tiny_config, token_rows

TOKEN = "s3cret-token"


def write_rows(path: Path, rows: list[Any]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train(folder: Path, config: dict[str, Any]) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0
    return Path(config["run"]["output_dir"]) / config["run"]["name"]


@pytest.fixture(scope="session")
def tiny_run(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tasks (classification + token tagging) on the tiny BERT, trained 6 steps."""
    folder = tmp_path_factory.mktemp("serve-run")
    a = write_rows(folder / "sentiment.jsonl", classification_rows(60))
    b = write_rows(folder / "ner.jsonl", token_rows(60))
    return train(folder, tiny_config(tiny_backbone, a, b, folder / "runs"))


@pytest.fixture(scope="session")
def generation_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generation task (copy the input) on a tiny causal LM, trained 2 steps."""
    return trained_generation_run(tmp_path_factory, None)


@pytest.fixture(scope="session")
def prefix_generation_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """generation_run with only a per-task prefix trained on the frozen LM (generation continues its cache)."""
    return trained_generation_run(tmp_path_factory, {"method": "prefix", "virtual_tokens": 4})


def trained_generation_run(tmp_path_factory: pytest.TempPathFactory, peft: dict | None) -> Path:
    import torch

    from tests.generation.conftest import build_tiny_causal_lm, copy_rows

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gen-run")
    lm = build_tiny_causal_lm(folder / "lm")
    data = write_rows(folder / "copy.jsonl", copy_rows(30))
    config = {
        "run": {"name": "gen", "output_dir": str(folder / "runs"), "seed": 3},
        "model": {"backbone": str(lm), "max_length": 48},
        "training": {"steps": 2, "batch_size": 4, "lr": 1e-3, "eval_every": 2, "progress": False},
        "tasks": {
            "copy": {
                "type": "generation",
                "source": {"format": "jsonl", "train": str(data)},
                "label_field": "target",
                "instruction": "translate",
                "metrics": ["exact_match"],
                "max_new_tokens": 6,
            }
        },
    }
    if peft is not None:
        config["model"]["peft"] = peft
        config["training"]["lr"] = 5e-2
    return train(folder, config)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_server(run: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`multitune serve RUN` in its own process; yields its base URL once /healthz answers."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "multitune", "serve", str(run), "--port", str(port), *extra]
    process = subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the server exited: {process.stdout.read() if process.stdout else ''}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the server did not start in 60 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def similarity_rows(n: int, seed: int = 0) -> list[list[str]]:
    """STS-B-like headerless TSV rows (score 0-5, sentence, sentence): the score grows with shared words."""
    import random

    from tests.conftest import WORDS

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        first = [rng.choice(WORDS[:30]) for _ in range(rng.randint(3, 7))]
        shared = i % 6  # 0..5 words of the first sentence reappear in the second
        second = first[:shared] + [rng.choice(WORDS[30:]) for _ in range(3)]
        rows.append([str(float(shared)), " ".join(first), " ".join(second)])
    return rows


@pytest.fixture(scope="session")
def pair_run(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs of every shape but tokens on the tiny BERT, trained 6 steps: `similarity`, a regression on a
    sentence pair read from a headerless TSV by column index (as STS-B: its inputs are `text` and
    `text_pair`); `entail`, a pair_classification with named fields; `topic`, a classification whose one
    text field has its own name."""
    folder = tmp_path_factory.mktemp("pair-run")
    similarity = folder / "similarity.tsv"
    similarity.write_text("".join("\t".join(row) + "\n" for row in similarity_rows(48)), encoding="utf-8")
    entail = write_rows(
        folder / "entail.jsonl",
        [
            {"premise": r["text"], "hypothesis": "good" if r["label"] == "pos" else "bad", "gold": r["label"]}
            for r in classification_rows(48, seed=1)
        ],
    )
    topic = write_rows(
        folder / "topic.jsonl", [{"sentence": r["text"], "label": r["label"]} for r in classification_rows(48, 2)]
    )
    config = {
        "run": {"name": "pairs", "output_dir": str(folder / "runs"), "seed": 3},
        "model": {"backbone": str(tiny_backbone), "max_length": 32},
        "training": {"steps": 6, "batch_size": 4, "lr": 1e-3, "eval_every": 3, "progress": False},
        "tasks": {
            "similarity": {
                "type": "regression",
                "source": {"format": "tsv", "header": False, "quoting": "none", "train": str(similarity)},
                "text_fields": [1, 2],
                "label_field": 0,
                "metrics": ["pearson", "spearman"],
            },
            "entail": {
                "type": "pair_classification",
                "source": {"format": "jsonl", "train": str(entail)},
                "text_fields": ["premise", "hypothesis"],
                "label_field": "gold",
            },
            "topic": {
                "type": "classification",
                "source": {"format": "jsonl", "train": str(topic)},
                "text_fields": ["sentence"],
            },
        },
    }
    return train(folder, config)
