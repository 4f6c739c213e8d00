"""Hostile requests and slow clients against the real server process: every refusal is a 4xx with a one-line
JSON body naming what is wrong and where; a fault of the server is a JSON 500; a connection that does not
deliver its headers or body in time gets a JSON 408 and is closed; one past the connection limit a 503."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multitune.cli import main
from tests.serving.conftest import TOKEN, running_server

httpx = pytest.importorskip("httpx")

AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {**AUTH, "content-type": "application/json"}
BOUND = 1.0  # seconds: the header and body timeouts of the slow-client server
PREDICT = "/v1/tasks/sentiment/predict"
HALF_OPEN = 500  # connections a slow client holds open at once


@pytest.fixture(scope="module")
def server(tiny_run: Path) -> Iterator[str]:
    bounds = ["--header-timeout", str(BOUND), "--body-timeout", str(BOUND), "--max-connections", str(HALF_OPEN + 50)]
    with running_server(tiny_run, *bounds, env={"MULTITUNE_SERVE_TOKEN": TOKEN}) as url:
        yield url


def one_line_json(response: Any) -> str:
    assert response.headers["content-type"] == "application/json", response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    return str(detail)


SURROGATE = b'"\\ud800"'  # valid JSON syntax, but a lone UTF-16 surrogate is no character: not text


# every route that reads a body, with a lone surrogate in each kind of place it can be
@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        (PREDICT, b'{"input": {"text": ' + SURROGATE + b"}}", "input.text:"),
        (PREDICT, b'{"inputs": [{"text": "ok"}, {"text": "a' + SURROGATE[1:] + b"}]}", "inputs.1.text:"),
        (PREDICT, b'{"input": {' + SURROGATE + b': "a"}}', "input (a key):"),
        ("/v1/tasks/ner/predict", b'{"input": {"tokens": ["a", ' + SURROGATE + b"]}}", "input.tokens.1:"),
        (
            "/v1/predict",
            b'{"inputs": [{"task": "sentiment", "input": {"text": ' + SURROGATE + b"}}]}",
            "inputs.0.input.text:",
        ),
        ("/v1/predict", b'{"inputs": [{"task": ' + SURROGATE + b', "input": {"text": "a"}}]}', "inputs.0.task:"),
        ("/v1/tasks/sentiment/generate", b'{"input": {"text": ' + SURROGATE + b"}}", "input.text:"),
        ("/v1/tasks/ner/predict", b'{"input": {"tokens": ["\\udfff\\ud800"]}}', "input.tokens.0:"),  # reversed pair
    ],
)
def test_lone_surrogates_are_a_422_naming_the_place(server, path, body, where):
    response = httpx.post(f"{server}{path}", content=body, headers=JSON)
    assert response.status_code == 422
    detail = one_line_json(response)
    assert detail.startswith(where) and "surrogate" in detail


def test_a_surrogate_pair_is_one_character_and_fine(server):
    emoji = httpx.post(f"{server}{PREDICT}", content=b'{"input": {"text": "good \\ud83d\\ude00"}}', headers=JSON)
    assert emoji.status_code == 200, emoji.text
    escaped = httpx.post(f"{server}{PREDICT}", content=b'{"input": {"text": "\\\\ud800"}}', headers=JSON)
    assert escaped.status_code == 200, escaped.text  # a backslash, then the letters "ud800": text


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [
        (b'{"input": {"text": "\xff"}}', JSON, 422, "body: not UTF-8 text (byte 0xff at offset 20)"),
        ('{"input": {"text": "é"}}'.encode("utf-16"), JSON, 422, "body: not UTF-8 text (byte 0xff at offset 0)"),
        (b"[" * 100_000, JSON, 422, "body: not valid JSON here: nested too deeply"),
        (b'{"input": {"text": ' + b"[" * 3000 + b"]" * 3000 + b"}}", JSON, 422, "nested too deeply"),
        (b"{not json", JSON, 422, "body: not valid JSON: Expecting property name enclosed in double quotes"),
        (b'{"input": {"text": NaN}}', JSON, 422, "body: not valid JSON: NaN is not a JSON number"),
        (b'{"input": {"text": -Infinity}}', JSON, 422, "-Infinity is not a JSON number"),
        (b'{"input": {"text": 1e999}}', JSON, 422, "body: not valid JSON: the number 1e999 is out of range"),
        (b'{"input": {"text": "a"}, "input": {"text": "b"}}', JSON, 422, 'the key "input" appears twice'),
        (b"[1, 2]", JSON, 422, "body: a JSON object is expected, not an array"),
        (b'"text"', JSON, 422, "body: a JSON object is expected, not a string"),
        (b"null", JSON, 422, "body: a JSON object is expected, not null"),
        (b"7", JSON, 422, "body: a JSON object is expected, not a number"),
        (b'{"input": {"text": "a"}}', {**AUTH, "content-type": "text/plain"}, 415, "(got 'text/plain')"),
        (b'{"input": {"text": "a"}}', AUTH, 415, "(got no content type)"),
        (b"input=a", {**AUTH, "content-type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
        (
            b'{"input": {"text": "a"}}',
            {**AUTH, "content-type": "application/json; charset=latin-1"},
            415,
            "a JSON body is UTF-8 text, not latin-1",
        ),
    ],
)
def test_bodies_that_are_not_a_json_object_of_text_are_refused_in_one_line(server, body, headers, status, words):
    for path in (PREDICT, "/v1/predict", "/v1/tasks/ner/generate"):
        response = httpx.post(f"{server}{path}", content=body, headers=headers)
        assert response.status_code == status, (path, response.text)
        assert words in one_line_json(response)


def test_json_media_types_and_a_bom_are_accepted(server):
    for kind in ("application/json; charset=utf-8", "application/json;charset=UTF-8", "application/vnd.x+json"):
        ok = httpx.post(
            f"{server}{PREDICT}", content=b'{"input": {"text": "a"}}', headers={**AUTH, "content-type": kind}
        )
        assert ok.status_code == 200, (kind, ok.text)
    bom = httpx.post(f"{server}{PREDICT}", content=b'\xef\xbb\xbf{"input": {"text": "a"}}', headers=JSON)
    assert bom.status_code == 200, bom.text


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/v1/tasks/sentiment/predict", 405),
        ("DELETE", "/healthz", 405),
        ("POST", "/v1/tasks", 405),
        ("PUT", "/v1/predict", 405),
        ("POST", "/v1/tasks/%ff%fe/predict", 404),
        ("POST", "/v1/tasks/%ED%A0%80/predict", 404),  # a surrogate, percent-encoded in the path
    ],
)
def test_unknown_paths_and_methods_are_json(server, method, path, status):
    response = httpx.request(method, f"{server}{path}", json={"input": {"text": "a"}}, headers=AUTH)
    assert response.status_code == status
    one_line_json(response)


def test_a_fault_of_the_server_is_a_json_500(tiny_run):
    from starlette.testclient import TestClient

    from multitune.serving.app import create_app
    from multitune.serving.engine import Engine

    engine = Engine(tiny_run)

    def broken(parts: Any, done: Any = None) -> Any:
        raise RuntimeError("a bug, with a\nmultiline message that must not leak")

    engine.run = broken  # type: ignore[method-assign]
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        response = client.post(PREDICT, json={"input": {"text": "a"}})
    assert response.status_code == 500
    assert one_line_json(response) == "internal error (RuntimeError); the server log has the details"


def test_a_non_ascii_token_is_compared_as_sent(tiny_run, monkeypatch):
    from starlette.testclient import TestClient

    from multitune.serving.app import ServeSettings, create_app
    from multitune.serving.engine import Engine

    token = "clé-✓"
    with TestClient(create_app(Engine(tiny_run), ServeSettings(token=token))) as client:
        sent = {"Authorization": b"Bearer " + token.encode()}  # the UTF-8 bytes a client sends
        assert client.get("/v1/tasks", headers=sent).status_code == 200
        assert client.get("/v1/tasks", headers={"Authorization": b"Bearer cl\xe9-x"}).status_code == 401


# --- slow clients -------------------------------------------------------------------------------------------


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (seconds from now)."""
    start = time.monotonic()
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {limit} s; got {data[:200]!r}")
    return data, time.monotonic() - start


