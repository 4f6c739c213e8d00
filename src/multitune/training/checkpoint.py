"""Model weights as safetensors and training checkpoints, written through core/files.py's atomic writes.

Nothing is deleted by its name alone: a temporary file or folder made inside a run directory is recorded in
the run's scratch record (SCRATCH) before anything is written into it, and the cleanup after a crash deletes
exactly the recorded paths that still exist, so a user's own `.notes.tmp` or `.step-99.partial/` survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multitune.core.files import (
    SCRATCH,
    WEIGHTS_FILE,
    _fsync_dir,
    _fsync_file,
    _record_if_tracked,
    atomic_write,
    track,
    untrack,
    write_failure,
)
from multitune.errors import MultitunError


class NonFiniteWeights(MultitunError):
    """Weights holding NaN or infinity: a diverged run, never written as a model nor loaded as one."""

    exit_code = 1


def nonfinite_tensors(weights: nn.Module | dict[str, Any]) -> tuple[list[str], int]:
    """The names of the floating-point tensors holding a NaN or an infinity, and how many tensors there are."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return bad, len(tensors)


REFUSED = "refusing these weights"


def require_finite(
    weights: nn.Module | dict[str, Any], path: Path, doing: str, error: type[MultitunError] = NonFiniteWeights
) -> None:
    bad, total = nonfinite_tensors(weights)
    if bad:
        raise error(
            f"{doing}: {len(bad)} of {total} weight tensors hold NaN or infinity (first: {bad[0]}); the training "
            "diverged (is training.lr too large?)",
            file=str(path),
        )


def save_weights(weights: nn.Module | dict[str, Any], path: Path) -> None:
    """A model's weights, or a state dict of whole tensors (a sharded model's, gathered), as safetensors.
    Non-finite weights are refused: whatever picked them, they are no model."""
    require_finite(weights, path, "not saved")
    atomic_write(path, lambda tmp: _write_weights(weights, tmp))


def _write_weights(weights: nn.Module | dict[str, Any], path: Path) -> None:
    """safetensors replaces the file with a 0600 one of its own: the weights keep the mode a plain open
    gives (0666 less the user's umask), as checkpoints and every other file of a run do."""
    from safetensors.torch import save_file, save_model

    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666))
    mode = path.stat().st_mode & 0o777
    if isinstance(weights, nn.Module):
        save_model(weights, str(path))
    else:
        save_file(weights, str(path))
    path.chmod(mode)


def load_weights(model: nn.Module, path: Path, sharded: bool = False) -> None:
    """Weights saved by save_weights into `model`. `sharded`: copy tensor by tensor, each cut to this process's
    shard where the backbone is sharded across processes (FSDP), and into the model's own storage where its
    weights are views into one flat buffer (DeepSpeed ZeRO), which safetensors' load_model refuses."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    from multitune.training.distributed import load_full_state_dict

    try:
        if sharded:
            state = load_file(str(path))
            require_finite(state, path, REFUSED, MultitunError)
            missing, unexpected = load_full_state_dict(model, state)
        else:
            missing, unexpected = load_model(model, str(path), strict=False)
    except FileNotFoundError:
        raise MultitunError("weights file not found", file=str(path)) from None
    except SafetensorError as error:  # random bytes, an empty or cut-short file: one line, not a traceback
        raise MultitunError(
            f"not a readable safetensors file (damaged?): {write_failure(error)}", file=str(path)
        ) from None
    if missing or unexpected:
        raise MultitunError(
            f"weights do not match the model (missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})",
            file=str(path),
        )
    if not sharded:  # a model with NaN weights predicts nothing: no command serves, evaluates or exports one
        require_finite(model, path, REFUSED, MultitunError)


# --- training checkpoints -----------------------------------------------------------------------

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
CHECKPOINT_NAME = re.compile(r"step-\d{8}")
CHECKPOINT_FILES = (WEIGHTS_FILE, "trainer.pt")  # all that a checkpoint folder of ours holds
PARTIAL = ".partial"
DISCARDED = ".discarded"


# --- what this process made, and may delete --------------------------------------------------------


@contextlib.contextmanager
def recording(run_dir: Path) -> Iterator[None]:
    """While a run writes into `run_dir`: record every temporary path made there; at the end, delete those
    this process left (none unless a write was cut short) and the record itself."""
    track(run_dir)
    try:
        yield
    finally:
        untrack(run_dir)
        remove_leftovers(run_dir)


def remove_leftovers(run_dir: Path) -> None:
    """After a crash: delete the temporary files and checkpoint folders a multitune process recorded in the
    run's scratch record and never finished; anything not recorded there is not ours and stays."""
    record = run_dir / SCRATCH
    try:
        lines = record.read_bytes().splitlines()
    except FileNotFoundError:
        return
    root = run_dir.resolve()
    for line in lines:
        try:
            relative = json.loads(line)
        except ValueError:
            continue  # a note torn by the crash: its path, if any, is left alone
        if not isinstance(relative, str):
            continue
        path = root / relative
        inside = path.resolve().is_relative_to(root) and path.resolve() != root
        if not inside or not path.name.startswith(".") or path.is_symlink():
            continue  # we only ever record hidden, plain paths inside the run
        if path.is_file():
            path.unlink()
        elif path.is_dir():
            _remove_checkpoint(path)
    record.unlink(missing_ok=True)


