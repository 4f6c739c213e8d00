"""`multitune compare` on the tiny BERT: baselines on the same budget, Δm, sizes, times, cache reuse."""

import json
from pathlib import Path

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


def test_a_task_verdict_is_noise_under_two_standard_errors():
    from multitune.compare import task_verdict

    assert task_verdict([0.02]) == "gain" and task_verdict([-0.01]) == "loss" and task_verdict([0.0]) == "equal"
    # mean 0.01, sample std 0.01, standard error 0.01 / sqrt(3) = 0.00577: 0.01 < 2 x 0.00577
    assert task_verdict([0.0, 0.01, 0.02]) == "within noise"
    # mean 0.03, sample std 0.01: 0.03 > 0.0115
    assert task_verdict([0.02, 0.03, 0.04]) == "gain"
    assert task_verdict([-0.02, -0.03, -0.04]) == "loss"


def test_seeds_aggregate_means_spreads_and_delta_m():
    from multitune.compare import aggregate

    def result(seed, sst, mse, dm):
        return {
            "tasks": {
                "sst": {"single": 0.80, "multi": sst, "metric": "accuracy", "higher_is_better": True},
                "sts": {"single": 2.0, "multi": mse, "metric": "mse", "higher_is_better": False},
            },
            "delta_m_percent": dm,
            "params": {"single_total": 200, "multi_total": 110, "adapters_total": None},
            "storage_bytes": {"single_total": 800, "multi": 440 + seed},
            "wall_seconds": {"single_total": 10.0 + seed, "multi": 6.0},
            "train_seconds": {"single_total": 8.0, "multi": 5.0},
            "budget": {"batch_size": 4, "rows_per_task": {}, "rule": "r", "converge": True, "steps": {}},
            "multi_run": f"runs/x-seed{seed}",
        }

    summary = aggregate([result(1, 0.84, 1.8, 4.0), result(2, 0.88, 2.2, 1.0)], [1, 2])
    sst, sts = summary["tasks"]["sst"], summary["tasks"]["sts"]
    assert sst["multi"] == {"mean": 0.86, "std": pytest.approx(0.028284, abs=1e-6)}  # sqrt(0.0008)
    assert sst["single"] == {"mean": 0.8, "std": 0.0}
    assert sst["change"] == "+7.5%"  # (0.86 - 0.80) / 0.80
    assert sst["verdict"] == "gain"  # differences 0.04, 0.08: mean 0.06 > 2 x 0.02 / sqrt(2) = 0.0283
    assert sts["multi"]["mean"] == 2.0 and sts["change"] == "+0.0%"
    assert sts["verdict"] == "within noise"  # signed differences +0.2, -0.2
    assert summary["delta_m_percent"] == {"per_seed": [4.0, 1.0], "mean": 2.5, "std": pytest.approx(2.12132, abs=1e-5)}
    assert summary["storage_bytes"] == {"single_total": 800, "multi": 442}  # round(mean(441, 442)) = 442 (banker's)
    assert summary["wall_seconds"]["single_total"] == {"mean": 11.5, "std": pytest.approx(0.707107, abs=1e-6)}
    assert summary["runs"] == ["runs/x-seed1", "runs/x-seed2"] and "steps" not in summary["budget"]
    assert "merges" not in summary and "delta_m_excluded" not in summary
    from multitune.compare.seeds import format_seeds

    left_out = [result(1, 0.84, 1.8, 4.0), {**result(2, 0.88, 2.2, 1.0), "delta_m_excluded": ["sts"]}]
    summary_left = aggregate(left_out, [1, 2])
    assert summary_left["delta_m_excluded"] == {"2": ["sts"]}  # seed 2's Δm averaged one task, seed 1's two
    assert "Δm leaves out tasks whose single-task score is 0: seed 2: sts" in format_seeds(summary_left)

    def merged(seed, sst, dm):
        row = {"tasks": {"sst": sst, "sts": 2.5}, "delta_m_percent": dm, "average_main_score": (sst + 2.5) / 2,
               "settings": {"scaling": 0.3 * seed}, "storage_bytes": 400 + 2 * seed}  # fmt: skip
        return {**result(seed, 0.84, 1.8, 4.0), "merges": {"ties": row}}

    summary = aggregate([merged(1, 0.70, -10.0), merged(2, 0.74, -6.0)], [1, 2])
    ties = summary["merges"]["ties"]
    assert ties["delta_m_percent"] == {
        "per_seed": [-10.0, -6.0],
        "mean": -8.0,
        "std": pytest.approx(2.828427, abs=1e-6),
    }
    assert ties["tasks"]["sst"] == {"mean": 0.72, "std": pytest.approx(0.028284, abs=1e-6)}
    assert ties["average_main_score"]["mean"] == pytest.approx((0.72 + 2.5) / 2)
    assert ties["settings"] == [{"scaling": 0.3}, {"scaling": 0.6}] and ties["storage_bytes"] == 403
    assert "| ties | 0.7200 ± 0.0283 | 2.5000 ± 0.0000 | 1.6100 | -8.00% ± 2.83 |" in format_seeds(summary)


