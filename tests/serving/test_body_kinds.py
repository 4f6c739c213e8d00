"""A body that is JSON but not an object is refused naming what it is, in the words of the run's other checks
of JSON values (a record that is not an object, a damaged manifest): an empty string is named as one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from multitune.serving.guards import json_problem

JSON_TYPE = "application/json"


def kind(value: Any) -> str:
    """The expected words, written out by hand for each JSON type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if value == "" else "a string"
    assert isinstance(value, list)
    return "an array"


text = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)  # no lone surrogates: a separate refusal
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3))
not_objects = scalars | st.lists(documents, max_size=3)


@given(not_objects)
@example("")
@example([])
@example(False)
def test_a_body_that_is_not_an_object_is_named_by_its_kind(value):
    body = json.dumps(value).encode()
    assert json_problem(JSON_TYPE, body) == (422, f"body: a JSON object is expected, not {kind(value)}")


@given(st.dictionaries(text, documents, max_size=4))
def test_an_object_of_text_is_accepted(value):
    assert json_problem(JSON_TYPE, json.dumps(value).encode()) is None


def test_the_server_refuses_an_empty_string_body_naming_it(tiny_run: Path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from multitune.serving.app import create_app
    from multitune.serving.engine import Engine

    with TestClient(create_app(Engine(tiny_run))) as client:
        for path in ("/v1/tasks/sentiment/predict", "/v1/predict", "/v1/tasks/sentiment/generate"):
            response = client.post(path, content=b'""', headers={"content-type": JSON_TYPE})
            assert response.status_code == 422, path
            assert response.json() == {"detail": "body: a JSON object is expected, not an empty string"}, path