def response_of(data: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body)


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connects, sends nothing
        b"POST /v1/tasks/sentiment/predict HTTP/1.1\r\nHost: x\r\n",  # half the headers
        b"G",
    ],
)
def test_headers_that_do_not_arrive_in_time_get_a_408_and_the_connection_closed(server, sent):
    with socket.create_connection(address(server)) as sock:
        sock.sendall(sent)
        data, took = read_until_closed(sock, BOUND + 5)
    assert BOUND * 0.8 <= took <= BOUND + 2
    status, body = response_of(data)
    assert status == 408 and body["detail"] == f"request headers not received within {BOUND:g} s"


def test_trickling_header_bytes_do_not_extend_the_bound(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100  # at 50 ms a byte: over 6 s
    data = b""
    with socket.create_connection(address(server)) as sock:
        start = time.monotonic()
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # the server closed it
                break
            if select.select([sock], [], [], 0.05)[0]:
                data, _ = read_until_closed(sock, 5)
                break
        took = time.monotonic() - start
    assert took <= BOUND + 2
    assert response_of(data)[0] == 408


def test_a_body_that_does_not_arrive_in_time_gets_a_408_and_the_connection_closed(server):
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with socket.create_connection(address(server)) as sock:
        sock.sendall(head.encode() + b'{"input": ')
        data, took = read_until_closed(sock, BOUND + 5)
    assert BOUND * 0.8 <= took <= BOUND + 2
    status, body = response_of(data)
    assert status == 408 and body["detail"] == f"request body not received within {BOUND:g} s"


def test_the_next_request_on_a_kept_alive_connection_is_bounded_too(server):
    with socket.create_connection(address(server)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        data, took = read_until_closed(sock, BOUND + 5)
    assert took <= BOUND + 2
    assert response_of(data)[0] == 408


def test_many_half_open_connections_are_all_dropped_within_the_bound(server):
    sockets = []
    try:
        start = time.monotonic()
        for _ in range(HALF_OPEN):
            sock = socket.create_connection(address(server))
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
            sockets.append(sock)
        for sock in sockets:
            read_until_closed(sock, BOUND + 10)
        assert time.monotonic() - start <= BOUND + 8
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.get(f"{server}/healthz").status_code == 200  # and the server still answers


def test_a_request_that_is_not_http_is_a_json_400(server):
    with socket.create_connection(address(server)) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data, _ = read_until_closed(sock, 5)
    status, body = response_of(data)
    assert status == 400 and "not a valid HTTP request" in body["detail"]


def test_connections_past_the_limit_get_a_json_503(tiny_run):
    with running_server(tiny_run, "--max-connections", "3") as url:
        held = [socket.create_connection(address(url)) for _ in range(3)]
        try:
            time.sleep(0.2)
            with socket.create_connection(address(url)) as extra:
                data, _ = read_until_closed(extra, 5)
            status, body = response_of(data)
            assert status == 503 and "3 connections open" in body["detail"]
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/healthz").status_code == 200  # below the limit again


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--header-timeout", "0"),
        ("--header-timeout", "nan"),
        ("--body-timeout", "-1"),
        ("--body-timeout", "inf"),
        ("--max-connections", "0"),
        ("--keep-alive", "0"),
        ("--max-inputs", "0"),
        ("--max-wait-ms", "-1"),
    ],
)
def test_a_bound_that_is_no_bound_is_refused_naming_the_option(tmp_path, capsys, option, value):
    assert main(["serve", str(tmp_path / "a-run"), option, value]) == 2  # refused before the run is read
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"field '{option}'" in err