@pytest.mark.slow
def test_converged_comparison_over_seeds(tmp_path, tiny_backbone, write_jsonl, capsys):
    """--converge: both sides stop early on their validation score within --max-steps; --seeds: one
    comparison per seed and their aggregate, checked against the per-seed files."""
    import statistics

    from multitune.compare import delta_m

    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    path = tmp_path / "c.yaml"
    data = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=100, eval_every=2, batch_size=4)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    argv = ["compare", str(path), "--converge", "--patience", "1", "--max-steps", "8", "--seeds", "3,4"]
    assert main(argv) == 0
    runs = tmp_path / "runs"
    per_seed = [json.loads((runs / f"tiny-seed{s}" / "comparison.json").read_text()) for s in (3, 4)]
    summary = json.loads((runs / "tiny-seeds" / "comparison.json").read_text())
    for seed, result in zip((3, 4), per_seed, strict=True):
        assert result["seed"] == seed and result["budget"]["converge"]
        assert "early stopping after 1 validations" in result["budget"]["rule"]
        assert all(0 < steps <= 8 for steps in result["budget"]["steps"].values())
        assert result["delta_m_percent"] == pytest.approx(delta_m(result["tasks"]), abs=1e-3)
        multi_config = yaml.safe_load((runs / f"tiny-seed{seed}" / "config.yaml").read_text())
        assert multi_config["training"]["early_stopping"]["patience"] == 1 and multi_config["training"]["steps"] == 8
        weights = (runs / f"tiny-seed{seed}" / "model.safetensors").stat().st_size  # no adapters; checkpoints aside
        assert result["storage_bytes"]["multi"] == weights > 0
    for task in ("sentiment", "ner"):
        singles = [r["tasks"][task]["single"] for r in per_seed]
        multis = [r["tasks"][task]["multi"] for r in per_seed]
        assert summary["tasks"][task]["single"]["mean"] == pytest.approx(statistics.fmean(singles), abs=1e-6)
        assert summary["tasks"][task]["multi"]["std"] == pytest.approx(statistics.stdev(multis), abs=1e-6)
    assert summary["delta_m_percent"]["per_seed"] == [r["delta_m_percent"] for r in per_seed]
    markdown = (runs / "tiny-seeds" / "comparison.md").read_text()
    assert "sentiment: " in markdown and "ner: " in markdown and "Seeds: 3, 4" in markdown
    baseline_configs = list((runs / ".baselines").rglob("single-*.yaml"))
    assert baseline_configs and all(
        yaml.safe_load(c.read_text())["training"]["early_stopping"]["patience"] == 1 for c in baseline_configs
    )


