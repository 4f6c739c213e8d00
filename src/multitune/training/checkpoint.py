"""Atomic file writes (write, fsync, rename), model weights as safetensors, and training checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multitune.errors import MultitunError

WEIGHTS_FILE = "model.safetensors"


def write_failure(error: Exception) -> str:
    """One line saying why a write failed. safetensors and torch.save report a full disk or an I/O error as
    their own exception types (SafetensorError, RuntimeError), not OSError, so every exception raised while
    writing counts as a failed write."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return first[:300]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over `path`."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        tmp = Path(temporary)
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:  # an interrupt too leaves no temporary file behind
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(error, Exception):
            raise MultitunError(f"cannot write: {write_failure(error)}", file=str(path)) from None
        raise


def write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def save_weights(weights: nn.Module | dict[str, Any], path: Path) -> None:
    """A model's weights, or a state dict of whole tensors (a sharded model's, gathered), as safetensors."""
    atomic_write(path, lambda tmp: _write_weights(weights, tmp))


def _write_weights(weights: nn.Module | dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file, save_model

    if isinstance(weights, nn.Module):
        save_model(weights, str(path))
    else:
        save_file(weights, str(path))


def load_weights(model: nn.Module, path: Path, sharded: bool = False) -> None:
    """Weights saved by save_weights into `model`. `sharded`: copy tensor by tensor, each cut to this process's
    shard where the backbone is sharded across processes (FSDP), and into the model's own storage where its
    weights are views into one flat buffer (DeepSpeed ZeRO), which safetensors' load_model refuses."""
    from safetensors.torch import load_file, load_model

    from multitune.training.distributed import load_full_state_dict

    try:
        if sharded:
            missing, unexpected = load_full_state_dict(model, load_file(str(path)))
        else:
            missing, unexpected = load_model(model, str(path), strict=False)
    except FileNotFoundError:
        raise MultitunError("weights file not found", file=str(path)) from None
    if missing or unexpected:
        raise MultitunError(
            f"weights do not match the model (missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})",
            file=str(path),
        )


# --- training checkpoints -----------------------------------------------------------------------

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
PARTIAL = ".partial"
DISCARDED = ".discarded"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


def _fsync_dir(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_checkpoint(
    run_dir: Path, step: int, weights: nn.Module | dict[str, Any], trainer_state: dict[str, Any], keep: int
) -> Path:
    """checkpoints/step-NNNNNNN/{model.safetensors, trainer.pt}: written into a hidden folder, fsynced,
    then renamed into place, so a checkpoint either exists whole or not at all. Keeps the newest `keep`."""
    import torch

    root = run_dir / CHECKPOINTS
    final = root / f"{PREFIX}{step:08d}"
    partial = root / f".{final.name}{PARTIAL}"
    try:
        root.mkdir(exist_ok=True)
        if partial.exists():
            _remove_checkpoint(partial)
        partial.mkdir()
        _write_weights(weights, partial / WEIGHTS_FILE)
        torch.save(trainer_state, partial / "trainer.pt")
        for file in partial.iterdir():
            _fsync_file(file)
        _fsync_dir(partial)
        if final.exists():  # the same step saved again (e.g. on a signal right after a periodic save)
            _discard_checkpoint(final)
        os.replace(partial, final)
        _fsync_dir(root)
    except Exception as error:
        try:  # a full disk: give the space back, keep the earlier checkpoints
            if partial.exists():
                _remove_checkpoint(partial)
        except OSError:
            pass  # a leftover partial folder is hidden, and the next run's start removes it
        raise MultitunError(f"cannot write checkpoint: {write_failure(error)}", file=str(final)) from None
    done = checkpoint_dirs(run_dir)
    # A checkpoint after this step belongs to an abandoned timeline (resume skipped it as unloadable): were it
    # kept, pruning would delete the newer good ones in its place and a later resume could pick it up.
    later = [c for c in done if c.name > final.name]
    for old in later + [c for c in done if c.name <= final.name][:-keep]:
        _discard_checkpoint(old)
    return final


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a partial one is hidden and never listed)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    import torch

    return torch.load(checkpoint / "trainer.pt", weights_only=True, map_location="cpu")  # type: ignore[no-any-return]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files load; a damaged one is skipped."""
    from safetensors import safe_open

    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        try:
            load_trainer_state(checkpoint)
            with safe_open(str(checkpoint / WEIGHTS_FILE), framework="pt") as weights:
                weights.keys()
        except Exception:  # any failure to read means "not loadable": try the next older one
            continue
        return checkpoint
    return None


def _remove_checkpoint(path: Path) -> None:
    """Delete one checkpoint folder of ours (its files are flat; nothing else is ever deleted)."""
    for file in path.iterdir():
        file.unlink()
    path.rmdir()


def _discard_checkpoint(path: Path) -> None:
    """Retire a complete checkpoint atomically: rename it to a hidden name first, so a crash while its
    files are being deleted never leaves a listed checkpoint with files missing."""
    doomed = path.with_name(f".{path.name}{DISCARDED}")
    if doomed.exists():
        _remove_checkpoint(doomed)
    os.replace(path, doomed)
    _fsync_dir(path.parent)
    _remove_checkpoint(doomed)


def remove_leftovers(run_dir: Path) -> None:
    """After a crash: drop our half-written temporary files and partial checkpoints (names we made)."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for leftover in [*root.glob(f".{PREFIX}*{PARTIAL}"), *root.glob(f".{PREFIX}*{DISCARDED}")]:
            _remove_checkpoint(leftover)


def discard_staging(path: Path) -> None:
    """Delete a hidden staging folder of ours (made with tempfile next to its target and never renamed)."""
    import shutil

    if path.name.startswith(".") and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """torch's random state (and CUDA's, when available): what a checkpoint saves and a replay repeats."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
