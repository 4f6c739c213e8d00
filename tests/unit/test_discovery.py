"""`discover`: tasks found in a unified file's `task` field or in a folder of files, one per task."""

from __future__ import annotations

import json

import pytest
import yaml

from multitune.catalogue import load_config
from multitune.cli import main
from multitune.errors import ConfigError, DataError
from tests.conftest import classification_rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


UNIFIED = """\
model: {{backbone: {backbone}, max_length: 32}}
run: {{name: found, output_dir: {out}, seed: 3}}
training: {{steps: 6, batch_size: 6, eval_every: 3, progress: false, mixed_batches: true}}
discover:
  source: {{format: unified, train: mix.jsonl}}
  type: classification
  defaults: {{labels: [neg, pos], max_rows: {{validation: 8}}}}
  overrides:
    flan_sst: {{sampling_weight: 2.0}}
"""


def mixture(tmp_path, tasks=("review", "flan/sst", "news"), rows=24):
    records = []
    for i, row in enumerate(classification_rows(rows * len(tasks))):
        records.append({"task": tasks[i % len(tasks)], "input": row["text"], "output": row["label"]})
    return write_jsonl(tmp_path / "mix.jsonl", records)


def test_a_unified_files_task_values_become_tasks_in_order_of_first_appearance(tmp_path, tiny_backbone):
    mixture(tmp_path)
    path = write_config(tmp_path, UNIFIED.format(backbone=tiny_backbone, out=tmp_path / "runs"))
    config = load_config(path)
    assert list(config.tasks) == ["review", "flan_sst", "news"]
    flan = config.tasks["flan_sst"]
    assert flan.source.task_key == "flan/sst" and flan.sampling_weight == 2.0  # the override
    assert config.tasks["news"].sampling_weight == 1.0 and config.tasks["news"].labels == ["neg", "pos"]
    assert all(
        t.max_rows.validation == 8 and t.source.train == str(tmp_path / "mix.jsonl") for t in config.tasks.values()
    )
    assert config.discover is None  # expanded: a saved config names its tasks


def test_discovered_tasks_train_and_the_saved_config_names_them(tmp_path, tiny_backbone):
    mixture(tmp_path)
    path = write_config(tmp_path, UNIFIED.format(backbone=tiny_backbone, out=tmp_path / "runs"))
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "found"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert set(saved["tasks"]) == {"review", "flan_sst", "news"} and not saved.get("discover")
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"review", "flan_sst", "news"}
    assert all(metrics["task_rows"][name] > 0 for name in metrics["tasks"])
    assert main(["evaluate", str(run), "--split", "test"]) == 0


def test_a_folder_holds_one_task_per_file_with_its_splits_by_name(tmp_path, tiny_backbone):
    for name in ("alpha", "beta"):
        write_jsonl(tmp_path / "data" / "train" / f"{name}.jsonl", classification_rows(20))
    write_jsonl(tmp_path / "data" / "test" / "beta.jsonl", classification_rows(6, seed=1))
    (tmp_path / "data" / "train" / "README.md").write_text("not a task", encoding="utf-8")
    text = f"""\
model: {{backbone: {tiny_backbone}}}
discover:
  source: {{format: jsonl, train: data/train, test: data/test}}
  type: classification
"""
    config = load_config(write_config(tmp_path, text))
    assert list(config.tasks) == ["alpha", "beta"]
    assert config.tasks["alpha"].source.train == str(tmp_path / "data" / "train" / "alpha.jsonl")
    assert config.tasks["alpha"].source.test is None
    assert config.tasks["beta"].source.test == str(tmp_path / "data" / "test" / "beta.jsonl")


@pytest.mark.parametrize(
    "change,message,line",
    [
        ("    nope: {sampling_weight: 2.0}\n", "overrides names 'nope', a task the data does not hold", 8),
        (
            "tasks:\n  news: {type: classification, source: {format: jsonl, train: mix.jsonl}}\n",
            "found by discover",
            11,
        ),
    ],
)
def test_bad_discovery_is_one_line_naming_file_and_line(tmp_path, tiny_backbone, change, message, line):
    mixture(tmp_path)
    path = write_config(tmp_path, UNIFIED.format(backbone=tiny_backbone, out=tmp_path / "runs") + change)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert (caught.value.file, caught.value.line) == (str(path), line)


