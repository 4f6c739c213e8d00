"""The HTTP layer's guards, in front of every route: the bearer token a path needs checked before its body is
read (Access), the whole request body read within a time and a size (RequestGuard), refused as JSON unless it
is a JSON object of valid text, a HEAD answered as its GET without the body, and uvicorn's connections bounded
in number and in how long their headers may take (guarded_protocol). Every refusal is JSON like every route's."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from multitune.runs.layout import _json_kind
from multitune.serving.settings import ServeSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_BODY_METHODS = ("POST", "PUT", "PATCH")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a lone surrogate can get into a UTF-8 body
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Access:
    """The bearer token each path needs: under /v1/admin the admin token (where admin routes are on), the rest
    of /v1 and the API's description (/docs, /openapi.json: they name every task and label) the serving token
    (where one is set); /healthz and /metrics none."""

    token: str | None = None
    admin_token: str | None = None

    def needed(self, path: str) -> str | None:
        if self.admin_token is not None and _under(path, "/v1/admin"):
            return self.admin_token
        if _under(path, "/v1") or path in ("/docs", "/openapi.json"):
            return self.token
        return None

    def problem(self, path: str, authorization: bytes | None) -> str | None:
        """Why a request for `path` with this Authorization header may not pass (one line), or None. The
        token is compared as the bytes that were sent with the bytes that were set (UTF-8), in constant time."""
        expected = self.needed(path)
        if expected is None:
            return None
        scheme, _, given = (authorization or b"").partition(b" ")
        if authorization is None or scheme.lower() != b"bearer":
            return "missing bearer token: send 'Authorization: Bearer <token>'"
        if not hmac.compare_digest(given, expected.encode("utf-8", "surrogateescape")):
            return "wrong bearer token: send 'Authorization: Bearer <token>'"
        return None


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def route_path(scope: Scope) -> str:
    """The path the routes match: the request's path less the app's mount point (`root_path`: uvicorn's
    --root-path, or an app mounted inside another), as Starlette's router takes it off before matching."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path


class RequestGuard:
    """ASGI middleware in front of every route. It answers a HEAD as the GET of that path with no body, and
    refuses a request without the bearer token its path needs (401, `access`) before reading any of its body.
    It then reads the whole body within `body_timeout` seconds (else 408) and at most `limit` bytes (else
    413), and refuses a body the routes could not read as text: not declared JSON (415), not UTF-8, not JSON,
    not an object, nested past the parser or holding a lone UTF-16 surrogate (422). The routes then only ever
    see valid text from an allowed caller; every refusal is JSON."""

    def __init__(self, app: Any, limit: int, body_timeout: float = 30.0, access: Access | None = None) -> None:
        self.app, self.limit, self.body_timeout = app, limit, body_timeout
        self.access = access or Access()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "HEAD":  # the routes are GETs; the server itself sends no body for a HEAD
            scope, send = {**scope, "method": "GET"}, _headers_only(send)
        headers = dict(scope.get("headers", []))
        refused = self.access.problem(route_path(scope), headers.get(b"authorization"))
        if refused is not None:  # a body, if any, stays unread: the connection cannot carry another request
            has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
            await refuse(send, 401, refused, close=has_body, extra=[(b"www-authenticate", b"Bearer")])
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await refuse(send, 413, f"request body over {self.limit} bytes", close=True)
            return
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                detail = f"request body not received within {self.body_timeout:g} s"
                await refuse(send, 408, detail, close=True)
                return
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await refuse(send, 413, f"request body over {self.limit} bytes", close=True)
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if body and scope.get("method") in JSON_BODY_METHODS:
            problem = json_problem(headers.get(b"content-type", b"").decode("latin-1"), body)
            if problem is not None:
                await refuse(send, *problem)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def json_problem(content_type: str, body: bytes) -> tuple[int, str] | None:
    """Why `body` is not a JSON object of valid text, as (status, one line); None when it is."""
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        got = f"'{media[:80]}'" if media else "no content type"
        return 415, f"send the body as JSON with 'Content-Type: application/json' (got {got})"
    charset = re.search(r"charset\s*=\s*\"?([^\";\s]+)", parameters, re.IGNORECASE)
    if charset and charset.group(1).lower().replace("_", "-") not in ("utf-8", "utf8"):
        return 415, f"a JSON body is UTF-8 text, not {charset.group(1)[:40]}"
    try:
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        return 422, f"body: not UTF-8 text (byte 0x{body[error.start]:02x} at offset {error.start})"
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique)
    except json.JSONDecodeError as error:
        return 422, f"body: not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
    except RecursionError:
        return 422, "body: not valid JSON here: nested too deeply"
    except ValueError as error:
        return 422, f"body: not valid JSON: {error}"
    if not isinstance(value, dict):
        return 422, f"body: a JSON object is expected, not {_json_kind(value)}"
    if SURROGATE_ESCAPE.search(body):
        where = lone_surrogate(value)
        if where is not None:
            return 422, f"{where}: holds a lone UTF-16 surrogate, which is not text (send characters as UTF-8)"
    return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object without repeated keys: JSON parsers disagree on which of two values wins, so none does."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the key {json.dumps(key)[:60]} appears twice in one object")
            seen.add(key)
    return value


