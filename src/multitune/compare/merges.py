"""The comparison's merge rows: the single-task baselines merged into one backbone by each merge method
(runs/merge.py), scored on the same tasks and metrics, each method's settings chosen on validation. Its
storage is the merged run's weight files; its time the baselines' training plus the merge and its choice."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multitune.compare.measures import delta_m, deployment_bytes
from multitune.core.files import replace_folder
from multitune.runs.merge import merge_runs

# the settings each method's choice on validation tries (the papers' usual ranges), and those it fixes
GRIDS: dict[str, dict[str, list[float]]] = {
    "task_arithmetic": {"scaling": [0.3, 0.5, 0.7, 1.0]},
    "ties": {"scaling": [0.5, 0.7, 1.0]},
    "dare": {"scaling": [0.3, 0.5, 0.7, 1.0]},
    "dare_ties": {"scaling": [0.5, 0.7, 1.0]},
    "regmean": {"alpha": [0.3, 0.6, 0.9, 1.0]},
    "regmean_plusplus": {"alpha": [0.3, 0.6, 0.9, 1.0]},
    "tsv": {"scaling": [0.5, 1.0, 1.5, 2.0, 3.0]},
    "iso_c": {"scaling": [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]},
}
FIXED: dict[str, dict[str, float]] = {"ties": {"density": 0.2}, "dare": {"density": 0.5}, "dare_ties": {"density": 0.5}}


def merge_rows(
    methods: Sequence[str],
    baseline_runs: dict[str, Path],
    single_scores: dict[str, dict[str, Any]],
    single_wall_seconds: float,
    folder: Path,
) -> dict[str, dict[str, Any]]:
    """{method: {"tasks": {task: main score}, "delta_m_percent", "average_main_score", "settings",
    "storage_bytes", "wall_seconds"}} for the baselines in `baseline_runs` (task -> run directory); Δm is
    against the same baselines (`single_scores`: comparison.json's task entries)."""
    rows = {}
    for method in dict.fromkeys(methods):  # each method once, in the order given
        fresh = merge_runs(list(baseline_runs.values()), method, FIXED.get(method), GRIDS.get(method), folder, method)
        run = (folder / method).resolve()
        if fresh.resolve() != run:  # an earlier comparison's merge by this method: replaced once this one is done
            replace_folder(fresh, run)
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        scores = {task: metrics["tasks"][task]["main_score"] for task in baseline_runs}
        entries = {task: {**single_scores[task], "multi": score} for task, score in scores.items()}
        rows[method] = {
            "tasks": scores,
            "delta_m_percent": round(delta_m(entries), 3),
            "average_main_score": metrics["average_main_score"],
            "settings": metrics["merge"]["settings"],
            "storage_bytes": deployment_bytes(run),
            "wall_seconds": round(single_wall_seconds + metrics["wall_seconds"], 2),
            "run": str(run),
        }
    return rows


def format_merges(result: dict[str, Any]) -> list[str]:
    """comparison.md's merge table (none without merge rows)."""
    merges = result.get("merges") or {}
    if not merges:
        return []
    tasks = list(result["tasks"])
    loops_only = bool(result.get("budget", {}).get("multi_time"))  # --from-run: the joint run's loops, not its wall
    mark = "*" if loops_only else ""
    lines = [
        "",
        "Merged from the single-task baselines (settings chosen on validation):",
        "",
        "| model | " + " | ".join(tasks) + " | Δm | stored bytes | time (s) |",
        "|---|" + "---|" * (len(tasks) + 3),
        "| one model per task | "
        + " | ".join(f"{result['tasks'][t]['single']:.4f}" for t in tasks)
        + f" | 0.00% | {result['storage_bytes']['single_total']:,} | {result['wall_seconds']['single_total']:.1f} |",
        "| joint multi-task | "
        + " | ".join(f"{result['tasks'][t]['multi']:.4f}" for t in tasks)
        + f" | {result['delta_m_percent']:+.2f}% | {result['storage_bytes']['multi']:,} | "
        f"{result['wall_seconds']['multi']:.1f}{mark} |",
    ]
    for method, row in merges.items():
        settings = ", ".join(f"{k}={_setting(v)}" for k, v in row["settings"].items())
        lines.append(
            f"| merge: {method}{f' ({settings})' if settings else ''} | "
            + " | ".join(f"{row['tasks'][t]:.4f}" for t in tasks)
            + f" | {row['delta_m_percent']:+.2f}% | {row['storage_bytes']:,} | {row['wall_seconds']:.1f} |"
        )
    if loops_only:
        lines += ["", "\\* an existing run (`--from-run`): its training loops' time, not a wall time like the others."]
    return lines


def _setting(value: Any) -> str:
    """A chosen setting as comparison.md shows it: a number, or AdaMerging's learned coefficients
    ({layer or "all": [λ per task]}) as their one list or the number of layers they cover."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    if isinstance(value, dict) and len(value) == 1:
        (only,) = value.values()
        return "[" + ", ".join(f"{v:.3g}" for v in only) + "]" if isinstance(only, list) else str(only)
    if isinstance(value, dict):
        return f"learned for {len(value)} layers (comparison.json)"
    return str(value)
