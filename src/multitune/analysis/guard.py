"""Negative-transfer guard: down-weight or drop a task that hurts the others without gaining itself.

At every validation, with the task relations of analysis/affinity.py measured on the probe batches, the
guard judges the running mean of the lookahead affinity over all validations so far (one validation's
probe batches are noisy: a task's own-affinity can be negative once by chance; its mean over the run is
not). Validations up to `start_step` are not judged: early in training a single lookahead step along a
task's gradient of a small probe batch can raise even that task's own held-out loss (real tasks did, in
the shuffled-label demo), so the guard waits for the run to settle. Task i's harm is the mean affinity
Z_ij from i to the other active tasks (negative: a step along i's gradient raises their losses). A task
lags when its validation main score is below its single-task baseline by more than `min_gain` (when a
baseline is given, e.g. from `multitune compare`), or else when it improved by at most `min_gain` on its
best earlier score. A baseline trajectory (the single-task run's validation scores by rows seen, which
`multitune compare` records) is compared at the rows the task has seen so far, so a task still learning
is measured against the baseline at the same point of learning, not against the baseline's final score. A
task that harms while lagging for `patience` validations in a row is acted on. So is a task that learns
nothing that generalizes while it harms another task: its own step does not lower its own held-out loss
(Z_ii <= 0, the affinity being measured on held-out rows) and raises some other task's (min_j Z_ij < 0).
A task with corrupted labels is the case in point, caught whatever its validation score or baseline says:
a control task at chance is never "below" a baseline that is at chance too. An action: `downweight`
multiplies its loss by `factor` (again at each further flag), `drop` stops sampling it. Every action is
logged with the numbers behind it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GuardAction:
    step: int
    task: str
    action: str
    scale: float
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "action": self.action, "scale": self.scale, "why": self.why}


@dataclass
class NegativeTransferGuard:
    names: list[str]
    action: str = "downweight"
    patience: int = 2
    min_gain: float = 0.0
    factor: float = 0.5
    baselines: dict[str, float] = field(default_factory=dict)  # single-task main scores, signed like `scores`
    trajectories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # (rows seen, signed score)
    scale: dict[str, float] = field(default_factory=dict)  # per-task loss multiplier; 0 = dropped
    best: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)
    start_step: int = 0  # validations at or before this step are not judged
    affinity_sum: torch.Tensor | None = None  # [T, T]: the lookahead affinities summed over validations
    validations: int = 0

    def __post_init__(self) -> None:
        if self.action not in ("downweight", "drop"):
            raise ValueError(f"action must be 'downweight' or 'drop', got {self.action!r}")
        for name in self.names:
            self.scale.setdefault(name, 1.0)

    def active(self, name: str) -> bool:
        return self.scale.get(name, 1.0) > 0

    def baseline_at(self, name: str, rows: int | None) -> tuple[float | None, str]:
        """The single-task score to compare with (at `rows` rows seen when a trajectory is known)."""
        trajectory = self.trajectories.get(name)
        if trajectory and rows is not None:
            return interpolate(trajectory, rows), f"at {rows} rows seen"
        return self.baselines.get(name), "final"

    def observe(
        self, step: int, scores: dict[str, float], affinity: torch.Tensor, rows: dict[str, int] | None = None
    ) -> list[GuardAction]:
        """Update with one validation's main scores and lookahead affinity [T, T] (rows: from, in `names`
        order), and the training rows each task has seen (for baseline trajectories)."""
        if step <= self.start_step:
            return []
        current = affinity.detach().double().cpu()
        self.affinity_sum = current if self.affinity_sum is None else self.affinity_sum + current
        self.validations += 1
        affinity = self.affinity_sum / self.validations
        actions = []
        active = [i for i, n in enumerate(self.names) if self.active(n)]
        for i in active:
            name = self.names[i]
            others = [j for j in active if j != i]
            harm = float(affinity[i, others].mean()) if others else 0.0
            previous = self.best.get(name)
            gain = None if previous is None else scores[name] - previous
            self.best[name] = scores[name] if previous is None else max(previous, scores[name])
            baseline, when = self.baseline_at(name, None if rows is None else rows.get(name, 0))
            if baseline is not None:
                lagging = scores[name] < baseline - self.min_gain
                standing = (
                    f"its validation score {scores[name]:.4f} is below its single-task baseline {baseline:.4f} ({when})"
                )
            else:
                lagging = gain is not None and gain <= self.min_gain
                standing = f"its own validation score gained {gain or 0.0:+.4f} (best {previous or 0.0:.4f})"
            own = float(affinity[i, i])
            victim = min(others, key=lambda j: float(affinity[i, j])) if others else i  # the task i hurts most
            worst = float(affinity[i, victim]) if others else 0.0
            noise = own <= 0 and worst < 0
            if (harm < 0 and lagging) or noise:
                self.strikes[name] = self.strikes.get(name, 0) + 1
            else:
                self.strikes[name] = 0
            if self.strikes[name] >= self.patience and len(active) > 1:
                self.scale[name] = 0.0 if self.action == "drop" else self.scale[name] * self.factor
                self.strikes[name] = 0
                over = f"mean over {self.validations} validations"
                if noise:
                    why = (
                        f"its own steps did not lower its own held-out loss (lookahead affinity {own:+.3e}, {over}) "
                        f"and raised '{self.names[victim]}''s ({worst:+.3e}): nothing it learns generalizes, "
                        f"for {self.patience} validations"
                    )
                else:
                    why = (
                        f"its steps raised the other tasks' losses (lookahead affinity {harm:+.3e}, {over}) while "
                        f"{standing}, for {self.patience} validations"
                    )
                actions.append(GuardAction(step, name, self.action, self.scale[name], why))
        return actions

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": dict(self.scale),
            "best": dict(self.best),
            "strikes": dict(self.strikes),
            "affinity_sum": None if self.affinity_sum is None else self.affinity_sum.tolist(),
            "validations": self.validations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.best, self.strikes = dict(state["scale"]), dict(state["best"]), dict(state["strikes"])
        total = state.get("affinity_sum")
        self.affinity_sum = None if total is None else torch.tensor(total, dtype=torch.float64)
        self.validations = int(state.get("validations", 0))


def interpolate(points: list[tuple[int, float]], x: int) -> float:
    """Piecewise-linear value at x of (x, y) points sorted by x; the end values outside their range."""
    ordered = sorted(points)
    if x <= ordered[0][0]:
        return float(ordered[0][1])
    for (x0, y0), (x1, y1) in itertools.pairwise(ordered):
        if x <= x1:
            return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0)) if x1 > x0 else float(y1)
    return float(ordered[-1][1])
