import pytest

from multitune.evaluation.evaluate import average_main_score, format_table
from multitune.evaluation.metrics import METRICS, build_metrics


def metric(name, **kw):
    return METRICS.build(name, injected={"positive_label": kw.get("positive_label")})


def test_classification_metrics_known_values():
    refs = ["spam", "ham", "ham", "spam", "ham"]
    preds = ["spam", "spam", "ham", "ham", "ham"]
    assert metric("accuracy")(preds, refs) == pytest.approx(0.6)
    assert metric("f1", positive_label="spam")(preds, refs) == pytest.approx(0.5)  # P = R = 1/2
    assert metric("macro_f1")(preds, refs) == pytest.approx((0.5 + 2 / 3) / 2)
    assert metric("mcc")(preds, refs) == pytest.approx(1 / 6)


def test_regression_metrics():
    assert metric("pearson")([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert metric("spearman")([1.0, 5.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(1.0)
    assert metric("pearson")([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0  # constant prediction
    assert metric("mse")([1.0, 2.0], [1.0, 4.0]) == pytest.approx(2.0)


def test_entity_f1_counts_whole_entities():
    refs = [["B-per", "I-per", "O", "B-loc"]]
    preds = [["B-per", "O", "O", "B-loc"]]  # the person span is cut short: wrong entity
    assert metric("entity_f1")(preds, refs) == pytest.approx(0.5)
    assert metric("token_accuracy")(preds, refs) == pytest.approx(0.75)


def test_entity_f1_is_strict_iob2():
    # Gold: X over words 0-1, Y at word 3. Predicted: I-X I-X opens no entity under IOB2, so only Y is
    # predicted: precision 1/1, recall 1/2, F1 = 2 * 1 * 0.5 / 1.5 = 2/3 (the lenient reading would give 1.0).
    refs = [["B-X", "I-X", "O", "B-Y"]]
    preds = [["I-X", "I-X", "O", "B-Y"]]
    assert metric("entity_f1")(preds, refs) == pytest.approx(2 / 3)
    # A type change inside a span ends it: B-X I-Y is X(0) and no Y; gold X(0-1) is missed: F1 = 0.
    assert metric("entity_f1")([["B-X", "I-Y"]], [["B-X", "I-X"]]) == 0.0
    assert metric("entity_f1")([["I-X", "I-X"]], [["B-X", "I-X"]]) == 0.0


def test_entity_f1_refuses_tags_that_are_not_iob2():
    with pytest.raises(ValueError, match="'PER' is not IOB2"):
        metric("entity_f1")([["PER", "O"]], [["PER", "O"]])
    with pytest.raises(ValueError, match="'E-X' is not IOB2"):
        metric("entity_f1")([["E-X"]], [["B-X"]])


def test_average_negates_lower_is_better_and_table_lists_tasks():
    results = {
        "a": {
            "split": "test",
            "n": 3,
            "metrics": {"accuracy": 0.8},
            "main_metric": "accuracy",
            "main_score": 0.8,
            "higher_is_better": True,
        },
        "b": {
            "split": "test",
            "n": 3,
            "metrics": {"mse": 0.4},
            "main_metric": "mse",
            "main_score": 0.4,
            "higher_is_better": False,
        },
    }
    assert average_main_score(results) == pytest.approx(0.2)
    table = format_table(results, 0.2)
    assert "accuracy=0.8000" in table and table.splitlines()[-1].startswith("average")


def test_build_metrics_passes_the_positive_label():
    (f1,) = build_metrics(["f1"], positive_label="yes")
    assert f1(["yes", "no"], ["yes", "yes"]) == pytest.approx(2 / 3)


def test_a_table_of_many_tasks_prints_the_weakest_and_strongest_around_a_count():
    """25 tasks, limit 6: the 3 lowest and 3 highest signed main scores (an error metric counts negated), weakest
    first, and one row for the 19 left out naming where every score is; 6 tasks or fewer: every row."""
    results = {
        f"t{i:02d}": {"split": "test", "n": 4, "metrics": {"accuracy": i / 100}, "main_metric": "accuracy",
                      "main_score": i / 100, "higher_is_better": True}
        for i in range(24)
    }  # fmt: skip
    results["err"] = {
        "split": "test",
        "n": 4,
        "metrics": {"mse": 0.5},
        "main_metric": "mse",
        "main_score": 0.5,
        "higher_is_better": False,
    }  # fmt: skip  (signed -0.5: the weakest)
    lines = format_table(results, 0.1, limit=6, where="runs/x/metrics.json").splitlines()
    names = [line.split()[0] for line in lines[2:]]
    assert names == ["err", "t00", "t01", "...", "t21", "t22", "t23", "average"]
    assert "19 more tasks" in lines[5] and "every task's scores: runs/x/metrics.json" in lines[5]
    few = {n: results[n] for n in ["t05", "t01", "err"]}
    assert [line.split()[0] for line in format_table(few, limit=6).splitlines()[2:]] == ["t05", "t01", "err"]
