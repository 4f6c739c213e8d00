"""`multitune sweep CONFIG key=a,b,c ...`: train one config under several settings, compare side by side.

Every axis `key=v1,v2` multiplies the variants; a plain `key=value` applies to all of them. All variants
are loaded and validated before the first one trains, so a typo in the third costs nothing.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from multitune.catalogue import load_config
from multitune.config import Config
from multitune.core.files import write_json, write_text
from multitune.errors import ConfigError


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and braces: `{name: a, x: 1},b` -> ['{name: a, x: 1}', 'b']."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts]


def variants(assignments: list[str]) -> tuple[list[str], list[list[str]]]:
    """Each `key=a,b` is an axis: (the fixed overrides, every combination of the axes as override lists)."""
    fixed: list[str] = []
    axes: list[list[str]] = []
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise ConfigError(f"sweep argument '{assignment}' is not of the form key=value[,value...]")
        values = split_top_level(raw)
        if len(values) == 1:
            fixed.append(assignment)
        else:
            axes.append([f"{key}={v}" for v in values])
    if not axes:
        raise ConfigError("a sweep needs at least one key with several comma-separated values")
    return fixed, [list(combo) for combo in itertools.product(*axes)]


def label(overrides: list[str]) -> str:
    values = [o.partition("=")[2] for o in overrides]
    text = "+".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", v).strip("-") for v in values)
    return text[:64] or "variant"


def sweep(config_path: str, assignments: list[str], train: Any) -> dict[str, Any]:
    """Train every variant with `train(config) -> run_dir`; write sweep.json and sweep.md; return the table."""
    fixed, combos = variants(assignments)
    configs: list[tuple[str, Config]] = []
    taken: set[str] = set()
    for combo in combos:
        name, n = label(combo), 1
        while name in taken:  # two values that read alike ("a b", "a-b") or one given twice: both rows shown
            n += 1
            name = f"{label(combo)}-{n}"
        taken.add(name)
        configs.append((name, load_config(config_path, fixed + combo)))
    base = configs[0][1].run
    root = _new_dir(Path(base.output_dir), f"{base.name}-sweep")
    results: dict[str, Any] = {}
    for name, config in configs:
        config.run.output_dir, config.run.name = str(root), name
        run_dir = Path(train(config))
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        results[name] = {
            "run_dir": str(run_dir),
            "tasks": {task: entry["main_score"] for task, entry in metrics["tasks"].items()},
            "main_metrics": {task: entry["main_metric"] for task, entry in metrics["tasks"].items()},
            "average_main_score": metrics["average_main_score"],
            "train_seconds": metrics["train_seconds"],
        }
    table = format_sweep(results)
    write_json(root / "sweep.json", {"variants": results})
    write_text(root / "sweep.md", table + "\n")
    print(table)
    print(f"sweep saved to {root}")
    return results


def format_sweep(results: dict[str, Any]) -> str:
    first = next(iter(results.values()))
    tasks = list(first["tasks"])
    header = ["variant", *[f"{t} ({first['main_metrics'][t]})" for t in tasks], "average", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [f"`{name}`", *[f"{r['tasks'][t]:.4f}" for t in tasks], f"{r['average_main_score']:.4f}"]
        lines.append("| " + " | ".join([*cells, f"{r['train_seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def _new_dir(root: Path, name: str) -> Path:
    from multitune.runs.layout import create_run_dir

    return create_run_dir(str(root), name)
