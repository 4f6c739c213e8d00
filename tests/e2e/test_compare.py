"""`multitune compare` on the tiny BERT: baselines on the same budget, Δm, sizes, times, cache reuse."""

import json

import pytest
import yaml

from multitune.catalogue import validate_config
from multitune.cli import main
from multitune.compare import delta_m, single_task_config
from tests.conftest import classification_rows, tiny_config, token_rows


def test_delta_m_signs_by_direction():
    tasks = {
        "a": {"single": 0.80, "multi": 0.88, "higher_is_better": True},  # +10%
        "b": {"single": 2.0, "multi": 2.5, "higher_is_better": False},  # error up 25%: -25%
    }
    assert delta_m(tasks) == pytest.approx((10 - 25) / 2)
    tasks["c"] = {"single": 0.0, "multi": 0.3, "higher_is_better": True}  # an MCC of 0: no relative change
    assert delta_m(tasks) == pytest.approx((10 - 25) / 2)


def test_single_task_budget_matches_rows_seen(tiny_backbone):
    data = tiny_config(tiny_backbone, "a.jsonl", "b.jsonl", "runs", batch_size=4, steps=10)
    data.update(guard={"enabled": True}, analysis={"task_affinity": True})
    config = validate_config(data)
    baseline = single_task_config(config, "ner", rows=18)
    assert list(baseline.tasks) == ["ner"] and baseline.training.steps == 5  # ceil(18 / 4)
    assert baseline.gradient_aggregation is None and baseline.run.name == "single-ner"
    assert not baseline.guard.enabled and not baseline.analysis.task_affinity


@pytest.mark.slow
def test_compare_writes_the_table_and_reuses_cached_baselines(tmp_path, tiny_backbone, write_jsonl, capsys):
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=6, eval_every=3)), encoding="utf-8"
    )
    assert main(["compare", str(path)]) == 0
    result = json.loads((tmp_path / "runs" / "tiny" / "comparison.json").read_text())
    assert set(result["tasks"]) == {"sentiment", "ner"}
    for entry in result["tasks"].values():
        assert {"single", "multi", "metric", "higher_is_better"} <= set(entry) and not entry["cached_baseline"]
        trajectory = entry["single_trajectory"]  # validation by rows seen, for the guard
        assert trajectory and trajectory[-1][0] >= entry["rows_seen"] and all(len(p) == 2 for p in trajectory)
    assert result["params"]["multi_total"] < result["params"]["single_total"]
    assert set(result["train_seconds"]) == {"single_total", "multi"}
    assert isinstance(result["delta_m_percent"], float)
    rows = result["budget"]["rows_per_task"]
    assert sum(rows.values()) == 6 * 4  # 6 steps of 4 rows, split between the tasks
    assert "Δm" in (tmp_path / "runs" / "tiny" / "comparison.md").read_text()
    assert main(["compare", str(path)]) == 0  # the multi-task run again (tiny-2); baselines from the cache
    again = json.loads((tmp_path / "runs" / "tiny-2" / "comparison.json").read_text())
    assert all(entry["cached_baseline"] for entry in again["tasks"].values())
    assert [e["single"] for e in again["tasks"].values()] == [e["single"] for e in result["tasks"].values()]
    assert main(["compare", str(path), "--baseline-budget", "2"]) == 0  # baselines on twice the rows
    double = json.loads((tmp_path / "runs" / "tiny-3" / "comparison.json").read_text())
    assert double["budget"]["baseline_factor"] == 2.0
    for entry in double["tasks"].values():
        assert not entry["cached_baseline"]
        assert entry["single_rows"] >= 2 * entry["rows_seen"] and entry["single_rows"] < 2 * entry["rows_seen"] + 4


def test_baselines_are_plain_full_fine_tuning(tiny_backbone):
    data = tiny_config(tiny_backbone, "a.jsonl", "b.jsonl", "runs", batch_size=4)
    data["model"].update(architecture={"name": "mmoe", "experts": 2}, peft={"method": "lora", "train_backbone": True})
    baseline = single_task_config(validate_config(data), "ner", rows=8)
    assert baseline.model.architecture.name == "hard" and baseline.model.peft is None


def test_a_bad_baseline_budget_is_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing.yaml"), "--baseline-budget", "0"]) == 2
    assert "--baseline-budget must be positive" in capsys.readouterr().err


def test_the_budget_option_may_come_before_the_config_and_its_overrides(tmp_path, capsys):
    # argparse alone leaves the overrides unmatched when an option precedes the positionals
    command = ["compare", "--baseline-budget", "0", str(tmp_path / "missing.yaml"), "training.steps=3"]
    assert main(command) == 2
    assert "--baseline-budget must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path / "missing.yaml"), "--no-such-option"])
