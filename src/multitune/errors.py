"""User-facing errors: each prints as one line naming the file, line and field, and exits with code 2."""

from __future__ import annotations


class MultitunError(Exception):
    """An error in the user's input (config, data, arguments), not a bug in multitune."""

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = _one_line(self.file) if self.line is None else f"{_one_line(self.file)}:{self.line}"
        parts = [p for p in (where, f"field '{_one_line(self.field)}'" if self.field else "") if p]
        text = " ".join(self.message.split())  # always one line
        return f"{': '.join(parts)}: {text}" if parts else text


def _one_line(name: str) -> str:
    """A file or field name as it can be printed on one line: line breaks and other control characters
    escaped (a YAML key may hold any character)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)


class ConfigError(MultitunError):
    """A bad config key or value, or a bad command-line override."""


class DataError(MultitunError):
    """A bad data file, row or field."""
