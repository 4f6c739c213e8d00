"""Any PyTorch backbone, on real images: one small ResNet, three tasks on scikit-learn's bundled digits.

The 1,797 8x8 digit images that ship with scikit-learn (`load_digits`, no download) are split once: 400
test images shared by every task, 150 validation images, and the rest as a training pool from which each
task gets its own rows:

- digit:  which digit (10 classes), from only 150 labelled images: the low-resource task
- parity: even or odd, from 600 images
- value:  the digit's value as a number (regression, Pearson r), from 600 images overlapping parity's

The three are trained jointly through `multitune.fit`: temperature sampling (T=2) mixing the tasks in each
batch, and PCGrad on the exact per-task gradients of the shared ResNet (source `parameters`). Each task then
gets a single-task baseline, trained the same way through the same API on the same rows, for as many
examples as that task saw in the joint run; the script prints both scores side by side.

Run: `.venv/bin/python examples/digits_multitask.py [--steps N] [--seeds 13,14,15]` (offline; 50-110 s a seed
on 2 CPU cores). With `--seeds` it prints the table `multitune compare --seeds` writes (mean ± standard
deviation over the seeds, a verdict per task); `--recipe recommended` trains the joint side by the recommended
recipe against baselines trained to convergence, and `--ablation` beside it prints the recipe without each
of its stages, against the same baselines. With one seed it printed:

    task     train rows   seen  metric    multi-task single-task       Δ
    digit           150   5835  accuracy      0.9775      0.9475 +0.0300
    parity          600  11440  accuracy      1.0000      0.9950 +0.0050
    value           600  11525  pearson       0.9790      0.9707 +0.0083
    900 joint steps; 50 s in all

Every task gains from the other two, most of all the one with the fewest labels (test n = 400 each).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from multitune import EarlyStopping, Task, fit
from multitune.compare import aggregate, delta_m, format_seeds
from multitune.compare.run import deployment_bytes

SEED = 13
STEPS = 900
BATCH_SIZE = 32
SETTINGS: dict[str, Any] = {
    "batch_size": BATCH_SIZE,
    "lr": 3e-3,
    "sampling": {"name": "temperature", "temperature": 2.0},
    "mixed_batches": True,  # each batch mixes the tasks, so PCGrad has several task gradients to reconcile
    "gradient_aggregation": {"name": "pcgrad", "source": "parameters"},
    "eval_every": 100,
    "seed": SEED,
    "progress": False,
}


class Block(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.skip = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    """[B, 1, 8, 8] images -> [B, 64] features: a stem, three residual blocks, global average pooling."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, width), Block(width, 2 * width, stride=2), Block(2 * width, 2 * width))

    def forward(self, images: Tensor) -> Tensor:
        return self.blocks(self.stem(images)).mean(dim=(2, 3))


def digit_tasks(seed: int = SEED) -> list[Task]:
    digits = load_digits()
    images = (digits.images[:, None] / 16.0).astype(np.float32)  # [1797, 1, 8, 8] in [0, 1]
    target = digits.target
    order = np.random.default_rng(seed).permutation(len(target))
    test, validation, pool = order[:400], order[400:550], order[550:]
    rows = {"digit": pool[:150], "parity": pool[150:750], "value": pool[450:1050]}
    labels = {
        "digit": target,
        "parity": np.where(target % 2 == 0, "even", "odd"),
        "value": target.astype(np.float64),
    }
    types = {"digit": "classification", "parity": "classification", "value": "regression"}
    return [
        Task(
            name,
            types[name],
            train=(images[rows[name]], labels[name][rows[name]]),
            validation=(images[validation], labels[name][validation]),
            test=(images[test], labels[name][test]),
        )
        for name in rows
    ]


# The recipe's stages, each taken out in turn (`--ablation`): the fit arguments that replace that stage.
WITHOUT: dict[str, dict[str, Any]] = {
    "refinement": {"schedule": {"name": "joint"}},  # the joint stage alone
    "per-task early stopping": {"early_stopping": EarlyStopping(patience=3)},  # one rule on the average
    "temperature sampling": {"sampling": "proportional"},  # tasks drawn by their share of rows
    "every stage": {"schedule": {"name": "joint"}, "early_stopping": EarlyStopping(patience=3)},
}


