"""Recipes: named sets of settings that a config takes with `recipe: NAME`; the config's own settings win.

`recommended` is multitune's answer to "which settings should I use": the combination that measured best
against one model per task trained to convergence (BENCHMARKS.md, "The recommended recipe"):
- temperature sampling (T = 2): small tasks are seen more often than their share of rows, large ones less;
- equal loss weights: with one task per step a loss weighting only rescales that task's learning rate, and
  equal weighting measured best of those tried (uncertainty weighting starved the token task);
- per-task early stopping counted in each task's own steps: a task that has trained patience × eval_every of
  its own steps since its best validation leaves the mix, so a converged task stops pulling the shared
  encoder, and the joint stage ends when every task has. Counted in validations instead, a task drawn on one
  step in eight stopped after an eighth of the training it gets alone (measured: CoLA left the mix after 116
  of its own steps where its baseline needed 1,000). On the eight real tasks it stopped no task within 3,000
  steps, and it paid by keeping the joint stage going: the run's own rule in its place ended seed 15's joint
  stage at its first plateau (step 1,400), Δm -13.33% against -0.50%; over seeds 13-15 it is worth +5.1 ± 6.8
  points of Δm, 0 on seed 13, where the average never plateaued and both rules kept one step (BENCHMARKS.md,
  "What each stage");
- two-stage refinement as MT-DNN (Liu et al. 2019), stored small: per task a LoRA adapter (rank 8) on the
  frozen shared model and its head, 400 steps, kept only where it beats the shared model on the task's
  validation split (`keep: best`), so each task is answered by whichever predictor is better there. Refining
  until validation stalls (`finetune_patience`) measured worse on test on the eight real tasks (Δm -4.67%
  against -3.88% on the same joint weights: it fits the validation rows it stops on), so the recipe keeps the
  fixed budget.
"""

from __future__ import annotations

import copy
from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "recommended": {
        "sampling": {"name": "temperature", "temperature": 2.0},
        "loss_weighting": {"name": "equal"},
        "training": {
            "early_stopping": {"patience": 3, "per_task": True, "count": "own_steps"},
            "schedule": {
                "name": "two_stage",
                "refine": "lora",
                "refine_r": 8,
                "keep": "best",
                "finetune_steps": 400,
                "finetune_lr": 5.0e-4,
            },
        },
    },
}


def with_recipe(data: dict[str, Any], recipe: str) -> dict[str, Any]:
    """`data` (a config as read) over the recipe's settings: a value the config gives wins; a method group
    (a mapping with `name`) that names another method than the recipe's replaces the recipe's group whole,
    so none of the recipe's method parameters leak into it. Raises KeyError for an unknown recipe."""
    return _over(data, RECIPES[recipe])


def _over(mine: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in mine.items():
        below = out.get(key)
        if (
            isinstance(value, dict)
            and isinstance(below, dict)
            and value.get("name", below.get("name")) == below.get("name")
        ):
            out[key] = _over(value, below)
        else:
            out[key] = value
    return out
