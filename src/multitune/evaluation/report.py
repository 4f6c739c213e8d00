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
from multitune.core.files import write_text
from multitune.core.history import read_history
from multitune.evaluation.evaluate import TABLE_HEADER, table_rows


def _figure(draw: Any) -> Any:
    """A matplotlib figure drawn by `draw(axes)`; constrained layout makes room for a legend beside the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8.5, 3.6), dpi=100, layout="constrained")
    draw(axes)
    return figure


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _lines(axes: Any, series: dict[str, tuple[list[int], list[float]]], ylabel: str, colors: dict[str, Any]) -> None:
    """One curve per series against whole-number steps. A one-point curve is a visible dot (a line needs two
    points), and the legend sits beside the plot, where it covers no curve."""
    from matplotlib.ticker import MaxNLocator

    for name in sorted(series):
        xs, ys = series[name]
        color = colors.get(name.split(" (")[0])
        marker = "o" if len(xs) == 1 else "." if len(xs) < 30 else None
        axes.plot(xs, ys, label=name, color=color, marker=marker, markersize=7 if len(xs) == 1 else 5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps are whole: no tick at 2.5
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    if series:
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    axes.grid(alpha=0.3)


def varies(series: dict[str, tuple[list[int], list[float]]]) -> bool:
    """Whether any curve changes over time: a flat plot (equal weights, fixed sampling) says nothing a
    sentence cannot."""
    return any(max(ys) - min(ys) > 1e-9 for _, ys in series.values() if ys)


def _constant(series: dict[str, tuple[list[int], list[float]]]) -> str:
    return ", ".join(f"{name} {ys[0]:.4g}" for name, (_, ys) in sorted(series.items()) if ys)


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


def _read(run_dir: Path, name: str) -> Any:
    path = run_dir / name
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def data_summary(tasks: dict[str, Any]) -> list[list[str]]:
    """One row per task from tasks.json: its type, rows per split, labels and data files."""
    rows = []
    for name, task in sorted(tasks.items()):
        if not isinstance(task, dict):
            continue
        splits = ", ".join(f"{split} {n}" for split, n in (task.get("rows") or {}).items())
        labels = task.get("labels") or []
        shown = ", ".join(map(str, labels[:8])) + (f", ... ({len(labels)} in all)" if len(labels) > 8 else "")
        names = [Path(str(f)).name for f in (task.get("fingerprint") or {})]
        if task.get("streamed_train"):  # a streamed train split: its files, not fingerprinted
            names = [f"{Path(f.strip()).name} (streamed)" for f in str(task["streamed_train"]).split(",")] + names
        files = ", ".join(names)
        rows.append([name, str(task.get("type", "")), splits, shown, files])
    return rows


MAX_PLOTTED = 12  # tasks per plot: more curves than colors, or a matrix of hundreds of rows, reads as noise


def plotted_tasks(names: list[str], rows: dict[str, int]) -> list[str]:
    """The tasks the plots show: all of them up to MAX_PLOTTED, else the MAX_PLOTTED that trained on the
    most rows (ties by name), in name order."""
    if len(names) <= MAX_PLOTTED:
        return list(names)
    ranked = sorted(names, key=lambda name: (-int(rows.get(name, 0)), name))
    return sorted(ranked[:MAX_PLOTTED])


def _only(entry: dict[str, Any], tasks: set[str]) -> dict[str, Any]:
    """A history entry with its per-task mappings cut to `tasks`."""
    out = dict(entry)
    for key in ("losses", "weights", "probabilities", "token_shares", "validation"):
        if isinstance(entry.get(key), dict):
            out[key] = {name: value for name, value in entry[key].items() if name in tasks}
    return out


def token_mixture(entries: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """{task: (mean logged sampling probability, share of the training tokens at the last entry)} from the
    history's training entries; empty when the run counted no tokens."""
    last = next((e["token_shares"] for e in reversed(entries) if isinstance(e.get("token_shares"), dict)), None)
    logged = [e["probabilities"] for e in entries if isinstance(e.get("probabilities"), dict)]
    if not last or not logged:
        return {}
    names = sorted(set(last) | {n for p in logged for n in p})
    return {n: (sum(p.get(n, 0.0) for p in logged) / len(logged), float(last.get(n, 0.0))) for n in names}