def train_joint(
    tasks: list[Task], steps: int, seed: int, folder: str, recipe: str | None = None, **changes: Any
) -> tuple[Any, float, int]:
    """The joint run (the example's settings, `recipe` and then `changes` over them): the fitted model, its
    seconds and the bytes its run folder stores."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    settings = {**SETTINGS, "seed": seed, **changes}
    joint = fit(SmallResNet(), tasks, steps=steps, recipe=recipe, output_dir=folder, name="joint", **settings)
    return joint, time.perf_counter() - started, deployment_bytes(Path(folder) / "joint")


def train_baselines(
    tasks: list[Task], steps: int, seed: int, folder: str, converge: bool, seen: dict[str, int]
) -> tuple[dict[str, Any], float, int]:
    """One single-task model per task, trained the same way on the same rows, only the other tasks gone:
    to convergence (early stopping on its validation score, patience 3, at most `steps` steps, best
    checkpoint) when `converge`, else for `seen[task]` examples. Each task's metrics, the seconds and the
    bytes the runs store."""
    metrics, seconds, stored = {}, 0.0, 0
    settings = {**SETTINGS, "seed": seed}
    for task in tasks:
        budget: dict[str, Any] = (
            {"steps": steps, "early_stopping": EarlyStopping(patience=3)}
            if converge
            else {"steps": math.ceil(seen[task.name] / BATCH_SIZE)}
        )
        torch.manual_seed(seed)
        started = time.perf_counter()
        alone = fit(
            SmallResNet(),
            [task],
            **{**settings, **budget},
            output_dir=folder,
            name=task.name,
        )
        seconds += time.perf_counter() - started
        stored += deployment_bytes(Path(folder) / task.name)
        metrics[task.name] = alone.metrics["tasks"][task.name]
    return metrics, seconds, stored


def comparison(
    joint: Any, seconds: float, stored: int, baselines: tuple[dict[str, Any], float, int], seed: int, rule: str
) -> dict[str, Any]:
    """One seed's comparison as `multitune compare` writes it, from the joint model and the baselines."""
    single_metrics, single_seconds, single_bytes = baselines
    scores = {}
    for name, single in single_metrics.items():
        multi = joint.metrics["tasks"][name]
        scores[name] = {
            "single": single["main_score"],
            "multi": multi["main_score"],
            "metric": multi["main_metric"],
            "higher_is_better": multi["higher_is_better"],
            "rows_seen": joint.metrics["task_rows"][name],
        }
    return comparison_row(scores, stored, single_bytes, seconds, single_seconds, seed, rule)


def comparison_row(
    scores: dict[str, dict[str, Any]],
    stored: int,
    single_bytes: int,
    seconds: float,
    single_seconds: float,
    seed: int,
    rule: str = "",
) -> dict[str, Any]:
    """{task: single and multi main scores} with the two sides' stored bytes and seconds as one seed's
    comparison.json entry (Δm computed from the scores)."""
    return {
        "tasks": scores,
        "delta_m_percent": round(delta_m(scores), 3),
        "params": {"single_total": None, "multi_total": None},
        "storage_bytes": {"single_total": single_bytes, "multi": stored},
        "wall_seconds": {"single_total": round(single_seconds, 2), "multi": round(seconds, 2)},
        "train_seconds": {"single_total": round(single_seconds, 2), "multi": round(seconds, 2)},
        "budget": {"rule": rule},
        "seed": seed,
    }


def compare_once(tasks: list[Task], steps: int, seed: int, recipe: str | None = None) -> dict[str, Any]:
    """The joint run and one single-task baseline per task, as `multitune compare` writes one seed's
    comparison. Without a recipe each baseline trains on as many examples as its task saw in the joint run;
    with `recipe` the joint side follows it (per-task early stopping, a LoRA refinement per task kept where
    it is better) and each baseline trains to convergence, as `compare --converge`."""
    with tempfile.TemporaryDirectory() as folder:  # runs are written only to count what each side stores
        joint, seconds, stored = train_joint(tasks, steps, seed, folder, recipe)
        baselines = train_baselines(tasks, steps, seed, folder, bool(recipe), joint.metrics["task_rows"])
    rule = (
        "each side trains to convergence (patience 3, best checkpoint)"
        if recipe
        else "each baseline trains on as many examples of its task as the joint run saw"
    )
    return comparison(joint, seconds, stored, baselines, seed, rule)


