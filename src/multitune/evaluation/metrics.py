"""Metrics from scikit-learn, scipy and seqeval, behind one small protocol and one registry."""

from __future__ import annotations

import math
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
            raise ValueError("metric 'f1' needs the task's positive_label")
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
    """Micro F1 over whole entities, IOB2 (seqeval.metrics.f1_score)."""

    name = "entity_f1"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        from seqeval.metrics import f1_score

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns on tags it cannot parse as entities
            return float(f1_score([list(r) for r in references], [list(p) for p in predictions], zero_division=0))


@METRICS.register("token_accuracy")
class TokenAccuracy:
    """Share of words whose tag is right (all words of all sentences)."""

    name = "token_accuracy"
    higher_is_better = True

    def __call__(self, predictions: Sequence[Any], references: Sequence[Any]) -> float:
        pairs = [(p, r) for ps, rs in zip(predictions, references, strict=True) for p, r in zip(ps, rs, strict=True)]
        return sum(p == r for p, r in pairs) / len(pairs) if pairs else 0.0


def build_metrics(names: Sequence[str], positive_label: str | None = None) -> list[Metric]:
    return [METRICS.build(name, injected={"positive_label": positive_label}) for name in names]