def test_a_baseline_another_comparison_is_training_is_left_for_later(tmp_path):
    """Side-by-side comparisons share the baseline cache: one whose lock is held elsewhere is skipped
    (wait false) and read from the cache once the other has written it (wait true)."""
    import fcntl

    from multitune.compare.run import _baseline

    cache = tmp_path / "cache"
    cache.mkdir()
    record = {"metrics": {"tasks": {}}, "wall_seconds": 1.5, "run_dir": str(tmp_path)}

    class Quiet:
        def cached(self, label):
            pass

    with (cache / ".lock").open("a") as other:  # another comparison, training this baseline now
        fcntl.flock(other, fcntl.LOCK_EX)
        assert _baseline("t", None, cache, Quiet(), False, wait=False) is None
        (cache / "baseline.json").write_text(json.dumps(record), encoding="utf-8")
    assert _baseline("t", None, cache, Quiet(), False, wait=False) == (record, True)


def test_compare_merges_the_baselines_into_rows_beside_joint_training(tmp_path, tiny_backbone, write_jsonl, capsys):
    """--merge: each method merges the very baselines of the comparison; its row's Δm is against them,
    computed here from the scores; storage is the merged run's weights; comparison.md shows the table."""
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=6)), encoding="utf-8")
    assert main(["compare", str(path), "--merge", "average,ties"]) == 0
    run = tmp_path / "runs" / "tiny"
    result = json.loads((run / "comparison.json").read_text())
    assert set(result["merges"]) == {"average", "ties"}
    for method, row in result["merges"].items():
        merged = json.loads((Path(row["run"]) / "metrics.json").read_text())
        assert merged["merge"]["method"] == method and Path(row["run"]).parent == run / "merged"
        changes = []
        for task, entry in result["tasks"].items():
            assert row["tasks"][task] == merged["tasks"][task]["main_score"]
            if abs(entry["single"]) > 1e-9:
                sign = 1 if entry["higher_is_better"] else -1
                changes.append(sign * (row["tasks"][task] - entry["single"]) / abs(entry["single"]))
        assert row["delta_m_percent"] == pytest.approx(100 * sum(changes) / len(changes), abs=1e-3)
        assert row["storage_bytes"] == (Path(row["run"]) / "model.safetensors").stat().st_size
        assert row["wall_seconds"] >= result["wall_seconds"]["single_total"]
    assert result["merges"]["ties"]["settings"]["density"] == 0.2
    markdown = (run / "comparison.md").read_text()
    assert "| merge: average |" in markdown and "| merge: ties (" in markdown and "| joint multi-task |" in markdown
    report = (run / "report.html").read_text()
    assert "Joint training against merging the single-task models" in report
    for name in ("one model per task", "joint multi-task", "merge: average", "merge: ties"):
        assert f"<td>{name}</td>" in report
    assert f"<td>{result['merges']['ties']['delta_m_percent']:+.2f}%</td>" in report
    weights = (run / "model.safetensors").stat().st_size
    assert result["storage_bytes"]["multi"] == weights
    earlier = (run / "merged" / "average" / "model.safetensors").read_bytes()
    # the merges above now lie inside; a method named twice merges once, into the folder it had
    assert main(["compare", "--from-run", str(run), "--merge", "average,average"]) == 0
    again = json.loads((run / "comparison.json").read_text())
    assert again["storage_bytes"]["multi"] == weights
    assert sorted(path.name for path in (run / "merged").iterdir()) == ["average", "ties"]
    assert set(again["merges"]) == {"average"}
    assert again["merges"]["average"]["run"] == str((run / "merged" / "average").resolve())
    assert again["multi_run"] == str(run.resolve())
    assert (run / "merged" / "average" / "model.safetensors").read_bytes() == earlier  # the same merge again
    joint = next(line for line in (run / "comparison.md").read_text().splitlines() if line.startswith("| joint"))
    assert joint.endswith(f"{again['wall_seconds']['multi']:.1f}* |")  # its loops' time, marked as such
    assert "an existing run (`--from-run`): its training loops' time" in (run / "comparison.md").read_text()
    capsys.readouterr()
    assert main(["compare", "--from-run", str(run / "merged" / "average")]) == 2  # a merged run: no traceback
    error = capsys.readouterr().err.strip()
    assert "a merged run: --from-run takes a trained multi-task run" in error and "\n" not in error


