"""The README's serving section as written: its curl commands answer in the shapes it shows (on a tiny run
with the quickstart's task names and inputs: a question type, entities, an STS-B-like pair read by column
index), and its table of status codes is what the server answers."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, classification_rows, tiny_config, token_rows
from tests.serving.conftest import running_server, similarity_rows, train, write_rows

httpx = pytest.importorskip("httpx")

SECTION = (REPO / "README.md").read_text(encoding="utf-8").split("## Serving and export\n", 1)[1].split("\n## ")[0]


def curl_commands() -> list[str]:
    """The block's curl commands (each with its continuation lines); its first line is the serve synopsis."""
    block = SECTION.split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.startswith("multitune serve runs/quickstart")
    commands: list[str] = []
    for line in block.splitlines()[1:]:
        if line.startswith("curl "):
            commands.append(line)
        else:
            commands[-1] += "\n" + line
    return commands


@pytest.fixture(scope="module")
def quickstart_like(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trec (classification), wnut17 (token tagging) and stsb (regression on TSV columns 5 and 6, score in
    column 4, as the quickstart reads STS-B) on the tiny BERT."""
    folder = tmp_path_factory.mktemp("quickstart-like")
    trec = write_rows(
        folder / "trec.jsonl",
        [{"text": r["text"], "label": "HUM" if r["label"] == "pos" else "NUM"} for r in classification_rows(40)],
    )
    wnut = write_rows(folder / "wnut.jsonl", token_rows(40))
    stsb = folder / "stsb.tsv"
    stsb.write_text(
        "".join(f"g\tx\t{i}\ty\t{score}\t{a}\t{b}\n" for i, (score, a, b) in enumerate(similarity_rows(40))),
        encoding="utf-8",
    )
    config = tiny_config(tiny_backbone, trec, wnut, folder / "runs")
    config["run"]["name"] = "quickstart"
    config["tasks"] = {"trec": config["tasks"]["sentiment"], "wnut17": config["tasks"]["ner"]}
    config["tasks"]["stsb"] = {
        "type": "regression",
        "source": {"format": "tsv", "header": False, "quoting": "none", "train": str(stsb)},
        "text_fields": [5, 6],
        "label_field": 4,
        "metrics": ["pearson", "spearman"],
    }
    return train(folder, config)


@pytest.fixture(scope="module")
def server(quickstart_like: Path) -> Iterator[str]:
    with running_server(quickstart_like) as url:
        yield url


def run_curl(command: str, url: str) -> Any:
    done = subprocess.run(
        ["bash", "-c", command.replace("localhost:8000", url.removeprefix("http://"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_readme_curl_commands_answer_as_shown(server, quickstart_like):
    manifest = json.loads((quickstart_like / "tasks.json").read_text(encoding="utf-8"))
    low, high = manifest["stsb"]["target_min"], manifest["stsb"]["target_max"]
    assert (low, high) == (0.0, 5.0)  # similarity_rows: 0 to 5 shared words
    first, second = curl_commands()
    answer = run_curl(first, server)
    assert answer["task"] == "trec" and len(answer["predictions"]) == 2
    assert all(p["prediction"] in ("HUM", "NUM") for p in answer["predictions"])
    mixed = run_curl(second, server)["predictions"]
    assert [p["task"] for p in mixed] == ["wnut17", "stsb", "stsb"]
    assert len(mixed[0]["prediction"]) == 6 and set(mixed[0]["prediction"]) <= set(manifest["wnut17"]["labels"])
    for pair in mixed[1:]:
        assert pair["prediction"] == min(max(pair["raw"], low), high)


def test_the_readme_status_table_is_what_the_server_answers(server):
    table = {int(code): text for code, text in re.findall(r"^\| (\d{3}) \| (.+) \|$", SECTION, re.MULTILINE)}
    assert set(table) == {400, 401, 404, 405, 408, 413, 415, 422, 500, 503}
    json_type = {"content-type": "application/json"}

    def post(path: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        sent = json_type if headers is None else headers
        return httpx.post(f"{server}{path}", content=body, headers=sent).status_code

    good = b'{"input": {"text": "a"}}'
    assert "unknown task in the path" in table[404] and post("/v1/tasks/nope/predict", good) == 404
    assert post("/nope", good) == 404
    assert "`inputs.0.task`" in table[422]
    assert post("/v1/predict", b'{"inputs": [{"task": "nope", "input": {"text": "a"}}]}') == 422
    assert "not UTF-8" in table[422] and post("/v1/tasks/trec/predict", b'{"input": {"text": "\xff"}}') == 422
    assert post("/v1/tasks/trec/predict", b"[1]") == 422
    assert "does not take" in table[422] and post("/v1/tasks/stsb/predict", good) == 422  # one text of a pair
    assert "no `Content-Type: application/json`" in table[415] and post("/v1/tasks/trec/predict", good, {}) == 415
    latin = {"content-type": "application/json; charset=latin-1"}
    assert post("/v1/tasks/trec/predict", good, latin) == 415
    assert httpx.get(f"{server}/v1/tasks/trec/predict").status_code == 405
    assert "2 MB" in table[413] and post("/v1/tasks/trec/predict", b" " * 2_000_001) == 413
