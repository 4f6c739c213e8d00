"""Predict a task's rows in length-sorted batches, decode outputs, and score them with the task's metrics."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from multitune.data.collate import collate
from multitune.data.tasks import TaskData
from multitune.data.tokens import Encoded
from multitune.data.windows import PredictionRow, expand, gather
from multitune.evaluation.generation import generate_predictions
from multitune.evaluation.metrics import build_metrics
from multitune.models.multitask import MultiTaskModel


@torch.no_grad()
def predict(
    model: MultiTaskModel,
    task: TaskData,
    records: Sequence[PredictionRow],
    batch_size: int,
    device: torch.device,
    pad_id: int,
    progress: str | None = None,
) -> list[dict[str, Any]]:
    """One dict per record: {"prediction": ...} plus class probabilities for classification tasks; generation
    tasks generate their text greedily; a token record tagged in windows gets one tag per word all the same.
    `progress`: the label of a bar of rows done (None: no bar)."""
    was_training = model.training
    model.eval()
    rows, spans = expand(records)
    bar = progress_bar(len(rows), progress)
    if task.config.type == "generation":
        generated = generate_predictions(model, task, rows, batch_size, pad_id, bar.update)
        bar.close()
        model.train(was_training)
        return generated
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))  # less padding per batch
    results: list[dict[str, Any]] = [{} for _ in rows]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate({task.name: [rows[i] for i in chunk]}, pad_id).to(device)
        outputs = model(batch)[task.name].float().cpu()
        for j, i in enumerate(chunk):
            results[i] = decode(task, outputs[j], rows[i])
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return gather(records, results, spans)


def progress_bar(total: int, label: str | None) -> Any:
    """A bar of rows on stderr, as the training bar: evaluation and generation can take minutes. None with no
    label (`training.progress: false`), nor where stderr is not a terminal (a log would fill with redraws)."""
    return tqdm(
        total=total,
        desc=label,
        unit="rows",
        disable=True if label is None else None,
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )


def decode(task: TaskData, output: torch.Tensor, row: Encoded) -> dict[str, Any]:
    kind = task.config.type
    labels = task.labels or []
    if kind == "regression":
        return {"prediction": float(output) * task.target_std + task.target_mean}
    if kind == "token_classification":
        ids = output.argmax(-1).tolist()  # [L]
        return {"prediction": ["O" if s < 0 else labels[ids[s]] for s in row.word_starts or []]}
    return class_prediction(labels, output)


def class_prediction(labels: Sequence[str], logits: torch.Tensor) -> dict[str, Any]:
    """One row's class logits [C] -> its predicted label and each label's probability."""
    probabilities = logits.softmax(-1).tolist()
    return {
        "prediction": labels[int(logits.argmax())],
        "probabilities": {label: round(p, 6) for label, p in zip(labels, probabilities, strict=True)},
    }


def references(task: TaskData, split: str) -> list[Any]:
    kind = task.config.type
    examples = task.splits[split]
    if kind == "regression":
        return [float(e.label) for e in examples]  # type: ignore[arg-type]
    if kind == "token_classification":
        return [list(e.label) for e in examples]  # type: ignore[arg-type]
    return [str(e.label) for e in examples]


def score(task: TaskData, predictions: Sequence[Any], refs: Sequence[Any], split: str) -> dict[str, Any]:
    """The metrics.json entry of one task."""
    config = task.config
    return score_with(config.metrics or [], config.main_metric, config.positive_label, predictions, refs, split)


def score_with(
    metric_names: Sequence[str],
    main_metric: str | None,
    positive_label: str | None,
    predictions: Sequence[Any],
    refs: Sequence[Any],
    split: str,
) -> dict[str, Any]:
    """The metrics.json entry of one task from its metric names: every metric, and the main one's score."""
    metrics = build_metrics(metric_names, positive_label)
    values = {metric.name: round(metric(predictions, refs), 6) for metric in metrics}
    main = main_metric or metrics[0].name
    higher = next(m.higher_is_better for m in metrics if m.name == main)
    return {
        "split": split,
        "n": len(refs),
        "metrics": values,
        "main_metric": main,
        "main_score": values[main],
        "higher_is_better": higher,
    }


def evaluate(
    model: MultiTaskModel,
    tasks: dict[str, TaskData],
    encoded: Mapping[str, Mapping[str, Sequence[PredictionRow]]],
    split: str,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """{task: metrics entry} on `split`; a task without that split is scored on validation instead. With
    `progress`, a bar per task (on a terminal)."""
    out = {}
    for name, task in tasks.items():
        use = split if split in task.splits else "validation"
        rows = encoded[name][use]
        label = f"{use} {name}" if progress else None
        predictions = [r["prediction"] for r in predict(model, task, rows, batch_size, device, pad_id, label)]
        out[name] = score(task, predictions, references(task, use), use)
    return out


def average_main_score(results: dict[str, dict[str, Any]]) -> float:
    """Mean over tasks of the main score, negated where lower is better: the one number to select on."""
    signed = [_signed(r) for r in results.values()]
    return round(sum(signed) / len(signed), 6)


def _signed(result: dict[str, Any]) -> float:
    return float(result["main_score"] if result["higher_is_better"] else -result["main_score"])


TABLE_HEADER = ["task", "split", "n", "main metric", "score", "all metrics"]


def table_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row of text cells per task, for the printed table and the report."""
    return [
        [
            name,
            r["split"],
            str(r["n"]),
            r["main_metric"],
            f"{r['main_score']:.4f}",
            "  ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items()),
        ]
        for name, r in results.items()
    ]


PRINTED_TASKS = 20  # tasks a printed table shows at most: a mixture of hundreds reads as noise on a terminal


def format_table(
    results: dict[str, dict[str, Any]], average: float | None = None, limit: int | None = None, where: str = ""
) -> str:
    """The scores as a text table, one row per task, then the average. With more than `limit` tasks, only the
    limit/2 weakest and the limit/2 strongest by signed main score (higher is better, as the average counts
    it), weakest first, around one row saying how many are left out and `where` every score is."""
    header = TABLE_HEADER
    if limit is not None and len(results) > limit:
        ranked = sorted(results, key=lambda n: (_signed(results[n]), n))
        low, high = ranked[: limit // 2], ranked[len(ranked) - (limit - limit // 2) :]
        left_out = len(results) - len(low) - len(high)
        every = f"every task's scores: {where}" if where else ""
        middle = ["...", "", "", f"{left_out} more tasks", "", every]
        rows = [*table_rows({n: results[n] for n in low}), middle, *table_rows({n: results[n] for n in high})]
    else:
        rows = table_rows(results)
    if average is not None:
        rows.append(["average", "", "", "main score", f"{average:.4f}", ""])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def change_text(entry: dict[str, Any]) -> str:
    """A task's relative change from single- to multi-task, signed so that + is better (as Δm counts it)."""
    sign = 1 if entry["higher_is_better"] else -1
    if abs(entry["single"]) <= 1e-9:
        return "n/a (single-task score 0)"
    change = sign * (entry["multi"] - entry["single"]) / abs(entry["single"]) * 100 + 0.0  # no "-0.0%"
    return f"{change:+.1f}%"
