"""Atomic file writes (write, fsync, rename), with the temporary paths made inside a run directory
recorded first, so a crash's leftovers are known as ours (training/checkpoint.py removes them)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from multitune.errors import MultitunError


def write_failure(error: Exception) -> str:
    """One line saying why a write failed. safetensors and torch.save report a full disk or an I/O error as
    their own exception types (SafetensorError, RuntimeError), not OSError, so every exception raised while
    writing counts as a failed write."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return first[:300]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over `path`. The file gets
    the mode a plain open gives (0666 less the user's umask), not mkstemp's 0600, also when the writer
    replaces the temporary file with one of its own (safetensors does): a run is as shareable as the
    user's other files."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while tmp is None:  # a fresh name, created exclusively (as mkstemp does)
            candidate = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
            try:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                continue
            tmp = candidate
        mode = tmp.stat().st_mode & 0o777
        _record_if_tracked(tmp)
        write(tmp)
        tmp.chmod(mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:  # an interrupt too leaves no temporary file behind
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(error, Exception):
            raise MultitunError(f"cannot write: {write_failure(error)}", file=str(path)) from None
        raise


def new_folder(out: str | Path) -> Path:
    """`out` resolved, checked to be a folder that a write may create: absent, or an empty folder. Raises
    MultitunError (one line naming it) otherwise, or when the path cannot even be looked at (too long...)."""
    try:
        target = Path(out).resolve()
        taken = target.exists() and (not target.is_dir() or any(target.iterdir()))
    except OSError as error:
        raise MultitunError(f"cannot use this folder: {write_failure(error)}", file=str(out)) from None
    if taken:
        raise MultitunError("the output folder exists and is not empty: choose a new one", file=str(target))
    return target


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A new hidden folder beside `target` to write into; renamed onto `target` (absent or empty) when the
    body ends, removed when it fails. A failed write (the disk full, the folder not writable) is one
    MultitunError naming `target`; nothing is left behind."""
    staging = target.parent / f".{target.name}.{os.urandom(6).hex()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # as a plain mkdir makes it (0777 less the umask), not mkdtemp's 0700: it is shared
    except OSError as error:
        raise MultitunError(f"cannot write: {write_failure(error)}", file=str(target)) from None
    try:
        yield staging
        os.replace(staging, target)  # atomic; replaces an empty target folder
    except OSError as error:
        written = [str(name) for name in (error.filename, error.filename2) if name]
        if written and not any(name.startswith((str(staging), str(target))) for name in written):
            raise  # a file read on the way (not one written here) failed: not a write failure
        raise MultitunError(f"cannot write: {write_failure(error)}", file=str(target)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; ignored when never made


def discard_folder(folder: Path) -> None:
    """Remove a folder this program made itself and gives up: a run folder whose writing failed."""
    shutil.rmtree(folder, ignore_errors=True)


def replace_folder(fresh: Path, target: Path) -> None:
    """Put the folder `fresh`, just written by this program, in the place of `target`, an earlier one it wrote
    (a comparison's merge by the same method): `target` is removed only now that `fresh` is complete."""
    shutil.rmtree(target, ignore_errors=True)
    fresh.rename(target)


def write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


SCRATCH = ".multitune-scratch"  # a run's record of the temporary paths made in it, one JSON string a line


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


def _fsync_dir(path: Path) -> None:
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


_TRACKED: set[Path] = set()  # run directories this process writes into: their temporary files are recorded


def _record(run_dir: Path, path: Path) -> None:
    """Note a temporary path just made inside `run_dir`, before anything is written into it: if this process
    dies, the next one knows the path as ours. A lost note (power loss) only leaves the path behind."""
    with open(run_dir / SCRATCH, "a", encoding="utf-8") as record:
        record.write(json.dumps(os.path.relpath(path, run_dir)) + "\n")


def _record_if_tracked(path: Path) -> None:
    resolved = path.resolve()
    for run_dir in _TRACKED:
        if resolved.is_relative_to(run_dir):
            _record(run_dir, resolved)
            return


def track(run_dir: Path) -> None:
    """From now on, record every temporary file and folder this process makes inside `run_dir`."""
    _TRACKED.add(run_dir.resolve())


def untrack(run_dir: Path) -> None:
    _TRACKED.discard(run_dir.resolve())


WEIGHTS_FILE = "model.safetensors"
