"""history.jsonl's line format, written once for its writer and its readers.

A training line (one with `losses`) carries each task's loss weight (`weights`) and sampling probability
(`probabilities`) only where they changed since the last line that carried them: with 300 tasks and a
fixed weighting or sampler these two mappings would otherwise repeat 300 unchanged numbers on every line.
A reader fills them back in (`filled`), so every training line it returns holds both again. Lines of a
later stage (`"stage": "finetune"`) carry their own values, never an earlier stage's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CARRIED = ("weights", "probabilities")  # per-task mappings written only when they change


def is_training_line(entry: dict[str, Any]) -> bool:
    """A loop's training log line (losses, weights, probabilities...), not a validation or an event."""
    return isinstance(entry.get("losses"), dict)


class HistoryLines:
    """The writer's side: entries in, lines out, each carried mapping left out where it repeats the last
    line's. `seen` takes the lines already in the file (a resumed run appends after them)."""

    def __init__(self) -> None:
        self._last: dict[tuple[Any, str], Any] = {}

    def line(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The line to write for `entry` (a new dict; the entry itself is unchanged)."""
        if not is_training_line(entry):
            return entry
        out = dict(entry)
        for key in CARRIED:
            if key not in entry:
                continue
            slot = (entry.get("stage"), key)
            if slot in self._last and self._last[slot] == entry[key]:
                del out[key]
            else:
                self._last[slot] = entry[key]
        return out

    def seen(self, lines: Iterable[dict[str, Any]]) -> None:
        """Lines already written (read back from the file): their carried values are the last ones."""
        for entry in lines:
            if is_training_line(entry):
                for key in CARRIED:
                    if key in entry:
                        self._last[(entry.get("stage"), key)] = entry[key]


def filled(lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reader's side: each training line with the carried mappings it left out put back (the last
    values of its stage); other lines as they are."""
    last: dict[tuple[Any, str], Any] = {}
    out = []
    for entry in lines:
        if is_training_line(entry):
            entry = dict(entry)
            for key in CARRIED:
                slot = (entry.get("stage"), key)
                if key in entry:
                    last[slot] = entry[key]
                elif slot in last:
                    entry[key] = last[slot]
        out.append(entry)
    return out


def read_history(path: Path) -> list[dict[str, Any]]:
    """history.jsonl's entries (JSON objects), filled (see `filled`); a torn line (a crash mid-write) or
    anything but an object is skipped. A missing file has no entries."""
    entries = []
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return filled(entries)
