"""Every task's input schema comes from its type and fields, and `multitune predict` and `multitune serve`
enforce it alike: an STS-B-like pair task given one text, a number or a blank text, an unknown field are
refused naming the field; /v1/tasks and /openapi.json show the real inputs; a regression answer is held to
the range of its training targets."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multitune.cli import main
from tests.serving.conftest import running_server, similarity_rows

httpx = pytest.importorskip("httpx")

PAIR = {"text": "john likes the movie", "text_pair": "john likes the film"}


@pytest.fixture(scope="module")
def server(pair_run: Path) -> Iterator[str]:
    with running_server(pair_run) as url:
        yield url


def predict(run: Path, task: str, records: list[Any], tmp_path: Path) -> tuple[int, list[dict[str, Any]], str]:
    """`multitune predict` on `records` (one JSON line each): exit code, output records, stderr."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out.unlink(missing_ok=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["predict", str(run), "--task", task, "--input", str(source), "--output", str(out)])
    lines = out.read_text(encoding="utf-8").splitlines() if out.exists() else []
    return code, [json.loads(line) for line in lines], err.getvalue()


def test_a_pair_task_given_one_text_is_refused_by_predict_and_serve(server, pair_run, tmp_path):
    """STS-B's inputs are columns 5 and 6 of a headerless TSV: a record gives them as text and text_pair.
    One text used to be scored as if it were a pair (1.78 on the real STS-B)."""
    code, out, err = predict(pair_run, "similarity", [PAIR, {"text": "john likes the movie"}], tmp_path)
    assert code == 2 and out == []
    expected = (
        "field 'text_pair': missing: task 'similarity' takes two texts, 'text' and 'text_pair' (the record has 'text')"
    )
    assert err.strip() == f"multitune: error: {tmp_path / 'in.jsonl'}:2: {expected}"

    alone = httpx.post(f"{server}/v1/tasks/similarity/predict", json={"inputs": [PAIR, {"text": PAIR["text"]}]})
    assert alone.status_code == 422 and alone.json()["detail"] == f"inputs[1]: {expected}"
    one = httpx.post(f"{server}/v1/tasks/similarity/predict", json={"input": {"text": PAIR["text"]}})
    assert one.status_code == 422 and one.json()["detail"] == f"input: {expected}"
    mixed = [{"task": "topic", "input": {"text": "a"}}, {"task": "similarity", "input": {"text": PAIR["text"]}}]
    many = httpx.post(f"{server}/v1/predict", json={"inputs": mixed})
    assert many.status_code == 422 and many.json()["detail"] == f"inputs.1.input: {expected}"

    # the whole pair: the same answer from both
    code, (predicted,), _ = predict(pair_run, "similarity", [PAIR], tmp_path)
    served = httpx.post(f"{server}/v1/tasks/similarity/predict", json={"input": PAIR}).json()["predictions"][0]
    assert code == 0 and served["prediction"] == pytest.approx(predicted["prediction"], abs=1e-6)


@pytest.mark.parametrize(
    ("task", "record", "field", "words"),
    [
        ("similarity", {"text": 5, "text_pair": "a"}, "text", "expected text, not a number"),
        ("similarity", {"text": "", "text_pair": "a"}, "text", "empty text"),
        ("similarity", {"text": "a", "text_pair": " \t"}, "text_pair", "blank text (only white space)"),
        ("similarity", {"text": "a", "text_pair": None}, "text_pair", "expected text, not null"),
        ("similarity", {**PAIR, "score": 3}, "score", "not an input of task 'similarity'"),
        ("entail", {"premise": "a", "text_pair": "b"}, "hypothesis", "missing: task 'entail' takes two texts"),
        ("entail", {"premise": "a", "hypothesis": "b", "text": "c"}, "text", "a record with other fields is refused"),
        ("topic", {"text": ["a"]}, "text", "expected text, not an array"),
        ("topic", {"sentence": "a", "text": "b"}, "text", "which takes one text, 'sentence' (or 'text')"),
    ],
)
def test_bad_records_are_refused_alike(server, pair_run, tmp_path, task, record, field, words):
    code, _, err = predict(pair_run, task, [record], tmp_path)
    assert code == 2 and "\n" not in err.strip() and f":1: field '{field}': " in err and words in err
    response = httpx.post(f"{server}/v1/tasks/{task}/predict", json={"input": record})
    assert response.status_code == 422
    assert response.json()["detail"] == "input: " + err.strip().split(":1: ", 1)[1]


def test_the_label_field_may_stay_in_a_record_and_is_passed_through(server, pair_run, tmp_path):
    """A record copied from the task's data keeps its label: not read, and predict writes it back."""
    record = {"premise": "a good movie", "hypothesis": "good", "gold": "pos"}
    code, (predicted,), _ = predict(pair_run, "entail", [record], tmp_path)
    assert code == 0 and predicted["gold"] == "pos" and predicted["prediction"] in ("pos", "neg")
    served = httpx.post(f"{server}/v1/tasks/entail/predict", json={"input": record})
    assert served.status_code == 200 and served.json()["predictions"][0]["prediction"] == predicted["prediction"]
    generic = {"text": "a good movie", "text_pair": "good"}  # the generic names answer the same
    assert predict(pair_run, "entail", [generic], tmp_path)[1][0]["prediction"] == predicted["prediction"]


def test_tasks_list_the_real_input_fields_and_their_schema(server):
    described = {t["name"]: t for t in httpx.get(f"{server}/v1/tasks").json()["tasks"]}
    assert described["similarity"]["input_fields"] == ["text", "text_pair"]  # columns 5 and 6 of STS-B
    assert described["entail"]["input_fields"] == ["premise", "hypothesis"]
    assert described["entail"]["accepted_input_fields"] == [["premise", "hypothesis"], ["text", "text_pair"]]
    assert described["topic"]["input_fields"] == ["sentence"]
    schema = described["similarity"]["input_schema"]
    assert schema["required"] == ["text", "text_pair"] and schema["additionalProperties"] is False
    assert described["similarity"]["prediction_range"] == [0.0, 5.0]
    assert described["topic"]["prediction_range"] is None


