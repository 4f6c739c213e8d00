"""Text metrics of generated outputs, on hand-computed examples."""

import pytest

from multitune.evaluation.metrics import METRICS, first_number, numbers


def metric(name):
    return METRICS.build(name, injected={"positive_label": None})


def test_exact_match_ignores_case_and_whitespace():
    assert metric("exact_match")(["Positive ", "a  b", "no"], ["positive", "A b", "yes"]) == pytest.approx(2 / 3)


def test_accuracy_on_verbalized_labels():
    assert metric("accuracy")(["positive", "negative", "positive."], ["positive", "positive", "positive"]) == (
        pytest.approx(1 / 3)
    )


def test_bleu_and_chrf_are_sacrebleu_scaled_to_one():
    import sacrebleu

    hyps, refs = ["ein hund rennt im park", "eine katze"], ["ein hund rennt im park", "eine katze sitzt"]
    assert metric("bleu")(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score / 100)
    assert metric("bleu")(refs, refs) == pytest.approx(1.0)
    assert metric("chrf")(refs, refs) == pytest.approx(1.0)
    assert 0 < metric("chrf")(hyps, refs) < 1


def test_rouge_l_is_the_mean_lcs_f_measure():
    # "the cat sat" vs "the cat sat down": LCS 3, precision 3/3, recall 3/4, F = 6/7; second pair F = 0
    assert metric("rouge_l")(["the cat sat", "dog"], ["the cat sat down", "bird"]) == pytest.approx((6 / 7) / 2)


def test_pearson_reads_the_first_number_and_unparseable_counts_as_the_reference_mean():
    assert first_number("about 3.8 out of 5") == 3.8 and first_number("none") is None and first_number(2) == 2.0
    preds, refs = numbers(["1.0", "it is 2", "no idea", "4"], ["1.0", "2.0", "3.0", "4.0"])
    assert preds == [1.0, 2.0, 2.5, 4.0] and refs == [1.0, 2.0, 3.0, 4.0]
    from scipy.stats import pearsonr

    assert metric("pearson")(["1.0", "it is 2", "no idea", "4"], ["1.0", "2.0", "3.0", "4.0"]) == pytest.approx(
        pearsonr(preds, refs)[0]
    )
    assert metric("pearson")([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)  # regression floats as before
    assert metric("pearson")(["x", "y"], ["1", "2"]) == 0.0  # nothing parseable: constant predictions
