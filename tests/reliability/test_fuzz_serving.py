"""Property-based tests of the server: hostile requests on every route are answered below 500, every error
with a one-line JSON body.

Generated requests: raw bytes; JSON documents of any shape whose strings may hold lone UTF-16 surrogates
(escaped, as a JavaScript client sends them) and control characters, with NaN, infinities, huge numbers,
repeated keys, deep nesting; near-valid requests of each route with hostile records; each with a JSON,
foreign or missing content type and a good, wrong or missing token; against the routes of a run with a
classification and a token task and of a run with a generation task (streaming too), plus unknown paths and
wrong methods. Over real HTTP to `multitune serve` processes, so the HTTP layer is part of the test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.serving.conftest import TOKEN, generation_run, running_server, tiny_run

httpx = pytest.importorskip("httpx")

__all__ = ["generation_run", "tiny_run"]  # fixtures, imported for the servers below

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def servers(tiny_run: Path, generation_run: Path) -> Iterator[dict[str, Any]]:
    env = {"MULTITUNE_SERVE_TOKEN": TOKEN}
    with (
        running_server(tiny_run, "--max-inputs", "8", "--max-chars", "300", env=env) as tagging,
        running_server(generation_run, "--max-chars", "300", env=env) as generation,
        httpx.Client(timeout=60) as client,
    ):
        yield {"tagging": tagging, "generation": generation, "client": client}


ROUTES = {
    "tagging": [
        ("POST", "/v1/tasks/sentiment/predict"),
        ("POST", "/v1/tasks/ner/predict"),
        ("POST", "/v1/predict"),
        ("POST", "/v1/tasks/sentiment/generate"),
        ("POST", "/v1/tasks/nope/predict"),
        ("GET", "/v1/tasks"),
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
        ("PUT", "/v1/predict"),
        ("DELETE", "/v1/tasks/ner/predict"),
        ("POST", "/nope"),
        ("POST", "/v1/tasks/%ED%A0%80/predict"),
    ],
    "generation": [
        ("POST", "/v1/tasks/copy/generate"),
        ("POST", "/v1/tasks/copy/predict"),
        ("POST", "/v1/predict"),
        ("GET", "/v1/tasks"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/copy"),
        ("HEAD", "/v1/models"),
    ],
}
TASKS = ["sentiment", "ner", "copy", "nope", "\ud800", ""]

# text that is not text: lone surrogates (category Cs), control characters, the replacement character, NUL
hostile_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(categories=["Cs", "Cc", "Co", "Zs"]), max_size=10),
    st.sampled_from(["\ud800", "a\udfff", "\udc00\ud800", "\x00", "\ufffd", "[SEP]", "<|im_end|>", "", " "]),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\ud83d", " "]), st.integers(200, 400)),
)
numbers = st.one_of(
    st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -0.0])
)
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_text)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4), max_leaves=10
)
records = st.one_of(
    st.dictionaries(st.sampled_from(["text", "text_pair", "tokens", "input", "instruction", "x"]), values, max_size=3),
    st.fixed_dictionaries({"text": hostile_text}),
    st.fixed_dictionaries({"tokens": st.lists(hostile_text, max_size=6)}),
    values,
)
requests = st.one_of(
    st.fixed_dictionaries({"input": records}),
    st.fixed_dictionaries({"input": records, "stream": st.one_of(st.booleans(), values)}),
    st.fixed_dictionaries({"inputs": st.lists(records, max_size=10)}),
    st.fixed_dictionaries(
        {"inputs": st.lists(st.fixed_dictionaries({"task": st.sampled_from(TASKS), "input": records}), max_size=10)}
    ),
    values,
)


@st.composite
def shaped(draw: Any, path: str) -> Any:
    """A request of the shape `path` reads, with hostile text where its records hold text."""
    record = draw(
        st.one_of(
            st.fixed_dictionaries({"text": hostile_text}),
            st.fixed_dictionaries({"text": hostile_text, "text_pair": hostile_text}),
            st.fixed_dictionaries({"tokens": st.lists(hostile_text, min_size=1, max_size=6)}),
            st.fixed_dictionaries({"input": hostile_text, "instruction": hostile_text}),
            records,
        )
    )
    if path == "/v1/predict":
        task = draw(st.sampled_from(TASKS))
        return {
            "inputs": [
                {"task": task, "input": record},
                *draw(st.lists(st.just({"task": task, "input": record}), max_size=2)),
            ]
        }
    if path.endswith("/generate"):
        return {"input": record, "stream": draw(st.booleans())}
    if path.endswith("completions"):  # OpenAI's shapes, the model a task or not, hostile text and settings
        settings = {
            "model": draw(st.sampled_from([*TASKS, "base"])),
            "stream": draw(st.one_of(st.booleans(), values)),
            **draw(st.dictionaries(st.sampled_from(["max_tokens", "stop", "n", "temperature"]), values, max_size=2)),
        }
        if path.endswith("/chat/completions"):
            roles = st.sampled_from(["user", "system", "assistant", "tool", "nobody"])
            message = st.fixed_dictionaries({"role": roles, "content": st.one_of(hostile_text, values)})
            return {**settings, "messages": draw(st.lists(message, max_size=4))}
        return {**settings, "prompt": draw(st.one_of(hostile_text, values))}
    return draw(st.sampled_from([{"input": record}, {"inputs": [record, record]}]))


@st.composite
def bodies(draw: Any, path: str) -> bytes:
    kinds = ["shaped", "shaped", "shaped", "request", "bytes", "nested", "mutated", "constants"]
    kind = draw(st.sampled_from(kinds))
    if kind == "bytes":
        return bytes(draw(st.binary(max_size=200)))
    if kind == "nested":  # deep enough for the parser's recursion limit, or just short of it
        depth = draw(st.integers(1, 5000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = opener * depth + "1" + closer * depth
        return ('{"input": {"text": ' + inner + "}}").encode()
    document = draw(shaped(path) if kind in ("shaped", "mutated") else requests)
    # ensure_ascii: a lone surrogate travels as its \ud800 escape, as JSON.stringify writes it (else as the
    # three bytes a careless encoder writes, which are not UTF-8); allow_nan: NaN and Infinity, which Python
    # reads but JSON does not have
    text = json.dumps(document, ensure_ascii=draw(st.booleans()), allow_nan=True)
    if kind == "constants":
        text = text.replace("null", draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "null"])), 1)
    if kind == "mutated" and text:
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "\\ud800", '"', "}", ",", "\\", '"a": 1, "a": 2'])) + text[cut:]
    return text.encode("utf-8", "surrogatepass")


good_type, good_token = st.just("application/json"), st.just(f"Bearer {TOKEN}")  # most requests: to the routes
content_types = st.one_of(
    good_type,
    good_type,
    good_type,
    st.sampled_from(
        [
            "application/json; charset=utf-8",
            "application/problem+json",
            "application/json; charset=utf-16",
            "text/plain",
            "application/x-www-form-urlencoded",
            None,
            "x/y;;;charset",
        ]
    ),
)
tokens = st.one_of(good_token, good_token, good_token, st.sampled_from([None, "Bearer nope", "Basic x", "Bearer  x"]))


@FUZZ
@given(
    server=st.sampled_from(["tagging", "generation"]),
    route=st.integers(0, 50),
    data=st.data(),
    content_type=content_types,
    token=tokens,
)
def test_hostile_requests_get_a_4xx_and_one_json_line_on_every_route(servers, server, route, data, content_type, token):
    method, path = ROUTES[server][route % len(ROUTES[server])]
    body = data.draw(bodies(path), label="body")
    headers = {}
    if content_type is not None:
        headers["content-type"] = content_type
    if token is not None:
        headers["authorization"] = token
    response = servers["client"].request(method, servers[server] + path, content=body, headers=headers)
    assert response.status_code < 500, (method, path, body[:200], response.text[:300])
    event(f"HTTP {response.status_code}")
    if method == "HEAD":  # a GET's headers, no body
        assert response.content == b"", response.content[:200]
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.status_code == 200
        return
    if path == "/docs":
        return
    assert response.headers.get("content-type") == "application/json", (path, response.text[:200])
    document = response.json()
    if response.status_code >= 400:
        detail = document["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail, document
