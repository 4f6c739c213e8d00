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
