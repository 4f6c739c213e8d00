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
deviation over the seeds, a verdict per task). With one seed it printed:

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
import time
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from multitune import Task, fit
from multitune.compare import aggregate, delta_m, format_seeds

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


def compare_once(tasks: list[Task], steps: int, seed: int) -> dict[str, Any]:
    """The joint run and one single-task baseline per task on the rows it saw, as `multitune compare` writes
    one seed's comparison (scores, Δm, stored bytes, seconds)."""
    settings = {**SETTINGS, "seed": seed}
    torch.manual_seed(seed)
    started = time.perf_counter()
    joint = fit(SmallResNet(), tasks, steps=steps, **settings)
    joint_seconds = time.perf_counter() - started
    scores, single_seconds, single_bytes = {}, 0.0, 0
    for task in tasks:  # the same rows, the same number of examples, the same recipe: only the other tasks gone
        seen = joint.metrics["task_rows"][task.name]
        torch.manual_seed(seed)
        started = time.perf_counter()
        alone = fit(SmallResNet(), [task], steps=math.ceil(seen / BATCH_SIZE), **settings)
        single_seconds += time.perf_counter() - started
        single_bytes += stored_bytes(alone.model)
        multi, single = joint.metrics["tasks"][task.name], alone.metrics["tasks"][task.name]
        scores[task.name] = {
            "single": single["main_score"],
            "multi": multi["main_score"],
            "metric": multi["main_metric"],
            "higher_is_better": multi["higher_is_better"],
            "rows_seen": seen,
        }
    return {
        "tasks": scores,
        "delta_m_percent": round(delta_m(scores), 3),
        "params": {"single_total": None, "multi_total": None},
        "storage_bytes": {"single_total": single_bytes, "multi": stored_bytes(joint.model)},
        "wall_seconds": {"single_total": round(single_seconds, 2), "multi": round(joint_seconds, 2)},
        "train_seconds": {
            "single_total": round(single_seconds, 2),
            "multi": round(joint_seconds, 2),
        },
        "budget": {"rule": "each baseline trains on as many examples of its task as the joint run saw"},
        "seed": seed,
    }


def stored_bytes(model: nn.Module) -> int:
    """What the model's weights take on disk (safetensors stores the tensors as they are)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description="multitune.fit on a small ResNet, three tasks on digits")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"joint training steps (default {STEPS})")
    parser.add_argument("--seeds", default=None, help="e.g. 13,14,15: one comparison per seed, and their mean")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (and leaves the other core free)
    started = time.perf_counter()
    tasks = digit_tasks()
    if args.seeds:  # the table `multitune compare --seeds` prints
        seeds = [int(seed) for seed in args.seeds.split(",")]
        print(format_seeds(aggregate([compare_once(tasks, args.steps, seed) for seed in seeds], seeds)))
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