def lone_surrogate(value: Any) -> str | None:
    """Where in `value` (a parsed JSON document) a key or string holds a lone surrogate: `inputs.0.input.text`."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return where or "body"
        elif isinstance(item, dict):
            for key, inner in item.items():
                place = f"{where}.{key}" if where else key
                if SURROGATE.search(key):
                    return f"{where or 'body'} (a key)"
                stack.append((place, inner))
        elif isinstance(item, list):
            stack.extend((f"{where}.{i}" if where else str(i), inner) for i, inner in enumerate(item))
    return None


def error_body(status: int, detail: str, close: bool = False) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the request is not read: the connection cannot carry another one
        headers.append((b"connection", b"close"))
    return body, headers


def _headers_only(send: Send) -> Send:
    """`send` with every body part dropped (one empty last part kept): a HEAD's answer, headers as the GET's."""

    async def headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body"):
                return
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(message)

    return headers_only


async def refuse(
    send: Send, status: int, detail: str, close: bool = False, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body, headers = error_body(status, detail, close)
    headers += extra or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def raw_response(status: int, detail: str) -> bytes:
    """A whole HTTP/1.1 error response with a JSON body, for the connection layer (no request to answer)."""
    body, headers = error_body(status, detail, close=True)
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
    return head + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body


def guarded_protocol(settings: ServeSettings) -> type[asyncio.Protocol]:
    """uvicorn's h11 connection with the bounds uvicorn lacks: the request headers must arrive within
    `header_timeout` seconds (uvicorn waits forever for a request that never completes, so half-open and
    trickling connections pile up), at most `max_connections` are open, and its own 400 for a request that
    is not HTTP is JSON like every other error. The request body's bound is RequestGuard's."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > settings.max_connections:
                detail = f"the server has {settings.max_connections} connections open; retry shortly"
                self._close_with(503, detail)
                return
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._close_with(400, "not a valid HTTP request")

        def _watch_headers(self) -> None:
            """Start the clock while a request's headers are awaited (the first time only: trickling bytes do
            not restart it); stop it once they are in."""
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self.header_timer is None:
                self.header_timer = self.loop.call_later(settings.header_timeout, self._headers_late)
            elif not waiting:
                self._stop_header_timer()

        def _stop_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_late(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._close_with(408, f"request headers not received within {settings.header_timeout:g} s")

        def _close_with(self, status: int, detail: str) -> None:
            self._stop_header_timer()
            self._unset_keepalive_if_required()
            if not self.transport.is_closing():
                self.transport.write(raw_response(status, detail))
                self.transport.close()

    return GuardedH11Protocol
