"""report.html: one self-contained page per run, plots drawn with matplotlib and embedded as PNG data.

Reads what the run wrote (history.jsonl, metrics.json, and comparison.json / affinity.json when present),
so it can be rebuilt at any time with `multitune report RUN_DIR`.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from multitune.analysis.affinity import NO_SELF_TRANSFER
from multitune.evaluation.evaluate import TABLE_HEADER, table_rows
from multitune.training.checkpoint import write_text


def _figure_png(draw: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    draw(axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _lines(axes: Any, series: dict[str, tuple[list[int], list[float]]], ylabel: str, colors: dict[str, Any]) -> None:
    for name in sorted(series):
        xs, ys = series[name]
        color = colors.get(name.split(" (")[0])
        axes.plot(xs, ys, label=name, color=color, marker="." if len(xs) < 30 else None)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    if series:
        axes.legend(fontsize=8)
    axes.grid(alpha=0.3)


def _heatmap(axes: Any, names: list[str], matrix: list[list[float]], label: str) -> None:
    bound = max((abs(v) for row in matrix for v in row), default=1.0) or 1.0
    image = axes.imshow(matrix, cmap="RdBu", vmin=-bound, vmax=bound)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    axes.figure.colorbar(image, ax=axes, label=label)


def _series(history: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for entry in history:
        for name, value in (entry.get(key) or {}).items():
            xs, ys = out.setdefault(name, ([], []))
            xs.append(entry["step"])
            ys.append(value)
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def build_report(run_dir: Path) -> str:
    def read(name: str) -> Any:
        path = run_dir / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    history_path = run_dir / "history.jsonl"
    history = (
        [json.loads(line) for line in history_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if history_path.is_file()
        else []
    )
    metrics, comparison, affinity = read("metrics.json"), read("comparison.json"), read("affinity.json")
    task_names = sorted((metrics or {}).get("tasks", {}) or {n for h in history for n in (h.get("losses") or {})})
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(task_names)}  # one color per task
    sections: list[str] = []
    figures: list[tuple[str, str]] = []

    train_entries = [h for h in history if "losses" in h]
    if train_entries:
        figures.append(
            (
                "Training loss per task (running mean)",
                _figure_png(lambda ax: _lines(ax, _series(train_entries, "losses"), "loss", colors)),
            )
        )
    validation = [h for h in history if "validation" in h]
    if validation:
        mains = {name: entry["main_metric"] for name, entry in (metrics or {}).get("tasks", {}).items()}
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for entry in validation:
            for name, values in entry["validation"].items():
                metric = mains.get(name) or next(iter(values))
                xs, ys = curves.setdefault(f"{name} ({metric})", ([], []))
                xs.append(entry["step"])
                ys.append(values[metric])
        figures.append(("Validation main metric per task", _figure_png(lambda ax: _lines(ax, curves, "score", colors))))
    if any("weights" in h for h in train_entries):
        figures.append(
            (
                "Loss weights over time",
                _figure_png(lambda ax: _lines(ax, _series(train_entries, "weights"), "weight", colors)),
            )
        )
    if any("probabilities" in h for h in train_entries):
        figures.append(
            (
                "Sampling probabilities over time",
                _figure_png(lambda ax: _lines(ax, _series(train_entries, "probabilities"), "probability", colors)),
            )
        )
    if affinity:
        names = affinity["tasks"]
        figures.append(
            (
                "Gradient conflict: cosine of task gradients (mean over samples)",
                _figure_png(lambda ax: _heatmap(ax, names, affinity["gradient_cosine"], "cosine")),
            )
        )
        figures.append(
            (
                "Lookahead task affinity: row task's step helps (+) or hurts (-) column task",
                _figure_png(lambda ax: _heatmap(ax, names, affinity["lookahead_affinity"], "affinity")),
            )
        )

    if metrics:
        rows = table_rows(metrics["tasks"])
        sections.append("<h2>Scores</h2>" + _table(TABLE_HEADER, rows))
        sections.append(
            f"<p>Average main score {metrics['average_main_score']:.4f}; {metrics['steps']} steps, "
            f"{metrics['train_seconds']:.1f} s of training; "
            f"best validation at step {metrics.get('best_step', '?')}.</p>"
        )
    if comparison:
        rows = [[t, e["metric"], f"{e['single']:.4f}", f"{e['multi']:.4f}"] for t, e in comparison["tasks"].items()]
        sections.append(
            "<h2>Multi-task against single-task</h2>"
            + _table(["task", "metric", "single-task", "multi-task"], rows)
            + f"<p>Δm {comparison['delta_m_percent']:+.2f}%. {html.escape(comparison['verdict'])}</p>"
        )
    if affinity and affinity.get("groups"):
        groups = "; ".join(" + ".join(g) for g in affinity["groups"])
        sections.append(f"<h2>Suggested task groups</h2><p>{html.escape(groups)}</p>")
    if affinity and affinity.get("no_self_transfer"):
        flagged = ", ".join(affinity["no_self_transfer"])
        sections.append(f"<p>Flagged, as {html.escape(NO_SELF_TRANSFER)}: {html.escape(flagged)}</p>")
    for title, png in figures:
        sections.append(
            f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
        )
    title = html.escape(run_dir.name)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>multitune report: {title}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:14px}}
img{{max-width:100%}}</style></head>
<body><h1>multitune report: {title}</h1>
{"".join(sections)}
<script>
window.addEventListener("load", function () {{
  var images = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-images", String(images.length));
  var loaded = images.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.body.setAttribute("data-images-loaded", String(loaded.length));
}});
</script>
</body></html>
"""


def write_report(run_dir: Path) -> Path:
    path = run_dir / "report.html"
    write_text(path, build_report(run_dir))
    return path
