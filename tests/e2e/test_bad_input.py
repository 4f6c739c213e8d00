"""Every kind of bad input: one line on stderr naming file, line and field, exit code 2, nothing written."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from multitune.cli import main
from tests.conftest import classification_rows, tiny_config, token_rows


@pytest.fixture
def setup(tmp_path, tiny_backbone, write_jsonl):
    a = write_jsonl("sentiment.jsonl", classification_rows(20))
    b = write_jsonl("ner.jsonl", token_rows(20))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs")
    earlier = tmp_path / "runs" / "tiny"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text('{"earlier": true}', encoding="utf-8")
    return tmp_path, config


def run_bad(tmp_path, config, capsys, *overrides):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("*"))
    code = main(["train", str(path), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").rglob("*")) == before
    assert json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text()) == {"earlier": True}
    return err


def test_malformed_row(setup, capsys):
    tmp_path, config = setup
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine", "label": "pos"}\n{"text": "oops", "label": \n', encoding="utf-8")
    config["tasks"]["sentiment"]["source"]["train"] = str(bad)
    assert run_bad(tmp_path, config, capsys) == f"multitune: error: {bad}:2: invalid JSON: Expecting value (column 27)"


def test_missing_field(setup, capsys):
    tmp_path, config = setup
    bad = tmp_path / "nolabel.jsonl"
    bad.write_text('{"text": "fine", "label": "pos"}\n{"text": "x"}\n', encoding="utf-8")
    config["tasks"]["sentiment"]["source"]["train"] = str(bad)
    assert run_bad(tmp_path, config, capsys).endswith(f"{bad}:2: field 'label': missing field (this row has: 'text')")


def test_unknown_label_in_validation(setup, capsys, write_jsonl):
    tmp_path, config = setup
    validation = write_jsonl("validation.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "meh"}])
    config["tasks"]["sentiment"]["source"]["validation"] = str(validation)
    err = run_bad(tmp_path, config, capsys)
    assert err.startswith(f"multitune: error: {validation}:2: field 'label': unknown label 'meh' in validation")


def test_unknown_tag_in_test(setup, capsys, write_jsonl):
    tmp_path, config = setup
    test = write_jsonl("test.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "B-org"]}])
    config["tasks"]["ner"]["source"]["test"] = str(test)
    assert f"{test}:1: field 'tags': unknown label 'B-org' in test" in run_bad(tmp_path, config, capsys)


def test_empty_task(setup, capsys):
    tmp_path, config = setup
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    config["tasks"]["sentiment"]["source"]["train"] = str(empty)
    assert run_bad(tmp_path, config, capsys) == f"multitune: error: {empty}: task 'sentiment' has no training rows"


def test_unified_record_for_no_task(setup, capsys, write_jsonl):
    tmp_path, config = setup
    mix = write_jsonl(
        "mix.jsonl",
        [
            {"task": "sentiment", "input": "good", "output": "pos"},
            {"task": "nli", "input": ["a", "b"], "output": "yes"},
        ],
    )
    config["tasks"]["sentiment"]["source"] = {"format": "unified", "train": str(mix)}
    err = run_bad(tmp_path, config, capsys)
    assert err.endswith(f"{mix}:2: field 'task': no configured task 'nli' (this file feeds: sentiment)")


def test_missing_file(setup, capsys):
    tmp_path, config = setup
    config["tasks"]["ner"]["source"]["train"] = str(tmp_path / "nowhere.jsonl")
    assert run_bad(tmp_path, config, capsys) == f"multitune: error: {tmp_path / 'nowhere.jsonl'}: file not found"


@pytest.mark.parametrize("split", ["validation", "test"])
def test_empty_validation_or_test_file(setup, capsys, split):
    tmp_path, config = setup
    empty = tmp_path / f"{split}.jsonl"
    empty.write_text("\n", encoding="utf-8")
    config["tasks"]["sentiment"]["source"][split] = str(empty)
    assert run_bad(tmp_path, config, capsys) == f"multitune: error: {empty}: task 'sentiment' has no {split} rows"


def test_unknown_method_name(setup, capsys):
    tmp_path, config = setup
    config["loss_weighting"] = {"name": "eqaul"}
    err = run_bad(tmp_path, config, capsys)
    assert re.fullmatch(
        rf"multitune: error: {re.escape(str(tmp_path / 'bad.yaml'))}:\d+: field 'loss_weighting.name': "
        r"unknown loss weighting 'eqaul' \(did you mean 'equal'\?\); choose from: .*",
        err,
    )


def test_bad_method_parameter_value_names_its_group_and_line(setup, capsys):
    tmp_path, config = setup
    config["sampling"] = {"name": "temperature", "temperature": -1}
    err = run_bad(tmp_path, config, capsys)
    assert re.fullmatch(
        rf"multitune: error: {re.escape(str(tmp_path / 'bad.yaml'))}:\d+: field 'sampling': "
        r"sampler 'temperature': .*temperature.*",
        err,
    )


def test_bad_method_parameter_in_an_override(setup, capsys):
    tmp_path, config = setup
    err = run_bad(
        tmp_path,
        config,
        capsys,
        "gradient_aggregation.name=cagrad",
        "gradient_aggregation.c=-2",
        "sampling.name=all_tasks",
    )
    assert err.startswith("multitune: error: override: field 'gradient_aggregation': gradient aggregator 'cagrad'")


def test_unknown_key(setup, capsys):
    tmp_path, config = setup
    config["training"]["epochs"] = 3
    err = run_bad(tmp_path, config, capsys)
    assert re.fullmatch(rf"multitune: error: {tmp_path / 'bad.yaml'}:\d+: field 'training.epochs': unknown key", err)


def test_bad_override_value(setup, capsys):
    tmp_path, config = setup
    err = run_bad(tmp_path, config, capsys, "training.batch_size=zero")
    assert err.startswith("multitune: error: override: field 'training.batch_size': Input should be a valid integer")


def test_missing_backbone(setup, capsys):
    tmp_path, config = setup
    config["model"]["backbone"] = str(tmp_path / "no-such-model")
    assert "field 'model.backbone'" in run_bad(tmp_path, config, capsys, f"model.backbone={tmp_path}/no-such-model")


def test_read_only_output_directory(setup, capsys, small_filesystem):
    tmp_path, config = setup
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):  # root writes through permissions: a read-only filesystem stops it
            locked = small_filesystem("read-only", 64, read_only=True)
        config["run"]["output_dir"] = str(locked / "runs")
        err = run_bad(tmp_path, config, capsys)
        assert f"{locked / 'runs'}: field 'run.output_dir': cannot create the run directory" in err
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_real_process_exit_code_and_stderr(tmp_path):
    missing = tmp_path / "absent.yaml"
    result = subprocess.run([sys.executable, "-m", "multitune", "train", str(missing)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"multitune: error: {missing}: config file not found\n"
