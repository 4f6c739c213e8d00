"""The LLM instruction mix, measured: one causal LM fine-tuned on several instruction tasks at once (temperature
sampling with T = 2, i.e. the sampling exponent 0.5; uncertainty weighting) against one fine-tuned copy per
task at the same rows per task, beside each task's score at step 0 (the pretrained model as it ships,
prompted with the task's instruction).

    python benchmarks/llm_instruction_mix.py configs/llm_instruction_mix.yaml --out RESULT.json [KEY=VALUE ...]

The overrides (the config's own syntax) size the run; the comparison is `multitune compare` itself (equal
budget: each single-task copy trains on as many rows of its task as the mixed run drew), so the figures are
the ones a user gets. Writes RESULT.json: per task the step-0, single-task and multi-task test scores, Δm,
stored bytes and training seconds of both sides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def step_zero(config_path: str, overrides: list[str]) -> dict[str, dict[str, float]]:
    """Each task's test metrics from the untrained model (the config's prompts, greedy decoding)."""
    import torch

    from multitune.catalogue import load_config
    from multitune.evaluation.evaluate import evaluate
    from multitune.recipe.prepare import prepare

    config = load_config(config_path, overrides)
    prepared = prepare(config)
    prepared.model.eval()
    results = evaluate(
        prepared.model,
        prepared.tasks,
        prepared.scored,
        "test",
        config.training.eval_batch_size,
        torch.device("cpu"),
        prepared.pad_id,
    )
    return {name: entry["metrics"] for name, entry in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    args = parser.parse_intermixed_args()  # overrides may follow --out, as the usage line shows them
    started = time.perf_counter()
    zero = step_zero(args.config, args.overrides)
    zero_seconds = time.perf_counter() - started
    print(json.dumps({"step_zero": zero}, indent=1), flush=True)
    command = [sys.executable, "-m", "multitune", "compare", args.config, *args.overrides, "training.progress=false"]
    subprocess.run(command, check=True)
    from multitune.catalogue import load_config

    config = load_config(args.config, args.overrides)
    comparison = json.loads((Path(config.run.output_dir) / config.run.name / "comparison.json").read_text())
    tasks = {
        name: {
            "metric": entry["metric"],
            "step_zero": zero[name][entry["metric"]],
            "single": entry["single"],
            "multi": entry["multi"],
            "step_zero_metrics": zero[name],
        }
        for name, entry in comparison["tasks"].items()
    }
    result = {
        "command": " ".join(["python benchmarks/llm_instruction_mix.py", args.config, *args.overrides]),
        "tasks": tasks,
        "delta_m_percent": comparison["delta_m_percent"],
        "storage_bytes": comparison.get("storage_bytes"),
        "params": comparison["params"],
        "train_seconds": comparison["train_seconds"],
        "wall_seconds": comparison.get("wall_seconds"),
        "budget": comparison["budget"],
        "step_zero_seconds": round(zero_seconds, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
