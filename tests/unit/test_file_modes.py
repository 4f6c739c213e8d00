"""Files multitune writes follow the user's umask: a run, an export and the converted-model cache are as
shareable as the user's other files (umask 022: 0644 files, 0755 folders; umask 077: 0600 and 0700)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from multitune.cli import main
from tests.conftest import classification_rows, tiny_config, token_rows
from tests.serving.conftest import write_rows


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of every file and folder under root, by relative path."""
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode) for path in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_run_and_export_follow_the_umask(mask, tmp_path, tiny_backbone):
    a = write_rows(tmp_path / "a.jsonl", classification_rows(30))
    b = write_rows(tmp_path / "b.jsonl", token_rows(30))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=4, eval_every=2, checkpoint_every=2)
    config["model"]["peft"] = {"method": "lora", "r": 2}  # adapters are written too
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with umask(mask):
        assert main(["train", str(path)]) == 0
        run = tmp_path / "runs" / "tiny"
        assert main(["export", str(run), "--task", "sentiment", str(tmp_path / "out")]) == 0
    file_mode, folder_mode = 0o666 & ~mask, 0o777 & ~mask
    for root in (run, tmp_path / "out"):
        found = modes(root)
        assert {"model.safetensors", "README.md" if root.name == "out" else "report.html"} <= set(found)
        if root == run:  # checkpoints too, files and folders
            assert {"checkpoints/step-00000002", "checkpoints/step-00000004/model.safetensors"} <= set(found)
        wrong = {
            name: oct(mode)
            for name, mode in found.items()
            if mode != (folder_mode if (root / name).is_dir() else file_mode)
        }
        assert not wrong, f"not {oct(file_mode)} / {oct(folder_mode)} under umask {oct(mask)}: {wrong}"


def test_converted_copy_follows_the_umask(tmp_path, monkeypatch):
    """The once-converted causal LM cache (GGUF dequantized to safetensors): a tiny LM stands in for the GGUF."""
    import transformers

    from multitune.models import causal_lm
    from tests.generation.conftest import build_tiny_causal_lm

    tiny = build_tiny_causal_lm(tmp_path / "tiny-lm")
    for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = auto.from_pretrained

        def from_gguf(folder, *args, original=original, gguf_file=None, **kwargs):  # the tiny model instead
            return original(str(tiny), *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", from_gguf)
    monkeypatch.setenv("MULTITUNE_CACHE", str(tmp_path / "cache"))
    with umask(0o022):
        folder = causal_lm.converted_copy("org/tiny", tmp_path / "tiny-lm" / "model.gguf")
    found = modes(folder)
    assert "model.safetensors" in found and "config.json" in found
    assert {name: oct(mode) for name, mode in found.items() if mode != (0o755 if name == "." else 0o644)} == {}