# --- the token before the body; HEAD ----------------------------------------------------------------------------


def test_a_caller_without_the_token_gets_401_whatever_its_body(tiny_run):
    """The token is checked before the body is read: bad JSON, a wrong content type or a body over the limit
    from a caller without it is a 401, never the 422/415/413 that would tell it the routes' checks."""
    from starlette.testclient import TestClient

    from multitune.serving.app import ServeSettings, create_app
    from multitune.serving.engine import Engine

    settings = ServeSettings(token=TOKEN, max_body_bytes=1000)
    with TestClient(create_app(Engine(tiny_run), settings)) as client:
        for body, kind in (
            (b"{not json", "application/json"),
            (b"a=1", "text/plain"),
            (b"x" * 5000, "application/json"),
        ):
            response = client.post(PREDICT, content=body, headers={"content-type": kind})
            assert response.status_code == 401, (body[:10], response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert one_line_json(response).startswith("missing bearer token")
            wrong = client.post(PREDICT, content=body, headers={"content-type": kind, "authorization": "Bearer no"})
            assert wrong.status_code == 401 and one_line_json(wrong).startswith("wrong bearer token")
        # with the token, the body's own problems as before
        assert (
            client.post(PREDICT, content=b"{not json", headers={**AUTH, "content-type": "application/json"}).status_code
            == 422
        )
        assert (
            client.post(PREDICT, content=b"x" * 5000, headers={**AUTH, "content-type": "application/json"}).status_code
            == 413
        )
        assert (
            client.post(
                PREDICT, json={"input": {"text": "a"}}, headers={"authorization": f"bearer {TOKEN}"}
            ).status_code
            == 200
        )


def test_the_api_description_needs_the_token_and_health_does_not(tiny_run):
    """/docs and /openapi.json name every task and label, as /v1/tasks does: behind the token when one is set."""
    from starlette.testclient import TestClient

    from multitune.serving.app import ServeSettings, create_app
    from multitune.serving.engine import Engine

    with TestClient(create_app(Engine(tiny_run), ServeSettings(token=TOKEN))) as client:
        for path in ("/docs", "/openapi.json", "/v1/tasks", "/v1/models", "/v1"):
            assert client.get(path).status_code == 401, path
        assert client.get("/docs", headers=AUTH).status_code == 200
        assert "/v1/predict" in client.get("/openapi.json", headers=AUTH).json()["paths"]
        assert client.get("/v1", headers=AUTH).status_code == 404  # past the token: an unknown path
        for path in ("/healthz", "/metrics"):
            assert client.get(path).status_code == 200, path
        assert client.get("/nope").status_code == 404
    with TestClient(create_app(Engine(tiny_run))) as client:  # no token set: open
        assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200


def test_head_is_answered_as_get_without_a_body(tiny_run):
    from starlette.testclient import TestClient

    from multitune.serving.app import ServeSettings, create_app
    from multitune.serving.engine import Engine

    with TestClient(create_app(Engine(tiny_run), ServeSettings(token=TOKEN))) as client:
        for path, headers in (("/healthz", {}), ("/metrics", {}), ("/v1/tasks", AUTH), ("/openapi.json", AUTH)):
            got, head = client.get(path, headers=headers), client.head(path, headers=headers)
            assert head.status_code == got.status_code == 200, path
            assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], path
        assert int(client.head("/v1/tasks", headers=AUTH).headers["content-length"]) == len(
            client.get("/v1/tasks", headers=AUTH).content
        )
        assert client.head("/v1/tasks").status_code == 401  # the token rule as for GET
        assert client.head(PREDICT, headers=AUTH).status_code == 405  # a POST route has no GET to answer as


def test_the_token_holds_under_a_mount_point(tiny_run):
    """Served under a root path (uvicorn --root-path, or mounted in another app): the routes match the path
    less that prefix, and so does the token check (which once saw '/api/v1/tasks' as no /v1 route)."""
    from starlette.testclient import TestClient

    from multitune.serving.app import ServeSettings, create_app
    from multitune.serving.engine import Engine

    app = create_app(Engine(tiny_run), ServeSettings(token=TOKEN))
    with TestClient(app, root_path="/api") as client:
        for path in ("/api/v1/tasks", "/api/openapi.json", "/api/docs"):
            assert client.get(path).status_code == 401, path
        assert client.get("/api/v1/tasks", headers=AUTH).json()["tasks"]
        assert client.get("/api/healthz").status_code == 200