def _share_bars(axes: Any, shares: dict[str, tuple[float, float]]) -> None:
    names = list(shares)
    xs = range(len(names))
    axes.bar([x - 0.2 for x in xs], [shares[n][0] for n in names], width=0.4, label="sampling probability (mean)")
    axes.bar([x + 0.2 for x in xs], [shares[n][1] for n in names], width=0.4, label="share of training tokens")
    axes.set_xticks(list(xs), names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    axes.set_ylabel("share")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    axes.grid(alpha=0.3, axis="y")


def report_figures(run_dir: Path) -> tuple[list[tuple[str, Any]], list[str]]:
    """The report's figures as (title, matplotlib figure), and a sentence for each plot left out because
    its curves are flat."""
    history = [e for e in read_history(run_dir / "history.jsonl") if isinstance(e.get("step"), int)]
    metrics, affinity = _read(run_dir, "metrics.json"), _read(run_dir, "affinity.json")
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
    figures: list[tuple[str, Any]] = []
    notes: list[str] = []
    shown = plotted_tasks(task_names, (metrics or {}).get("task_rows") or {})
    colors = {name: palette[i % len(palette)] for i, name in enumerate(shown)}  # one color per task
    if len(shown) < len(task_names):
        notes.append(
            f"{len(task_names)} tasks: the plots show the {len(shown)} that trained on the most rows "
            f"({', '.join(shown)}); metrics.json and history.jsonl hold every task."
        )
    history = [_only(entry, set(shown)) for entry in history]

    train_entries = [h for h in history if "losses" in h]
    if train_entries:
        losses = _series(train_entries, "losses")
        figures.append(
            ("Training loss per task (running mean)", _figure(lambda ax: _lines(ax, losses, "loss", colors)))
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
        figures.append(("Validation main metric per task", _figure(lambda ax: _lines(ax, curves, "score", colors))))
    for key, title, label in (
        ("weights", "Loss weights over time", "weight"),
        ("probabilities", "Sampling probabilities over time", "probability"),
    ):
        series = _series(train_entries, key)
        if not series:
            continue
        if varies(series):
            figures.append((title, _figure(lambda ax, series=series, label=label: _lines(ax, series, label, colors))))
        else:
            notes.append(f"{title.split(' over')[0]} stayed constant: {_constant(series)}.")
    shares = token_mixture(train_entries)
    if shares:
        figures.append(
            (
                "Share of training tokens per task against its sampling probability",
                _figure(lambda ax: _share_bars(ax, shares)),
            )
        )
    if affinity:
        names = affinity["tasks"]
        if len(names) > MAX_PLOTTED:  # the shown tasks' rows and columns of the matrices
            keep = [i for i, name in enumerate(names) if name in shown]
            affinity = {
                **affinity,
                **{
                    k: [[affinity[k][i][j] for j in keep] for i in keep]
                    for k in ("gradient_cosine", "lookahead_affinity")
                },
            }
            names = [names[i] for i in keep]
        figures.append(
            (
                "Gradient conflict: cosine of task gradients (mean over samples)",
                _figure(lambda ax: _heatmap(ax, names, affinity["gradient_cosine"], "cosine")),
            )
        )
        figures.append(
            (
                "Lookahead task affinity: row task's step helps (+) or hurts (-) column task",
                _figure(lambda ax: _heatmap(ax, names, affinity["lookahead_affinity"], "affinity")),
            )
        )
    return figures, notes


def build_report(run_dir: Path) -> str:
    from multitune.evaluation.evaluate import change_text

    metrics, comparison, affinity = (_read(run_dir, n) for n in ("metrics.json", "comparison.json", "affinity.json"))
    sections: list[str] = []
    figures, notes = report_figures(run_dir)
    if metrics:
        rows = table_rows(metrics["tasks"])
        sections.append("<h2>Scores</h2>" + _table(TABLE_HEADER, rows))
        if "steps" in metrics:
            trained = (
                f"{metrics['steps']} steps, {metrics['train_seconds']:.1f} s of training; "
                f"best validation at step {metrics.get('best_step', '?')}."
            )
        else:  # a merged run (multitune merge) trains nothing: its merge section says what it did
            trained = f"merged by {metrics.get('merge', {}).get('method', '?')}, without training."
        sections.append(f"<p>Average main score {metrics['average_main_score']:.4f}; {trained}</p>")
    if comparison:
        rows = [
            [t, e["metric"], f"{e['single']:.4f}", f"{e['multi']:.4f}", change_text(e)]
            for t, e in comparison["tasks"].items()
        ]
        sections.append(
            "<h2>Multi-task against single-task</h2>"
            + _table(["task", "metric", "single-task", "multi-task", "change"], rows)
            + f"<p>Δm {comparison['delta_m_percent']:+.2f}%. {html.escape(comparison['verdict'])}</p>"
        )
    if comparison and comparison.get("merges"):
        sections.append(_merge_section(comparison))
    if affinity and affinity.get("groups"):
        groups = "; ".join(" + ".join(g) for g in affinity["groups"])
        sections.append(f"<h2>Suggested task groups</h2><p>{html.escape(groups)}</p>")
    if affinity and affinity.get("no_self_transfer"):
        flagged = ", ".join(affinity["no_self_transfer"])
        sections.append(f"<p>Flagged, as {html.escape(NO_SELF_TRANSFER)}: {html.escape(flagged)}</p>")
    for title, figure in figures:
        sections.append(
            f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{_png(figure)}">'
        )
    sections += [f"<p>{html.escape(note)}</p>" for note in notes]
    tasks = _read(run_dir, "tasks.json")
    if isinstance(tasks, dict) and tasks:
        sections.append("<h2>Data</h2>" + _table(["task", "type", "rows", "labels", "files"], data_summary(tasks)))
    config = run_dir / "config.yaml"
    if config.is_file():
        text = config.read_text(encoding="utf-8", errors="replace")
        sections.append(f"<h2>Config</h2><pre>{html.escape(text)}</pre>")
    title = html.escape(run_dir.name)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>multitune report: {title}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:14px}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:13px}}</style></head>
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


