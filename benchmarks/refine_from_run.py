"""The two-stage refinement applied to a finished joint run: each task refined alone from the run's weights,
kept where it beats the shared model on validation, scored on test, timed; optionally Δm against the
baselines of a comparison.json. Refinement settings differ between calls, the joint weights do not, so two
settings compared this way differ only in their refinement. The adapters' random start differs from the one a
two-stage run draws after its joint stage, so a call reproduces such a run's refinement in distribution, not
to the digit.

    multitune train configs/eight_real_tasks.yaml recipe=recommended run.seed=14 training.eval_every=200 \\
        training.early_stopping.patience=2 training.schedule.name=joint run.name=joint14
    python benchmarks/refine_from_run.py runs/joint14 --set refine_layers=2 \\
        --baselines benchmarks/results/eight_real_tasks_recipe_seed14.json --out refine_top2_seed14.json

The refinement's settings are the recommended recipe's (config/recipes.py), each `--set KEY=VALUE` replacing
one (`finetune_steps`, `refine_r`, `refine_layers`, `finetune_lr`, `finetune_patience`, `keep`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from multitune.catalogue import load_run_config
from multitune.compare import delta_m
from multitune.config import ScheduleConfig, check_refinement
from multitune.config.recipes import RECIPES
from multitune.core.files import WEIGHTS_FILE
from multitune.recipe.launch import build_accelerator
from multitune.recipe.prepare import prepare
from multitune.recipe.two_stage import finetune_per_task, record_finetune
from multitune.training.checkpoint import load_weights


def settings(pairs: list[str]) -> dict[str, Any]:
    schedule = dict(RECIPES["recommended"]["training"]["schedule"])
    for pair in pairs:
        key, _, value = pair.partition("=")
        schedule[key] = yaml.safe_load(value)
    return schedule


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run trained with schedule joint")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a refinement setting")
    parser.add_argument("--baselines", type=Path, help="a comparison.json whose single-task scores Δm is taken against")
    parser.add_argument("--out", type=Path, required=True, help="the results (JSON)")
    args = parser.parse_args()

    single = None if args.baselines is None else json.loads(args.baselines.read_text())["tasks"]  # fails first
    config = load_run_config(args.run / "config.yaml")
    schedule = settings(args.set)
    config.training.schedule = ScheduleConfig.model_validate(schedule)
    check_refinement(config)
    prepared = prepare(config)
    load_weights(prepared.model, args.run / WEIGHTS_FILE)
    accelerator = build_accelerator(config.training)[0]
    prepared.model.to(accelerator.device)

    test, validation = (prepared.score(split, accelerator.device) for split in ("test", "validation"))
    shared = {name: {"validation": validation[name], "test": test[name]} for name in test}
    folder = args.out.with_suffix("")  # the refinements it keeps, beside the results
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results, seconds, kept = finetune_per_task(config, prepared, accelerator, folder, record_finetune(folder), shared)
    wall = time.perf_counter() - started

    tasks = {
        name: {
            "metric": results[name]["main_metric"],
            "shared_validation": validation[name]["main_score"],
            "shared_test": test[name]["main_score"],
            "answered_by": kept[name],
            "test": results[name]["main_score"],
        }
        for name in results
    }
    out: dict[str, Any] = {
        "run": str(args.run),
        "schedule": schedule,
        "tasks": tasks,
        "refine_loop_seconds": round(seconds, 2),
        "refine_wall_seconds": round(wall, 2),
        "joint_train_seconds": json.loads((args.run / "metrics.json").read_text())["train_seconds"],
        "command": " ".join(sys.argv),
    }
    if single is not None:

        def rows(key: str) -> dict[str, dict[str, Any]]:
            return {
                name: {
                    "single": single[name]["single"],
                    "multi": entry[key],
                    "higher_is_better": single[name]["higher_is_better"],
                }
                for name, entry in tasks.items()
            }

        out["delta_m_percent"] = {
            "joint_stage": round(delta_m(rows("shared_test")), 3),
            "refined": round(delta_m(rows("test")), 3),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("refine_loop_seconds", "delta_m_percent") if k in out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
