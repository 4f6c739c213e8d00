"""One model per task, trained to convergence, and those models merged by each merge method: the merge rows
of `multitune compare --converge --merge ...` without training the joint side again.

    python benchmarks/merge_baselines.py configs/eight_real_tasks.yaml --seed 13 --patience 2 --max-steps 3000 \
        --merge average,task_arithmetic,ties,dare,adamerging --joint RECORDED_COMPARISON.json --out RESULT.json \
        training.eval_every=200

The baselines are compare's own (`single_task_config`, the same cache under OUTPUT_DIR/.baselines, the same
lock), so a second copy of this command (or a `compare` of the same config) started beside the first trains
the other baselines at the same time and both reuse each other's; give `--merge` to one of them only. The
merges are compare's merge rows (each method's settings chosen on validation). With `--joint`, a recorded
comparison.json of the same config and seed, its joint scores are set beside the merges, with Δm against the
baselines trained here, and each of its recorded baseline scores is checked against the one trained here.
Writes RESULT.json: each baseline's test main score, steps and seconds; each merge row; the joint row.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--merge", default="", help="merge methods, comma-separated (none: train the baselines)")
    parser.add_argument("--joint", default=None, help="a recorded comparison.json of this config and seed")
    parser.add_argument("--out", default=None)
    args = parser.parse_intermixed_args()

    from multitune.catalogue import load_config
    from multitune.compare.measures import delta_m
    from multitune.compare.merges import merge_rows
    from multitune.compare.processes import Progress
    from multitune.compare.run import Budget, single_task_config, trained_baselines

    budget = Budget(converge=True, patience=args.patience, max_steps=args.max_steps)
    budget.check()
    config = budget.applied(load_config(args.config, [*args.overrides, f"run.seed={args.seed}"]))
    baselines = {
        task: single_task_config(config, task, budget.baseline_rows(config.training, 0)) for task in config.tasks
    }
    root = Path(config.run.output_dir)
    started = time.perf_counter()
    records = trained_baselines(baselines, root, Progress(len(baselines), config.training.steps))
    singles = {task: record["metrics"] for task, (record, _) in records.items()}
    entries = {
        task: {
            "single": metrics["tasks"][task]["main_score"],
            "metric": metrics["tasks"][task]["main_metric"],
            "higher_is_better": metrics["tasks"][task]["higher_is_better"],
        }
        for task, metrics in singles.items()
    }
    result: dict = {
        "command": " ".join(["python", *sys.argv]),
        "seed": args.seed,
        "rule": budget.rule(config.training),
        "baselines": {
            task: {
                **entries[task],
                "steps": int(singles[task]["steps"]),
                "train_seconds": float(singles[task]["train_seconds"]),
                "wall_seconds": float(records[task][0]["wall_seconds"]),
                "cached": records[task][1],
            }
            for task in entries
        },
        "baselines_seconds_here": round(time.perf_counter() - started, 1),
    }
    methods = [m for m in args.merge.split(",") if m]
    if methods:
        runs = {task: Path(records[task][0]["run_dir"]) for task in baselines}
        wall = sum(float(record["wall_seconds"]) for record, _ in records.values())
        folder = root / f"{config.run.name}-merged-seed{args.seed}"
        result["merges"] = merge_rows(methods, runs, entries, wall, folder)
    if args.joint:
        recorded = json.loads(Path(args.joint).read_text(encoding="utf-8"))["tasks"]
        joint = {task: {**entries[task], "multi": recorded[task]["multi"]} for task in entries}
        result["joint"] = {
            "from": args.joint,
            "tasks": {task: recorded[task]["multi"] for task in entries},
            "delta_m_percent": round(delta_m(joint), 3),
            "recorded_baselines_match": {
                task: abs(recorded[task]["single"] - entries[task]["single"]) < 5e-4 for task in entries
            },
        }
    result["machine"] = f"{platform.machine()}, {platform.system()}, {time.strftime('%Y-%m-%d')}"
    print(json.dumps({k: v for k, v in result.items() if k != "command"}, indent=1, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