def test_openapi_shows_each_task_routes_request_schema(server):
    document = httpx.get(f"{server}/openapi.json").json()
    components = document["components"]["schemas"]

    def body(path: str) -> dict[str, Any]:
        ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        return components[ref.rsplit("/", 1)[1]]

    one = body("/v1/tasks/similarity/predict")["properties"]["input"]["anyOf"][0]
    assert one["required"] == ["text", "text_pair"] and one["additionalProperties"] is False
    assert body("/v1/tasks/similarity/predict")["properties"]["inputs"]["anyOf"][0]["items"] == one
    for task, spellings in (
        ("entail", [["premise", "hypothesis"], ["text", "text_pair"]]),
        ("topic", [["sentence"], ["text"]]),
    ):
        variants = body(f"/v1/tasks/{task}/predict")["properties"]["input"]["anyOf"][0]["anyOf"]
        assert [v["required"] for v in variants] == spellings
        assert all(v["additionalProperties"] is False for v in variants)
    items = body("/v1/predict")["properties"]["inputs"]["items"]["oneOf"]
    by_task = {item["properties"]["task"]["const"]: item["properties"]["input"] for item in items}
    assert set(by_task) == {"similarity", "entail", "topic"}
    assert by_task["similarity"]["required"] == ["text", "text_pair"]
    assert "/v1/tasks/{task}/predict" in document["paths"]  # any task by name, as before


def test_the_manifest_records_the_training_target_range(pair_run):
    """similarity_rows scores row i with i % 6 shared words: 0.0 to 5.0, eight rows of each; five rows
    carved for validation cannot take every 0 or every 5 away."""
    scores = [float(row[0]) for row in similarity_rows(48)]
    assert (min(scores), max(scores)) == (0.0, 5.0)
    manifest = json.loads((pair_run / "tasks.json").read_text(encoding="utf-8"))
    assert (manifest["similarity"]["target_min"], manifest["similarity"]["target_max"]) == (0.0, 5.0)
    assert "target_min" not in manifest["topic"] and "target_min" not in manifest["entail"]


def narrowed(run: Path, tmp_path: Path, low: float | None, high: float | None) -> Path:
    """A copy of `run` whose recorded target range is [low, high] (None: removed, as in older runs)."""
    copy = tmp_path / f"run-{low}-{high}"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "tasks.json").read_text(encoding="utf-8"))
    for key, value in (("target_min", low), ("target_max", high)):
        manifest["similarity"].pop(key)
        if value is not None:
            manifest["similarity"][key] = value
    (copy / "tasks.json").write_text(json.dumps(manifest), encoding="utf-8")
    return copy


def test_regression_answers_are_held_to_the_training_range_and_scored_raw(pair_run, tmp_path):
    """The model's raw answers on a few pairs, then a run whose recorded range lies strictly inside them:
    the lowest answers become its minimum, the highest its maximum, `raw` keeps the model's value, predict and
    serve agree; evaluation scores the raw answers, so its metrics do not move."""
    from multitune.runs.evaluate import evaluate_run

    words = ["john", "likes", "the", "movie", "paris", "london", "dog", "cat", "red", "blue", "runs", "sits"]
    records = [{"text": " ".join(words[i : i + 4]), "text_pair": " ".join(words[i + 1 : i + 6])} for i in range(7)]
    code, original, _ = predict(pair_run, "similarity", records, tmp_path)
    assert code == 0
    raws = [p["raw"] for p in original]
    assert all(p["prediction"] == p["raw"] for p in original)  # inside 0-5 already
    ordered = sorted(raws)
    assert ordered[0] < ordered[-1]
    low, high = ordered[1], ordered[-2]  # at least one answer below, one above
    run = narrowed(pair_run, tmp_path, low, high)
    code, held, _ = predict(run, "similarity", records, tmp_path)
    assert code == 0
    expected = [low if r < low else high if r > high else r for r in raws]  # clamping, written out
    assert [p["prediction"] for p in held] == pytest.approx(expected, abs=1e-9)
    assert [p["raw"] for p in held] == pytest.approx(raws, abs=1e-9)
    assert any(p["prediction"] != p["raw"] for p in held)
    with running_server(run) as url:
        served = httpx.post(f"{url}/v1/tasks/similarity/predict", json={"inputs": records}).json()["predictions"]
    assert [p["prediction"] for p in served] == pytest.approx(expected, abs=1e-6)
    assert [p["raw"] for p in served] == pytest.approx(raws, abs=1e-6)

    older = narrowed(pair_run, tmp_path, None, None)  # a run from before the range was recorded: no clamp
    code, plain, _ = predict(older, "similarity", records, tmp_path)
    assert code == 0 and all("raw" not in p for p in plain)
    assert [p["prediction"] for p in plain] == pytest.approx(raws, abs=1e-9)

    # evaluation: the same metrics whatever the recorded range (they are computed on the raw answers)
    with contextlib.redirect_stdout(io.StringIO()):
        wide = evaluate_run(narrowed(pair_run, tmp_path, -100.0, 100.0), "validation")["tasks"]["similarity"]
        tight = evaluate_run(narrowed(pair_run, tmp_path, 2.0, 2.0), "validation")["tasks"]["similarity"]
    assert tight["metrics"] == wide["metrics"]
    assert math.isfinite(wide["metrics"]["pearson"])  # clamped to [2, 2], every answer would be 2: no correlation
