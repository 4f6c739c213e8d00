"""Property-based: `multitune predict` and `multitune serve` accept and refuse exactly the same prediction
records, naming the same record and field in the same words, for a task of every type and input shape.

Each task's input is written out here by hand, from its type and config (not read from multitune): its
accepted spellings (the task's own field names, then the generic ones), whether it takes a list of words,
its optional fields and its label field (which a record may keep). A generated record is good, or has one
fault: a field missing, a value that is not text (or not a list of words), an empty or blank text or word,
an empty word list, a field that is not an input (also one of the other spelling), a bad instruction. The
expected outcome follows from that description alone: the first faulty record and its field, or answers.
Records go in lists of one to three, to `multitune predict` as JSON lines and to the server's per-task route
(`inputs` or `input`) or `/v1/predict`, over real HTTP.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from multitune.cli import main
from tests.serving.conftest import generation_run, pair_run, running_server, tiny_run

httpx = pytest.importorskip("httpx")

__all__ = ["generation_run", "pair_run", "tiny_run"]  # fixtures, imported for the servers below

ANY_FIELD = "<the same in both>"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


@dataclass(frozen=True)
class Spec:
    run: str  # which fixture run holds the task
    spellings: tuple[tuple[str, ...], ...]  # the task's own names first
    words: bool = False
    optional: tuple[str, ...] = ()
    label: str | None = None


SPECS = {
    "sentiment": Spec("tiny", (("text",),), label="label"),  # classification, default field
    "ner": Spec("tiny", (("tokens",),), words=True, label="tags"),  # token_classification
    "similarity": Spec("pair", (("text", "text_pair"),)),  # regression on TSV columns 1 and 2: generic names
    "entail": Spec("pair", (("premise", "hypothesis"), ("text", "text_pair")), label="gold"),  # pair task
    "topic": Spec("pair", (("sentence",), ("text",)), label="label"),  # classification, a named field
    "copy": Spec("generation", (("text",), ("input",)), optional=("instruction",), label="target"),
}


@pytest.fixture(scope="module")
def servers(tiny_run: Path, pair_run: Path, generation_run: Path) -> Iterator[dict[str, Any]]:
    with (
        running_server(tiny_run) as tiny,
        running_server(pair_run) as pair,
        running_server(generation_run) as generation,
        httpx.Client(timeout=60) as client,
    ):
        yield {
            "url": {"tiny": tiny, "pair": pair, "generation": generation},
            "run": {"tiny": tiny_run, "pair": pair_run, "generation": generation_run},
            "client": client,
        }


# text with at least one character that is not white space (no lone surrogates: the JSON layers refuse them
# before any record is read, each in its own words; tests/serving/test_hostile.py covers that)
letters = st.characters(exclude_categories=["Cs"])
good_text = st.one_of(
    st.sampled_from(["john", "a good movie", "paris", "the dog runs", "é", "[SEP]", "\u200b", "x\x00y"]),
    st.text(letters, min_size=1, max_size=20).filter(lambda t: t.strip() != ""),
)
blank_text = st.one_of(st.just(""), st.text(st.sampled_from(" \t\n\r\u3000\xa0\u2003"), min_size=1, max_size=4))
not_text_nor_null = st.one_of(
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.just("a"), max_size=2),
    st.just({"a": "b"}),
)
not_text = st.none() | not_text_nor_null
words = st.lists(good_text, min_size=1, max_size=6)
label_values = st.one_of(st.sampled_from(["pos", "neg", 3, 2.5, None, ["O", "O"]]), good_text)


@st.composite
def record(draw: Any, spec: Spec) -> tuple[dict[str, Any], str | None]:
    """A record and the field its one fault is in (None: a good record)."""
    spelling = draw(st.sampled_from(spec.spellings))
    values: dict[str, Any] = {name: draw(words if spec.words else good_text) for name in spelling}
    if spec.label is not None and draw(st.booleans()):
        values[spec.label] = draw(label_values)
    for name in spec.optional:
        if draw(st.booleans()):
            values[name] = draw(st.one_of(good_text, blank_text, st.none()))
    fault = draw(st.sampled_from(["none", "none", "missing", "type", "blank", "unknown", "other", "word", "option"]))
    target = draw(st.sampled_from(spelling))
    if fault == "missing":
        del values[target]
        event("fault: missing")
        present = [name for s in spec.spellings for name in s if name in values]
        if not present:  # none of the inputs: the task's own first field is named
            return values, spec.spellings[0][0]
        chosen = max(spec.spellings, key=lambda s: sum(name in values for name in s))
        return values, next(name for name in chosen if name not in values)
    if fault == "type":
        if spec.words:  # anything but a list: a number, null, a whole sentence...
            values[target] = draw(not_text.filter(lambda v: not isinstance(v, list)) | good_text)
        else:
            values[target] = draw(not_text)
        event("fault: not text")
        return values, target
    if fault == "blank":
        values[target] = [] if spec.words else draw(blank_text)
        event("fault: blank")
        return values, target
    if fault == "word" and spec.words:
        word = draw(st.one_of(blank_text, not_text))
        position = draw(st.integers(0, len(values[target])))
        values[target] = [*values[target][:position], word, *values[target][position:]]
        event("fault: bad word")
        return values, target
    if fault == "unknown":
        allowed = {n for s in spec.spellings for n in s} | set(spec.optional) | {spec.label}
        name = draw(
            st.one_of(st.text(letters, max_size=8), st.text(letters, min_size=38, max_size=60)).filter(
                lambda n: n not in allowed
            )
        )
        values[name] = draw(st.one_of(good_text, not_text))
        event("fault: unknown field")
        # a key that is empty, long or holds a line break is named escaped and cut, the same way by both
        return values, name if name.isprintable() and 0 < len(name) <= 40 else ANY_FIELD
    if fault == "other" and len(spec.spellings) > 1:  # fields of both spellings: the own one is read
        other = next(s for s in spec.spellings if s != spelling)
        for name in other:
            values[name] = draw(words if spec.words else good_text)
        complete = next(s for s in spec.spellings if all(n in values for n in s))
        event("fault: two spellings")
        return values, next(n for n in values if n not in complete and n not in spec.optional and n != spec.label)
    if fault == "option" and spec.optional:
        values[spec.optional[0]] = draw(not_text_nor_null)
        event("fault: bad instruction")
        return values, spec.optional[0]
    event("good record")
    return values, None


@st.composite
def requests(draw: Any) -> tuple[str, list[dict[str, Any]], int | None, str | None, str]:
    """A task, its records, the index and field of the first faulty one, and the route to send them by."""
    task = draw(st.sampled_from(sorted(SPECS)))
    drawn = draw(st.lists(record(SPECS[task]), min_size=1, max_size=3))
    bad = next(((i, field) for i, (_, field) in enumerate(drawn) if field is not None), (None, None))
    route = draw(st.sampled_from(["inputs", "mixed"] + (["input"] if len(drawn) == 1 else [])))
    return task, [r for r, _ in drawn], bad[0], bad[1], route


def predict(run: Path, task: str, records: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]], str]:
    with tempfile.TemporaryDirectory() as folder:
        source, out = Path(folder) / "in.jsonl", Path(folder) / "out.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["predict", str(run), "--task", task, "--input", str(source), "--output", str(out)])
        lines = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
        return code, [json.loads(line) for line in lines], err.getvalue().replace(str(source), "in.jsonl")


def same_answer(served: dict[str, Any], predicted: dict[str, Any]) -> None:
    if "probabilities" in predicted:
        assert served["probabilities"] == pytest.approx(predicted["probabilities"], abs=1e-4)
        top = sorted(predicted["probabilities"].values())
        if top[-1] - top[-2] > 1e-3:  # not a near tie that batching noise could flip
            assert served["prediction"] == predicted["prediction"]
    elif isinstance(predicted["prediction"], float):
        assert served["prediction"] == pytest.approx(predicted["prediction"], abs=1e-4)
        assert served.get("raw") == pytest.approx(predicted.get("raw"), abs=1e-4)
    else:
        assert served["prediction"] == predicted["prediction"]


@FUZZ
@given(request=requests())
def test_predict_and_serve_accept_and_refuse_the_same_records(servers, request):
    task, records, bad_index, bad_field, route = request
    spec = SPECS[task]
    code, predicted, err = predict(servers["run"][spec.run], task, records)
    url = servers["url"][spec.run]
    if route == "mixed":
        response = servers["client"].post(
            f"{url}/v1/predict", json={"inputs": [{"task": task, "input": r} for r in records]}
        )
    else:
        body = {"input": records[0]} if route == "input" else {"inputs": records}
        response = servers["client"].post(f"{url}/v1/tasks/{task}/predict", json=body)
    if bad_index is None:
        assert code == 0, err
        assert response.status_code == 200, response.text
        served = response.json()["predictions"]
        assert len(served) == len(predicted) == len(records)
        for got, want, given_record in zip(served, predicted, records, strict=True):
            same_answer(got, want)
            assert {k: v for k, v in want.items() if k in given_record} == given_record  # passed through
        return
    assert code == 2 and predicted == [], err
    line = err.strip()
    assert "\n" not in line and line.startswith(f"multitune: error: in.jsonl:{bad_index + 1}: ")
    named = line.removeprefix(f"multitune: error: in.jsonl:{bad_index + 1}: ")
    if bad_field != ANY_FIELD:
        assert named.startswith(f"field '{bad_field}': ")
    assert response.status_code == 422, response.text
    place = {"input": "input", "inputs": f"inputs[{bad_index}]", "mixed": f"inputs.{bad_index}.input"}[route]
    assert response.json()["detail"] == f"{place}: {named}"