def ablation(tasks: list[Task], steps: int, seeds: list[int], recipe: str) -> dict[str, list[dict[str, Any]]]:
    """The recipe, and the recipe without each of its stages (WITHOUT), against the same baselines trained
    to convergence once per seed: each variant's comparison per seed."""
    variants: dict[str, list[dict[str, Any]]] = {"recipe": [], **{f"without {stage}": [] for stage in WITHOUT}}
    rule = "each side trains to convergence (patience 3, best checkpoint)"
    for seed in seeds:
        with tempfile.TemporaryDirectory() as folder:
            baselines = train_baselines(tasks, steps, seed, folder, True, {})
        for variant, changes in [("recipe", {}), *((f"without {k}", v) for k, v in WITHOUT.items())]:
            with tempfile.TemporaryDirectory() as folder:
                joint, seconds, stored = train_joint(tasks, steps, seed, folder, recipe, **changes)
            variants[variant].append(comparison(joint, seconds, stored, baselines, seed, rule))
    return variants


def format_ablation(variants: dict[str, list[dict[str, Any]]], seeds: list[int]) -> str:
    """One row per variant: each task's mean multi-task score, Δm mean ± standard deviation, storage and
    time relative to the baselines (means over the seeds)."""
    names = list(variants["recipe"][0]["tasks"])
    lines = [
        f"| variant | {' | '.join(names)} | Δm (%) | stored | time |",
        "|---|" + "---|" * (len(names) + 3),
    ]
    baseline = [statistics.fmean(r["tasks"][n]["single"] for r in variants["recipe"]) for n in names]
    lines.append(f"| one model per task | {' | '.join(f'{b:.4f}' for b in baseline)} | 0 | 1 | 1 |")
    for variant, results in variants.items():
        summary = aggregate(results, seeds)
        scores = " | ".join(f"{summary['tasks'][n]['multi']['mean']:.4f}" for n in names)
        spread = summary["delta_m_percent"]
        stored = statistics.fmean(r["storage_bytes"]["multi"] / r["storage_bytes"]["single_total"] for r in results)
        time_ratio = statistics.fmean(r["train_seconds"]["multi"] / r["train_seconds"]["single_total"] for r in results)
        dm = f"{spread['mean']:+.2f} ± {spread['std']:.2f}"
        lines.append(f"| {variant} | {scores} | {dm} | {stored:.2f}x | {time_ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="multitune.fit on a small ResNet, three tasks on digits")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"joint training steps (default {STEPS})")
    parser.add_argument("--seeds", default=None, help="e.g. 13,14,15: one comparison per seed, and their mean")
    parser.add_argument("--recipe", default=None, help="e.g. recommended: the joint side's recipe (with --seeds)")
    parser.add_argument(
        "--ablation", action="store_true", help="with --seeds and --recipe: the recipe without each of its stages"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (and leaves the other core free)
    started = time.perf_counter()
    tasks = digit_tasks()
    if args.ablation and not (args.seeds and args.recipe):
        parser.error("--ablation takes --seeds and --recipe")
    if args.seeds:  # the table `multitune compare --seeds` prints
        seeds = [int(seed) for seed in args.seeds.split(",")]
        if args.ablation:
            print(format_ablation(ablation(tasks, args.steps, seeds, args.recipe), seeds))
            print(f"at most {args.steps} joint steps per seed; {time.perf_counter() - started:.0f} s in all")
            return
        results = [compare_once(tasks, args.steps, seed, args.recipe) for seed in seeds]
        print(format_seeds(aggregate(results, seeds)))
        print(f"{args.steps} joint steps per seed; {time.perf_counter() - started:.0f} s in all")
        return
    result = compare_once(tasks, args.steps, SEED)
    print(f"{'task':8}{'train rows':>11}{'seen':>7}  {'metric':9}{'multi-task':>11}{'single-task':>12}{'Δ':>8}")
    for task in tasks:
        entry = result["tasks"][task.name]
        print(
            f"{task.name:8}{len(task.train[1]):>11}{entry['rows_seen']:>7}  "
            f"{entry['metric']:9}{entry['multi']:>11.4f}{entry['single']:>12.4f}"
            f"{entry['multi'] - entry['single']:>+8.4f}"
        )
    print(f"{args.steps} joint steps; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