def test_a_task_the_multi_task_run_never_drew_gets_no_one_row_baseline(tmp_path, tiny_backbone, write_jsonl, capsys):
    # one step of one task's batch (batches are not mixed): the other task sees 0 rows, and an equal budget of
    # 0 rows has no baseline; before, it got a 1-step baseline as if it had been drawn once
    a, b = write_jsonl("a.jsonl", classification_rows(20)), write_jsonl("b.jsonl", token_rows(20))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=1, eval_every=1)))
    assert main(["compare", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's progress lines
    run = tmp_path / "runs" / "tiny"
    rows = json.loads((run / "metrics.json").read_text())["task_rows"]
    undrawn = next(task for task in ("sentiment", "ner") if rows.get(task, 0) == 0)
    assert error.startswith(f"multitune: error: {run / 'metrics.json'}: the multi-task run drew '{undrawn}' (0 rows)")
    assert "--converge" in error
    drawn = next(task for task in ("sentiment", "ner") if task != undrawn)
    assert rows[drawn] == 4  # one batch of 4 rows: a tenth of it rounds to no rows, so it has no baseline either
    assert main(["compare", "--from-run", str(run), "--baseline-budget", "0.1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"'{drawn}' (4 rows)" in error and f"'{undrawn}' (0 rows)" in error and "0.1x those rows" in error
    assert not (run / "comparison.json").exists() and not (tmp_path / "runs" / ".baselines").exists()


def test_merging_a_randomly_initialised_backbone_is_refused_before_anything_trains(
    tmp_path, tiny_backbone, write_jsonl, capsys
):
    a, b = write_jsonl("a.jsonl", classification_rows(20)), write_jsonl("b.jsonl", token_rows(20))
    config = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=2)
    config["model"]["random_init"] = True
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["compare", str(path), "--merge", "ties"]) == 2
    assert "model.random_init" in capsys.readouterr().err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("dm", "word"), [(0.004, "level"), (-0.004, "level"), (0.5, "better"), (-0.5, "worse")])
def test_the_verdict_says_what_the_printed_delta_m_shows(dm, word):
    from multitune.compare.run import verdict

    task = {"single": 0.5, "multi": 0.5, "higher_is_better": True}
    result = {"delta_m_percent": dm, "params": {"multi_total": 1, "single_total": 2},
              "train_seconds": {"multi": 1.0, "single_total": 2.0}, "tasks": {"t": task}}  # fmt: skip
    assert verdict(result).startswith(f"multi-task is {word} on average")


def test_the_merge_table_shows_learned_coefficients_beside_chosen_numbers():
    from multitune.compare.merges import format_merges

    row = {"tasks": {"t": 0.5}, "delta_m_percent": -10.0, "storage_bytes": 10, "wall_seconds": 1.0}
    result = {
        "tasks": {"t": {"single": 0.6, "multi": 0.55}},
        "delta_m_percent": -8.3,
        "storage_bytes": {"single_total": 20, "multi": 10},
        "wall_seconds": {"single_total": 2.0, "multi": 1.5},
        "merges": {
            "ties": {**row, "settings": {"density": 0.2, "scaling": 1.0}},
            "adamerging": {**row, "settings": {"granularity": "task", "coefficients": {"all": [0.3271, 0.5]}}},
            "layered": {**row, "settings": {"coefficients": {"encoder.layer.0": [0.1], "other": [0.2]}}},
        },
    }
    table = "\n".join(format_merges(result))
    assert "merge: ties (density=0.2, scaling=1)" in table
    assert "merge: adamerging (granularity=task, coefficients=[0.327, 0.5])" in table
    assert "coefficients=learned for 2 layers (comparison.json)" in table


def test_a_finished_two_stage_run_is_compared_without_training_it_again_and_its_time_counts_both_stages(
    tmp_path, tiny_backbone, write_jsonl, capsys
):
    a, b = write_jsonl("a.jsonl", classification_rows(40)), write_jsonl("b.jsonl", token_rows(40))
    data = tiny_config(tiny_backbone, a, b, tmp_path / "runs", steps=6, eval_every=2, batch_size=4)
    data["training"]["schedule"] = {"name": "two_stage", "finetune_steps": 2}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    argv = ["--converge", "--patience", "1", "--max-steps", "6"]
    assert main(["compare", str(path), *argv]) == 0
    run = tmp_path / "runs" / "tiny"
    first = json.loads((run / "comparison.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    both = metrics["train_seconds"] + metrics["finetune_seconds"]
    assert metrics["finetune_seconds"] > 0 and first["train_seconds"]["multi"] == pytest.approx(both, abs=0.02)
    weights = (run / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["compare", "--from-run", str(run), *argv]) == 0
    assert "reused from the cache" in capsys.readouterr().err  # the baselines; and the run is not retrained:
    assert (run / "model.safetensors").stat().st_mtime_ns == weights and not (tmp_path / "runs" / "tiny-2").exists()
    again = json.loads((run / "comparison.json").read_text())
    for task, entry in again["tasks"].items():  # the same scores; the baselines now come from the cache
        assert {k: v for k, v in entry.items() if k != "cached_baseline"} == {
            k: v for k, v in first["tasks"][task].items() if k != "cached_baseline"
        }
    assert again["train_seconds"] == first["train_seconds"]
    assert again["budget"]["multi_time"].startswith("an existing run")
    assert main(["compare", "--from-run", str(run), "--converge", "--patience", "3"]) == 2  # not its rule
    assert "give the run's own" in capsys.readouterr().err
    assert main(["compare", "--from-run", str(tmp_path)]) == 2  # not a run
    assert main(["compare", "--from-run", str(run), str(path)]) == 2  # a config too
    before = sorted(path.name for path in (tmp_path / "runs").iterdir())
    for argv, said in (  # options that --converge alone reads, and the one it ignores: refused, not dropped
        (["--patience", "2"], "--patience sets the rule of --converge"),
        (["--max-steps", "9"], "--max-steps sets the rule of --converge"),
        (["--converge", "--baseline-budget", "2"], "--baseline-budget sets the equal-rows budget"),
    ):
        capsys.readouterr()
        assert main(["compare", str(path), *argv]) == 2
        assert said in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == before  # nothing trained


def test_deployment_bytes_count_the_run_its_adapters_and_copies_not_checkpoints_or_runs_kept_inside(tmp_path):
    """A run with a 100-byte model, a 7-byte adapter and a 30-byte full copy per task keeps 137 bytes; its
    checkpoints and the merges compare wrote under merged/ (runs of their own: config.yaml) are not its."""
    from multitune.compare.measures import deployment_bytes

    sizes = {
        "model.safetensors": 100,
        "finetuned/a/adapter/adapter_model.safetensors": 7,
        "finetuned/b/model.safetensors": 30,
        "checkpoints/step-10/model.safetensors": 100,
        "merged/ties/model.safetensors": 100,
        "merged/ties/backbone/extra.safetensors": 3,
    }
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    (tmp_path / "config.yaml").write_text("run: {}\n", encoding="utf-8")
    (tmp_path / "merged" / "ties" / "config.yaml").write_text("run: {}\n", encoding="utf-8")
    assert deployment_bytes(tmp_path) == 137
    assert deployment_bytes(tmp_path / "merged" / "ties") == 103