def save_checkpoint(
    run_dir: Path, step: int, weights: nn.Module | dict[str, Any], trainer_state: dict[str, Any], keep: int
) -> Path:
    """checkpoints/step-NNNNNNN/{model.safetensors, trainer.pt}: written into a hidden folder of a fresh name
    (in a tracked run recorded as ours first), fsynced, then renamed into place, so a checkpoint either exists
    whole or not at all. Keeps the newest `keep`. Non-finite weights are refused: the earlier ones stay."""
    import torch

    root = run_dir / CHECKPOINTS
    final = root / f"{PREFIX}{step:08d}"
    require_finite(weights, final, "checkpoint not written")
    partial: Path | None = None
    try:
        root.mkdir(exist_ok=True)
        partial = root / f".{final.name}.{os.urandom(6).hex()}{PARTIAL}"
        partial.mkdir()  # 0777 less the umask: mkdtemp's 0700 would hide checkpoints from whoever shares the run
        _record_if_tracked(partial)
        _write_weights(weights, partial / WEIGHTS_FILE)
        torch.save(trainer_state, partial / "trainer.pt")
        for name in CHECKPOINT_FILES:
            _fsync_file(partial / name)
        _fsync_dir(partial)
        if final.exists():  # the same step saved again (e.g. on a signal right after a periodic save)
            _discard_checkpoint(final)
        os.replace(partial, final)
        _fsync_dir(root)
    except Exception as error:
        try:  # a full disk: give the space back, keep the earlier checkpoints
            if partial is not None and partial.exists():
                _remove_checkpoint(partial)
        except OSError:
            pass  # a leftover partial folder is hidden; when recorded, the next run's start removes it
        raise MultitunError(f"cannot write checkpoint: {write_failure(error)}", file=str(final)) from None
    done = checkpoint_dirs(run_dir)
    # A checkpoint after this step belongs to an abandoned timeline (resume skipped it as unloadable): were it
    # kept, pruning would delete the newer good ones in its place and a later resume could pick it up.
    later = [c for c in done if c.name > final.name]
    for old in later + [c for c in done if c.name <= final.name][:-keep]:
        _discard_checkpoint(old)
    return final


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (folders named step-NNNNNNNN), oldest first; a partial one is hidden."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir())


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
    """Delete one checkpoint folder of ours: the files a checkpoint holds, then the folder if that empties it
    (a file someone else put there stays, with its folder)."""
    for name in CHECKPOINT_FILES:
        (path / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()


def _discard_checkpoint(path: Path) -> None:
    """Retire a complete checkpoint atomically: rename it to a fresh hidden name (recorded as ours) first, so
    a crash while its files are being deleted never leaves a listed checkpoint with files missing."""
    doomed = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=DISCARDED, dir=path.parent))
    _record_if_tracked(doomed)
    os.replace(path, doomed)  # onto the empty folder just made
    _fsync_dir(path.parent)
    _remove_checkpoint(doomed)


def remove_weights(folder: Path) -> None:
    """Delete a weights folder of ours (a two-stage copy that is not kept): its weights file, then the folder
    if that empties it (a file someone else put there stays, with its folder)."""
    (folder / WEIGHTS_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def discard_staging(path: Path) -> None:
    """Delete a hidden staging folder of ours (made with tempfile next to its target and never renamed)."""
    import shutil

    if path.name.startswith(".") and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
