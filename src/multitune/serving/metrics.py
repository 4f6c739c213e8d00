"""GET /metrics: what the server does, in Prometheus' text exposition format (through prometheus_client),
so that an operator's Prometheus scrapes it like any other service.

- `multitune_requests_total{route, method, status}`: responses sent, by route template (e.g.
  `/v1/tasks/{task}/predict`, so the label set stays small; `unmatched` for a path no route has), method
  (`other` for one that HTTP does not define) and status;
- `multitune_request_duration_seconds{route}`: a histogram of the time from a request's arrival to the end
  of its response (a streamed answer included);
- `multitune_queue_depth`: the requests waiting for an inference batch now;
- `multitune_batch_rows` and `multitune_batch_duration_seconds`: histograms of the rows and the seconds of
  each inference batch.

Each app has its own registry (no process-wide state), so several servers in one process count apart.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from multitune.serving.batcher import MicroBatcher

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# the `method` label's values (RFC 9110's methods and PATCH); any other is counted as "other", so a client
# sending made-up methods cannot add series without end
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


class ServerMetrics:
    """The server's counters, gauges and histograms, in a registry of its own."""

    def __init__(self, batcher: MicroBatcher) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "multitune_requests",
            "HTTP responses sent, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "multitune_request_duration_seconds",
            "Seconds from a request's arrival to the end of its response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        queue = Gauge("multitune_queue_depth", "Requests waiting for an inference batch", registry=self.registry)
        queue.set_function(lambda: batcher.depth)
        self.batch_rows = Histogram(
            "multitune_batch_rows", "Rows per inference batch", buckets=ROW_BUCKETS, registry=self.registry
        )
        self.batch_seconds = Histogram(
            "multitune_batch_duration_seconds",
            "Seconds each inference batch took",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        batcher.observers.append(self.observe_batch)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountRequests:
    """ASGI middleware (outermost, so it sees every response, the guards' refusals included) counting each
    response by the route template that matched and timing it."""

    def __init__(self, app: Any, metrics: ServerMetrics, templates: Callable[[], Iterable[str]] | None = None) -> None:
        self.app, self.metrics, self.templates = app, metrics, templates
        self._compiled: list[tuple[re.Pattern[str], str]] | None = None

    def template(self, scope: dict[str, Any]) -> str:
        """The route template that matched, or (a request refused before routing, e.g. by the body guard) the
        first of `templates` (the OpenAPI document's paths, in route order) its path fits; `unmatched` for a
        path no route has."""
        found = getattr(scope.get("route"), "path", None)
        if found is not None:
            return str(found)
        if self.templates is None:
            return "unmatched"
        if self._compiled is None:
            from starlette.routing import compile_path

            self._compiled = [(compile_path(path)[0], path) for path in self.templates()]
        path = str(scope.get("path", ""))
        return next((template for pattern, template in self._compiled if pattern.match(path)), "unmatched")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]  # what the client sees if the app fails before it starts a response

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = self.template(scope)
            method = scope.get("method", "")  # any token is a valid HTTP method: unknown ones share a label
            method = method if method in HTTP_METHODS else "other"
            self.metrics.requests.labels(route, method, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