def test_task_values_that_become_one_name_are_refused_at_their_record(tmp_path, tiny_backbone):
    mixture(tmp_path, tasks=("a/b", "a_b"))
    path = write_config(
        tmp_path,
        UNIFIED.format(backbone=tiny_backbone, out=tmp_path / "runs")
        .replace("    flan_sst: {sampling_weight: 2.0}\n", "    {}\n")
        .replace("  overrides:\n    {}\n", ""),
    )
    with pytest.raises(DataError, match="task 'a_b' and task 'a/b' both become the task name 'a_b'") as caught:
        load_config(path)
    assert (caught.value.file, caught.value.line, caught.value.field) == (str(tmp_path / "mix.jsonl"), 2, "task")


def test_no_task_at_all_is_refused():
    from multitune.catalogue import validate_config

    with pytest.raises(ConfigError, match="name at least one task") as caught:
        validate_config({"model": {}})
    assert caught.value.field == "tasks"


def test_dots_blank_values_and_hidden_files(tmp_path, tiny_backbone):
    from multitune.catalogue import validate_config

    with pytest.raises(ConfigError, match=r"task name 'a\.b' may not contain '\.'") as caught:
        validate_config({"tasks": {"a.b": {"type": "classification", "source": {"format": "jsonl", "train": "x"}}}})
    assert caught.value.field == "tasks"
    mixture(tmp_path, tasks=("flan.cot", "news"))
    path = write_config(
        tmp_path, UNIFIED.format(backbone=tiny_backbone, out=tmp_path / "runs").split("  overrides:")[0]
    )
    assert list(load_config(path).tasks) == ["flan_cot", "news"]
    mixture(tmp_path, tasks=("news", "  "))
    with pytest.raises(DataError, match="a task value must not be blank") as blank:
        load_config(path)
    assert (blank.value.line, blank.value.field) == (2, "task")
    for name in ("alpha.jsonl", ".alpha.jsonl.swp.jsonl", ".hidden.jsonl"):
        write_jsonl(tmp_path / "folder" / name, classification_rows(8))
    text = (
        f"model: {{backbone: {tiny_backbone}}}\n"
        "discover: {source: {format: jsonl, train: folder}, type: classification}\n"
    )
    assert list(load_config(write_config(tmp_path, text)).tasks) == ["alpha"]


@pytest.mark.parametrize(
    "group,message,field,line",
    [
        (
            "  defaults: {sampling_wieght: 2.0}\n",
            "unknown task key (did you mean 'sampling_weight'?)",
            "discover.defaults.sampling_wieght",
            7,
        ),
        (
            "  defaults: {source: {format: jsonl, train: x.jsonl}}\n",
            "defaults may not set 'source'",
            "discover.defaults.source",
            7,
        ),
        (
            "  overrides: {flan/sst: {sampling_weight: 2.0}}\n",
            "(as a task it is named 'flan_sst')",
            "discover.overrides",
            7,
        ),
    ],
)
def test_defaults_and_overrides_are_checked_at_their_own_line(tmp_path, tiny_backbone, group, message, field, line):
    mixture(tmp_path)
    text = UNIFIED.format(backbone=tiny_backbone, out=tmp_path / "runs").split("  defaults:")[0] + group
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in caught.value.message and caught.value.field == field and caught.value.line == line, caught.value


def test_an_override_of_a_discovered_tasks_key_is_that_tasks_own(tmp_path, tiny_backbone):
    mixture(tmp_path)
    path = write_config(tmp_path, UNIFIED.format(backbone=tiny_backbone, out=tmp_path / "runs"))
    config = load_config(path, ["tasks.news.sampling_weight=3.0"])
    assert config.tasks["news"].sampling_weight == 3.0 and config.tasks["news"].source.task_key == "news"
    with pytest.raises(ConfigError, match="unknown task key") as caught:
        load_config(path, ["discover.defaults.nope=1"])
    assert caught.value.file == "override"


def test_a_runs_saved_config_may_be_larger_than_a_hand_written_one(tmp_path):
    """A mixture of hundreds of discovered tasks saves a config over the 256 KiB a hand-written one may have:
    the run's own commands (evaluate, resume, serve) read it."""
    from multitune.catalogue import load_run_config

    rows = write_jsonl(tmp_path / "rows.jsonl", classification_rows(8))
    text = yaml.safe_dump(
        {"tasks": {"a": {"type": "classification", "source": {"format": "jsonl", "train": str(rows)}}}}
    )
    path = write_config(tmp_path, text + "# " + "x" * (300 * 1024) + "\n")
    with pytest.raises(ConfigError, match="larger than 256 KiB"):
        load_config(path)
    assert list(load_run_config(path).tasks) == ["a"]
