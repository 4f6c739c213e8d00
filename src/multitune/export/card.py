"""The exported folder's model card: what the model does, its scores labelled by split, the data it was
trained on with their licenses quoted whole, and how to load it without multitune."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from multitune.config import ModelConfig
from multitune.core.history import read_history
from multitune.data.tasks import TaskData
from multitune.models.backbone import PACKAGED_MODELS, packaged_copy
from multitune.runs.load import refined

KNOWN_LICENSES = {
    "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
}


def model_card(
    run: Path,
    model_config: ModelConfig,
    task_names: list[str],
    task: TaskData,
    loader: str,
    difference: float,
    onnx: bool,
) -> str:
    """README.md: what the model does, what it was trained on, how well it does, how to load it, licenses.
    `task_names`: every task of the run, this one included."""
    base = model_config.backbone
    license_id = base_license(base)
    kind = task.config.type
    others = [name for name in task_names if name != task.name]
    lines = [
        "---",
        f"license: {license_id if license_id != 'unknown' else 'other'}",
        f"base_model: {base}" if not Path(base).exists() else "base_model: local",
        "library_name: transformers",
        "tags: [multitune, multi-task]",
        "---",
        "",
        f"# {task.name}",
        "",
        f"A {kind.replace('_', ' ')} model exported by multitune from run `{run.name}`: one task of a multi-task",
        f"model whose backbone `{base}` was fine-tuned jointly on {len(task_names)} tasks"
        + (f" ({', '.join(others)} besides this one)." if others else "."),
        "",
    ]
    if task.labels and kind != "regression":
        lines += [f"Labels ({len(task.labels)}): {', '.join(f'`{label}`' for label in task.labels)}", ""]
    if kind == "regression":
        lines += [f"Predicts a score (trained targets: mean {task.target_mean:.4g}, std {task.target_std:.4g}).", ""]
    lines += ["## Data", "", *data_lines(run, task), "", "## Metrics", "", *metric_lines(run, task.name), ""]
    lines += [
        "## How to use",
        "",
        "With transformers, torch and safetensors only (no multitune):",
        "",
        "```python",
        loader.rstrip(),
        "```",
        "",
    ]
    if kind != "generation":
        lines += [
            f"Reloaded with plain transformers, this folder reproduced multitune's outputs on probe inputs to "
            f"{difference:.1e} (largest absolute difference).",
            "",
        ]
    if onnx:
        lines += ["`model.onnx`: the encoder and head; inputs `input_ids`, `attention_mask`; output `outputs`.", ""]
    lines += [
        "## Licenses",
        "",
        f"- base model `{base}`: {license_id}",
        *(f"- {line}" for line in data_licenses(task)),
        "",
        "Check each license before using or redistributing the model.",
        "",
    ]
    return "\n".join(lines)


def metric_lines(run: Path, task: str) -> list[str]:
    """Each score once, under the split it was measured on: the final evaluation (test, or validation where
    the task has none), the validation at the step kept as best (what selected the model), and a later
    `multitune evaluate` of a split only where it differs from those."""
    metrics = _json(run / "metrics.json")
    shown: list[tuple[str, dict[str, Any]]] = []
    lines = []

    def add(title: str, split: str, values: dict[str, Any], n: int | None = None) -> None:
        if (split, values) in shown:
            return
        shown.append((split, values))
        count = f" (n={n})" if n is not None else ""
        lines.append(f"- {title}{count}: " + ", ".join(f"{name} {value:.4f}" for name, value in values.items()))

    final = metrics.get("tasks", {}).get(task)
    if final:
        own = "test split" if final["split"] == "test" else f"{final['split']} split (the task has no test split)"
        add(f"{own}, the final evaluation", final["split"], final["metrics"], final["n"])
    selected = selection_scores(run, task, metrics.get("best_step"))
    if selected is not None:
        add(f"validation split at step {metrics['best_step']}, the step kept as best", "validation", selected)
    for split in ("test", "validation", "train"):
        again = _json(run / f"evaluation_{split}.json").get("tasks", {}).get(task)
        if again:
            add(
                f"{again['split']} split, scored again by `multitune evaluate`",
                again["split"],
                again["metrics"],
                again["n"],
            )
    steps = f"- training: {metrics.get('steps', '?')} steps in {metrics.get('train_seconds', '?')} s"
    return (lines or ["- no metrics recorded in the run"]) + [steps]


def selection_scores(run: Path, task: str, best_step: Any) -> dict[str, Any] | None:
    """The task's validation metrics at the multi-task run's best step, from history.jsonl (a two-stage run's
    exported copy was selected on its own fine-tuning: None)."""
    history = run / "history.jsonl"
    if best_step is None or not history.is_file() or refined(run, task) is not None:
        return None
    found = None
    for entry in read_history(history):
        if "stage" in entry or entry.get("step") != best_step:
            continue
        scores = entry.get("validation")
        if isinstance(scores, dict) and isinstance(scores.get(task), dict):
            found = scores[task]  # the last one: a resumed run may have validated that step again
    return found


def data_lines(run: Path, task: TaskData) -> list[str]:
    source = task.config.source
    lines = [f"- format: {source.format}"]
    if source.dataset:
        lines.append(f"- dataset: `{source.dataset}`" + (f" ({source.subset})" if source.subset else ""))
    for split in ("train", "validation", "test"):
        files = getattr(source, split)
        for file in [files] if isinstance(files, str) else files or []:
            lines.append(f"- {split}: `{_shown(file)}`")
    rows = _json(run / "tasks.json").get(task.name, {}).get("rows")
    if rows:
        lines.append("- rows: " + ", ".join(f"{split} {n}" for split, n in rows.items()))
    return lines


def data_licenses(task: TaskData) -> list[str]:
    """The data's license as its folder states it (ATTRIBUTION.md, LICENSE), else a pointer to its card."""
    source = task.config.source
    if source.dataset:
        return [f"data `{source.dataset}`: see its dataset card"]
    files = [f for split in ("train", "validation", "test") for f in _as_list(getattr(source, split))]
    folders = list(dict.fromkeys(Path(f).parent for f in files))
    out = []
    for folder in folders:
        notes = [p for p in (folder / "ATTRIBUTION.md", folder / "LICENSE.txt", folder / "LICENSE") if p.is_file()]
        if not notes:
            out.append(f"data in `{_shown(str(folder))}`: unknown (no ATTRIBUTION.md or LICENSE beside it)")
            continue
        text = notes[0].read_text(encoding="utf-8", errors="replace")
        # whole paragraphs (their wrapped lines joined), never a line cut out of a sentence
        paragraphs = [" ".join(block.split()) for block in re.split(r"\n\s*\n", text)]
        stated = [
            p for p in paragraphs if not p.startswith("#") and re.search(r"licen[cs]e|source:|copyright", p, re.I)
        ]
        summary = " ".join(stated[:2]) if stated else f"see {notes[0].name}"
        out.append(f"data `{_shown(str(folder))}`: {summary}")
    return out


def base_license(name: str) -> str:
    """The base model's license from its model card's front matter (a folder or a packaged copy)."""
    folders = [Path(name)] if Path(name).exists() else []
    packaged = packaged_copy(name) if name in PACKAGED_MODELS else None
    if packaged is not None:
        folders.append(packaged)
    for folder in folders:
        card = folder / "README.md"
        if card.is_file():
            found = re.search(r"^license:\s*(\S+)", card.read_text(encoding="utf-8", errors="replace"), re.M)
            if found:
                return found.group(1)
    return KNOWN_LICENSES.get(name, "unknown")


def _shown(path: str) -> str:
    """A data path as the card shows it: inside the multitune package as `multitune:...`."""
    marker = "/multitune/assets/"
    return "multitune:" + path.split(marker, 1)[1] if marker in path else path


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
