"""Metrics from scikit-learn, scipy, seqeval, sacrebleu and rouge-score, behind one small protocol and one registry.

Generated text is scored as text: `exact_match`, `accuracy` (verbalized labels), `bleu`, `chrf`, `rouge_l`;
`pearson` / `spearman` read the first number of each generated text (see `numbers`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from multitune.registry import Registry


@runtime_checkable
class Metric(Protocol):
    name: str
    higher_is_better: bool

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float: ...


METRICS: Registry[Metric] = Registry("metric")
METRIC_INJECTED = ("positive_label",)


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0  # a constant prediction has no correlation: report 0


NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def first_number(value: Any) -> float | None:
    """A number as is; a text's first number (e.g. a generated "3.8 out of 5" -> 3.8); else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    match = NUMBER.search(str(value))
    if match is None:
        return None
    number = float(match.group())
    return number if math.isfinite(number) else None


def numbers(predictions: Sequence[Any], references: Sequence[Any]) -> tuple[list[float], list[float]]:
    """Predictions and references as numbers. A prediction with no number (generated text that is not a
    rating) counts as the mean of the references: it earns no correlation, but does not drop out of the set."""
    refs = [first_number(r) for r in references]
    known = [r for r in refs if r is not None]
    mean = sum(known) / len(known) if known else 0.0
    preds = [first_number(p) for p in predictions]
    return [mean if p is None else p for p in preds], [mean if r is None else r for r in refs]


def normalize_text(text: Any) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(str(text).split()).lower()


@METRICS.register("accuracy")
class Accuracy:
    """Share of exact matches (sklearn.metrics.accuracy_score)."""

    name = "accuracy"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from sklearn.metrics import accuracy_score

        return float(accuracy_score(references, predictions))


@METRICS.register("macro_f1")
class MacroF1:
    """Unweighted mean of per-class F1 (sklearn.metrics.f1_score, average='macro')."""

    name = "macro_f1"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from sklearn.metrics import f1_score

        return float(f1_score(references, predictions, average="macro", zero_division=0))


@METRICS.register("f1")
class PositiveF1:
    """F1 of the task's `positive_label` (sklearn.metrics.f1_score, binary on that label)."""

    name = "f1"
    higher_is_better = True

    def __init__(self, positive_label: str | None = None) -> None:
        if positive_label is None:
            raise ValueError("needs positive_label (the class it scores)")
        self.positive_label = positive_label

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from sklearn.metrics import f1_score

        positive = self.positive_label
        return float(
            f1_score([r == positive for r in references], [p == positive for p in predictions], zero_division=0)
        )


@METRICS.register("mcc")
class MatthewsCorrelation:
    """Matthews correlation coefficient (sklearn.metrics.matthews_corrcoef)."""

    name = "mcc"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from sklearn.metrics import matthews_corrcoef

        return _finite(matthews_corrcoef(references, predictions))


@METRICS.register("pearson")
class Pearson:
    """Pearson correlation of predicted and true scores (scipy.stats.pearsonr)."""

    name = "pearson"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from scipy.stats import pearsonr

        predictions, references = numbers(predictions, references)
        if len(set(predictions)) < 2 or len(set(references)) < 2:
            return 0.0
        return _finite(pearsonr(predictions, references)[0])


@METRICS.register("spearman")
class Spearman:
    """Spearman rank correlation (scipy.stats.spearmanr)."""

    name = "spearman"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from scipy.stats import spearmanr

        predictions, references = numbers(predictions, references)
        if len(set(predictions)) < 2 or len(set(references)) < 2:
            return 0.0
        return _finite(spearmanr(predictions, references)[0])


@METRICS.register("mse")
class MeanSquaredError:
    """Mean squared error (sklearn.metrics.mean_squared_error); lower is better."""

    name = "mse"
    higher_is_better = False

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from sklearn.metrics import mean_squared_error

        return float(mean_squared_error(references, predictions))


@METRICS.register("entity_f1")
class EntityF1:
    """Micro F1 over whole entities, strict IOB2 (seqeval f1_score, mode="strict", scheme IOB2; CoNLL-2003).

    An entity starts at `B-X` and runs over the `I-X` after it; a predicted `I-X` that opens a span (after `O`
    or another type) is no entity. seqeval's default (conlleval's lenient reading) would count it as one.
    Tags must be `O`, `B-X` or `I-X`; anything else raises ValueError.
    """

    name = "entity_f1"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from seqeval.metrics import f1_score
        from seqeval.scheme import IOB2

        for sentence in (*references, *predictions):
            for tag in sentence:
                if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
                    raise ValueError(f"tag '{tag}' is not IOB2 (O, B-TYPE or I-TYPE)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns when a sentence holds no entity
            references_ = [list(r) for r in references]
            predictions_ = [list(p) for p in predictions]
            return float(f1_score(references_, predictions_, mode="strict", scheme=IOB2, zero_division=0))


@METRICS.register("token_accuracy")
class TokenAccuracy:
    """Share of words whose tag is right (all words of all sentences)."""

    name = "token_accuracy"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        pairs = [(p, r) for ps, rs in zip(predictions, references, strict=True) for p, r in zip(ps, rs, strict=True)]
        return sum(p == r for p, r in pairs) / len(pairs) if pairs else 0.0


@METRICS.register("exact_match")
class ExactMatch:
    """Share of generated texts equal to the reference, ignoring case and runs of whitespace."""

    name = "exact_match"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        pairs = list(zip(predictions, references, strict=True))
        return sum(normalize_text(p) == normalize_text(r) for p, r in pairs) / len(pairs) if pairs else 0.0


@METRICS.register("bleu")
class Bleu:
    """Corpus BLEU of generated texts, one reference each (sacrebleu), scaled to 0-1."""

    name = "bleu"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from sacrebleu.metrics import BLEU

        # effective order: n-gram orders absent from the whole corpus (only when every text is under 4
        # tokens) are left out instead of zeroing the score; otherwise this is the standard corpus BLEU
        bleu = BLEU(effective_order=True)
        return float(bleu.corpus_score([str(p) for p in predictions], [[str(r) for r in references]]).score) / 100


@METRICS.register("chrf")
class ChrF:
    """Corpus chrF of generated texts (sacrebleu.corpus_chrf), scaled to 0-1."""

    name = "chrf"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        import sacrebleu

        return float(sacrebleu.corpus_chrf([str(p) for p in predictions], [[str(r) for r in references]]).score) / 100


@METRICS.register("rouge_l")
class RougeL:
    """Mean ROUGE-L F-measure of generated texts (rouge-score, no stemming)."""

    name = "rouge_l"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        pairs = list(zip(predictions, references, strict=True))
        scores = [scorer.score(str(r), str(p))["rougeL"].fmeasure for p, r in pairs]
        return float(sum(scores) / len(scores)) if scores else 0.0


def build_metrics(names: Sequence[str], positive_label: str | None = None) -> list[Metric]:
    return [METRICS.build(name, injected={"positive_label": positive_label}) for name in names]
