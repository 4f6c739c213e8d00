"""What the comparison measures of each side: Δm over the tasks, and what a deployment stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def delta_m(tasks: dict[str, dict[str, Any]]) -> float:
    """Δm in percent (Maninis et al. 2019): mean over tasks of the relative change of the main metric,
    signed so that positive is better. A task whose single-task score is 0 (e.g. an MCC of a constant
    predictor) has no relative change and is left out; `delta_m_excluded` names such tasks."""
    changes = []
    for name in delta_m_tasks(tasks):
        entry = tasks[name]
        single, multi = entry["single"], entry["multi"]
        sign = 1.0 if entry["higher_is_better"] else -1.0
        changes.append(sign * (multi - single) / abs(single))
    return 100.0 * sum(changes) / len(changes) if changes else 0.0


def delta_m_tasks(tasks: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name, entry in tasks.items() if abs(entry["single"]) > 1e-9]


def deployment_bytes(run_dir: Path) -> int:
    """What a run's deployment keeps on disk: its weight files (the model, per-task adapters, per-task
    fine-tuned copies), not its training checkpoints, nor another run kept inside its folder (a folder with
    its own config.yaml, such as the merges `compare --merge` writes under `merged/`)."""

    inner = {config.parent for config in run_dir.rglob("config.yaml") if config.parent != run_dir}

    def own(path: Path) -> bool:
        return "checkpoints" not in path.relative_to(run_dir).parts and inner.isdisjoint(path.parents)

    return sum(path.stat().st_size for path in run_dir.rglob("*.safetensors") if own(path))