def merge_models(comparison: dict[str, Any]) -> list[tuple[str, dict[str, float], float, int]]:
    """The comparison's roads to one model side by side: (name, {task: main test score}, Δm %, stored bytes)
    for one model per task, joint multi-task training, and each merge of the single-task models."""
    tasks = comparison["tasks"]
    storage = comparison.get("storage_bytes") or {}
    models = [
        ("one model per task", {t: e["single"] for t, e in tasks.items()}, 0.0, int(storage.get("single_total", 0))),
        (
            "joint multi-task",
            {t: e["multi"] for t, e in tasks.items()},
            comparison["delta_m_percent"],
            int(storage.get("multi", 0)),
        ),
    ]
    for method, row in comparison["merges"].items():
        models.append((f"merge: {method}", row["tasks"], row["delta_m_percent"], int(row["storage_bytes"])))
    return models


def _merge_section(comparison: dict[str, Any]) -> str:
    """The merge rows as a table and a plot of each model's Δm against its stored size."""
    models = merge_models(comparison)
    tasks = list(comparison["tasks"])
    rows = [
        [name, *(f"{scores[t]:.4f}" for t in tasks), f"{delta:+.2f}%", f"{stored / 1e6:.1f}"]
        for name, scores, delta, stored in models
    ]
    table = _table(["model", *tasks, "Δm", "stored MB"], rows)

    def draw(axes: Any) -> None:
        names = [name for name, *_ in models]
        deltas = [delta for _, _, delta, _ in models]
        bars = axes.barh(names, deltas, color=["#7f7f7f", "#1f77b4", *["#ff7f0e"] * (len(models) - 2)])
        for bar, (_, _, _, stored) in zip(bars, models, strict=True):
            axes.annotate(
                f" {stored / 1e6:.0f} MB",
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                va="center",
                fontsize=8,
            )
        axes.axvline(0.0, color="#333", linewidth=0.8)
        axes.invert_yaxis()
        axes.set_xlabel("Δm against one model per task (%); label: stored size")
        axes.grid(alpha=0.3, axis="x")

    title = "Joint training against merging the single-task models"
    image = f'<img alt="{html.escape(title)}" src="data:image/png;base64,{_png(_figure(draw))}">'
    return f"<h2>{html.escape(title)}</h2>{table}{image}"


def write_report(run_dir: Path) -> Path:
    path = run_dir / "report.html"
    write_text(path, build_report(run_dir))
    return path
