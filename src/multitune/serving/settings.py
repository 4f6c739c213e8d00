"""The limits and batching of `multitune serve`, checked when they are set: a bound that is zero, negative or
not finite would be no bound at all."""

from __future__ import annotations

import math
from dataclasses import dataclass

from multitune.errors import ConfigError


@dataclass
class ServeSettings:
    """Limits and batching of the server (the `multitune serve` options)."""

    token: str | None = None  # when set, every /v1 route needs `Authorization: Bearer <token>`
    admin_token: str | None = None  # when set, /v1/admin/tasks loads and unloads tasks (with this bearer token)
    max_inputs: int = 64  # records per request
    max_chars: int = 10_000  # characters of text per record
    max_body_bytes: int = 2_000_000
    max_batch_rows: int = 64  # rows the batcher gathers for one Engine.run
    # how long a lone request waits for company; none by default: while a batch runs, the next one gathers by
    # itself, and a wait only adds latency below capacity (BENCHMARKS.md, offered loads)
    max_wait_ms: float = 0.0
    max_queue: int = 512  # requests waiting; more are refused with 503
    threads: int | None = None  # torch's CPU threads for inference (default: torch's own choice)
    # slow clients: a connection must deliver a request's headers within header_timeout seconds (of opening,
    # or of its first byte after a keep-alive wait) and its body within body_timeout seconds of the headers,
    # else it gets a 408 and is closed; connections beyond max_connections get a 503 and are closed
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 1000
    keep_alive: int = 30  # seconds an idle connection is kept open between requests

    def __post_init__(self) -> None:
        """A bound that is zero, negative or not finite is no bound (or refuses everything): refused by its
        `multitune serve` option."""
        at_least = {"max_wait_ms": 0.0}
        for name in (
            "max_inputs",
            "max_chars",
            "max_body_bytes",
            "max_batch_rows",
            "max_wait_ms",
            "max_queue",
            "threads",
            "header_timeout",
            "body_timeout",
            "max_connections",
            "keep_alive",
        ):
            value = getattr(self, name)
            if value is None and name == "threads":
                continue
            floor = at_least.get(name)
            fine = math.isfinite(value) and (value >= floor if floor is not None else value > 0)
            if not fine:
                need = "at least 0" if floor is not None else "above 0"
                raise ConfigError(f"must be a finite number {need}, not {value}", field="--" + name.replace("_", "-"))
