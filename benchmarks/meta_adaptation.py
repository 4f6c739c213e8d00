"""Does Reptile make a new task adapt faster? A held-back task fine-tuned from three starting points.

1. Train the source tasks of a config twice, the same steps and data: once `joint`, once with the
   `reptile` schedule.
2. Fine-tune the held-back task (a task the source runs never saw) from (a) the pretrained backbone,
   (b) the joint multi-task backbone, (c) the Reptile backbone (`model.init_from`), a fresh head each
   time, with a short budget; validate every few steps. Repeated over seeds.

    python benchmarks/meta_adaptation.py                        # four real tasks -> TREC held back
    python benchmarks/meta_adaptation.py --source-steps 400 --adapt-steps 60 --seeds 13 14 15
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from multitune.catalogue import load_config
from multitune.recipe.train import train_run

HERE = Path(__file__).parent
HELD_BACK = {  # TREC question types, from the bundled subset: never part of the source tasks
    "trec": {
        "type": "classification",
        "source": {"format": "jsonl", "train": "multitune:quickstart/trec/train.jsonl"},
        "max_rows": {"train": 300, "validation": 400},
    }
}


def source_run(config: Path, schedule: dict[str, Any], steps: int, out: Path) -> Path:
    name = f"source-{schedule['name']}"
    overrides = [
        f"run.name={name}",
        f"run.output_dir={out}",
        f"training.steps={steps}",
        f"training.schedule={json.dumps(schedule)}",
    ]
    run = out / name
    if (run / "metrics.json").exists():  # already trained: reuse
        return run
    return train_run(load_config(config, overrides))


def adapt(start: Path | None, seed: int, steps: int, every: int, out: Path, label: str) -> list[float]:
    """Validation accuracy of the held-back task after every `every` steps."""
    data = {
        "run": {"name": f"adapt-{label}-{seed}", "output_dir": str(out), "seed": seed},
        "model": {"backbone": "sentence-transformers/all-MiniLM-L6-v2", "max_length": 64},
        "training": {
            "steps": steps,
            "batch_size": 16,
            "lr": 1e-4,
            "head_lr": 1e-3,
            "eval_every": every,
            "checkpoint_every": None,
            "progress": False,
        },
        "sampling": {"name": "uniform"},
        "tasks": HELD_BACK,
    }
    if start is not None:
        data["model"]["init_from"] = str(start.resolve())
    path = out / f"adapt-{label}-{seed}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    run = train_run(load_config(path))
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [h["validation"]["trec"]["accuracy"] for h in history if "validation" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "configs" / "four_real_tasks.yaml")
    parser.add_argument("--source-steps", type=int, default=400)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--meta-lr", type=float, default=0.5)
    parser.add_argument("--adapt-steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 14, 15])
    parser.add_argument("--out", type=Path, default=Path("runs/meta_adaptation"))
    parser.add_argument("--joint-run", type=Path, help="reuse a finished joint run of the same config and steps")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "meta_adaptation.json")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    joint = args.joint_run or source_run(args.config, {"name": "joint"}, args.source_steps, args.out)
    reptile = source_run(
        args.config,
        {"name": "reptile", "inner_steps": args.inner_steps, "meta_lr": args.meta_lr},
        args.source_steps,
        args.out,
    )
    starts: dict[str, Path | None] = {"pretrained": None, "joint multi-task": joint, "reptile": reptile}
    curves = {
        label: [adapt(start, seed, args.adapt_steps, args.every, args.out, label.split()[0]) for seed in args.seeds]
        for label, start in starts.items()
    }
    steps = list(range(args.every, args.adapt_steps + 1, args.every))
    print(f"held-back TREC validation accuracy (mean of seeds {args.seeds}) after N fine-tuning steps")
    print("| start | " + " | ".join(f"{n}" for n in steps) + " |")
    print("|---|" + "---|" * len(steps))
    means = {}
    for label, runs in curves.items():
        means[label] = [statistics.mean(run[i] for run in runs) for i in range(len(steps))]
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in means[label]) + " |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.results.write_text(
        json.dumps({"settings": settings, "steps": steps, "curves": curves, "means": means}, indent=2)
    )


if __name__ == "__main__":
    main()
