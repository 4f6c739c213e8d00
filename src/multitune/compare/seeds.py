"""Comparisons over several seeds in one: each side's mean and spread per task, a verdict per task (gain,
loss or within noise), Δm per seed; and their comparison.md."""

from __future__ import annotations

import math
import statistics
from typing import Any

from multitune.evaluation.evaluate import change_text


def _spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return {
        "mean": round(statistics.fmean(values), 6),
        "std": round(statistics.stdev(values), 6) if len(values) > 1 else 0.0,
    }


def task_verdict(differences: list[float]) -> str:
    """'gain', 'loss' or 'within noise' for a task's signed multi − single differences over seeds (+ is
    better): within noise when the mean difference is under two standard errors of the differences. One
    seed has no noise estimate: its sign decides ('equal' when the scores are equal)."""
    mean = statistics.fmean(differences)
    if len(differences) > 1 and abs(mean) < 2 * statistics.stdev(differences) / math.sqrt(len(differences)):
        return "within noise"
    return "gain" if mean > 0 else "loss" if mean < 0 else "equal"


def aggregate(results: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The comparisons of several seeds in one: per task each side's mean and standard deviation, the
    relative change of the means and a verdict; Δm per seed with its mean and spread; the mean costs."""
    tasks: dict[str, dict[str, Any]] = {}
    for name, first in results[0]["tasks"].items():
        sign = 1.0 if first["higher_is_better"] else -1.0
        single = [r["tasks"][name]["single"] for r in results]
        multi = [r["tasks"][name]["multi"] for r in results]
        means = {"single": statistics.fmean(single), "multi": statistics.fmean(multi), "higher_is_better": sign > 0}
        tasks[name] = {
            "metric": first["metric"],
            "higher_is_better": first["higher_is_better"],
            "single": _spread(single),
            "multi": _spread(multi),
            "change": change_text(means),
            "verdict": task_verdict([sign * (m - s) for m, s in zip(multi, single, strict=True)]),
        }
    per_seed = [r["delta_m_percent"] for r in results]
    # each seed's Δm leaves out the tasks whose single-task score is 0 there: say which, per seed
    excluded = {
        str(seed): r["delta_m_excluded"] for seed, r in zip(seeds, results, strict=True) if r.get("delta_m_excluded")
    }
    return {
        "seeds": seeds,
        "tasks": tasks,
        "delta_m_percent": {"per_seed": per_seed, **_spread(per_seed)},
        **({"delta_m_excluded": excluded} if excluded else {}),
        "params": results[0]["params"],
        "storage_bytes": {
            k: round(statistics.fmean(r["storage_bytes"][k] for r in results)) for k in ("single_total", "multi")
        },
        "wall_seconds": {k: _spread([r["wall_seconds"][k] for r in results]) for k in ("single_total", "multi")},
        "train_seconds": {k: _spread([r["train_seconds"][k] for r in results]) for k in ("single_total", "multi")},
        "budget": {key: value for key, value in results[0]["budget"].items() if key not in ("rows_per_task", "steps")},
        "runs": [r["multi_run"] for r in results if "multi_run" in r],
        **({"merges": _merges(results)} if all(r.get("merges") for r in results) else {}),
    }


def _merges(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each merge method over the seeds: Δm per seed with its mean and spread, each task's score and the
    average main score (mean ± standard deviation), the settings chosen per seed, the mean storage."""
    out: dict[str, dict[str, Any]] = {}
    for method in results[0]["merges"]:
        rows = [r["merges"][method] for r in results]
        per_seed = [row["delta_m_percent"] for row in rows]
        out[method] = {
            "delta_m_percent": {"per_seed": per_seed, **_spread(per_seed)},
            "average_main_score": _spread([row["average_main_score"] for row in rows]),
            "tasks": {task: _spread([row["tasks"][task] for row in rows]) for task in rows[0]["tasks"]},
            "settings": [row["settings"] for row in rows],
            "storage_bytes": round(statistics.fmean(row["storage_bytes"] for row in rows)),
        }
    return out


def format_seeds(summary: dict[str, Any]) -> str:
    """comparison.md over seeds: each task's mean ± standard deviation, then one verdict line per task."""
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [
        f"Seeds: {seeds} (mean ± standard deviation)",
        "",
        "| task | metric | single-task | multi-task | change | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for task, e in summary["tasks"].items():
        single, multi = e["single"], e["multi"]
        lines.append(
            f"| {task} | {e['metric']} | {single['mean']:.4f} ± {single['std']:.4f} | "
            f"{multi['mean']:.4f} ± {multi['std']:.4f} | {e['change']} | {e['verdict']} |"
        )
    dm, storage, wall = summary["delta_m_percent"], summary["storage_bytes"], summary["wall_seconds"]
    lines += [
        "",
        f"Δm: {dm['mean']:+.2f}% ± {dm['std']:.2f} (per seed: {', '.join(f'{d:+.2f}%' for d in dm['per_seed'])})",
        *(
            [f"Δm leaves out tasks whose single-task score is 0: {_excluded(summary['delta_m_excluded'])}"]
            if summary.get("delta_m_excluded")
            else []
        ),
        f"stored on disk: {storage['single_total']:,} bytes (one model per task) vs {storage['multi']:,} bytes",
        f"time in all (wall): {wall['single_total']['mean']:.1f} s (all single-task runs) "
        f"vs {wall['multi']['mean']:.1f} s",
        f"budget: {summary['budget']['rule']}",
        "",
    ]
    lines += [f"{task}: {e['verdict']} ({e['change']})" for task, e in summary["tasks"].items()]
    merges = summary.get("merges") or {}
    if merges:
        tasks = list(summary["tasks"])
        lines += ["", "Merged baselines (mean ± standard deviation over the seeds; Δm against the same baselines):", ""]
        lines += [f"| method | {' | '.join(tasks)} | average | Δm |", "|---" * (len(tasks) + 3) + "|"]
        for method, row in merges.items():
            cells = [f"{row['tasks'][t]['mean']:.4f} ± {row['tasks'][t]['std']:.4f}" for t in tasks]
            average, dm = row["average_main_score"], row["delta_m_percent"]
            lines.append(
                f"| {method} | {' | '.join(cells)} | {average['mean']:.4f} | {dm['mean']:+.2f}% ± {dm['std']:.2f} |"
            )
    return "\n".join(lines)


def _excluded(excluded: dict[str, list[str]]) -> str:
    """ "seed 13: cola; seed 14: cola, rte"."""
    return "; ".join(f"seed {seed}: {', '.join(tasks)}" for seed, tasks in excluded.items())
