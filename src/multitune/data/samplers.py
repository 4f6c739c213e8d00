"""Task samplers: which task feeds the batch at each step.

Convention (as seqio and jiant): with n_i training rows, temperature sampling draws task i with
p_i ∝ n_i^(1/T). T=1 is proportional sampling, T→∞ uniform. The exponent form `alpha` is accepted too:
p_i ∝ n_i^alpha, so alpha = 1/T (a "T=0.5" written as an exponent, as in the seeds, means alpha=0.5).
A task's `sampling_weight` multiplies its probability before normalisation.
"""

from __future__ import annotations

import random
from typing import Protocol, runtime_checkable

from multitune.registry import Registry


@runtime_checkable
class TaskSampler(Protocol):
    """Which task(s) feed the batch at this step; a pure function of (step, rng) for the samplers here."""

    def tasks_for_step(self, step: int, rng: random.Random) -> list[str]: ...

    def probabilities(self, step: int = 0) -> dict[str, float]: ...


SAMPLERS: Registry[TaskSampler] = Registry("sampler")
SAMPLER_INJECTED = ("sizes", "weights")  # filled in by the wiring, never by the config


class _FixedProbabilities:
    """Draws one task per step from a fixed distribution."""

    def __init__(self, scores: dict[str, float], weights: dict[str, float] | None) -> None:
        weights = weights or {}
        raw = {name: score * weights.get(name, 1.0) for name, score in scores.items()}
        total = sum(raw.values())
        if not raw or total <= 0:
            raise ValueError("no task has a positive sampling probability")
        self.names = list(raw)
        self._probabilities = {name: value / total for name, value in raw.items()}
        self._cumulative = []
        running = 0.0
        for name in self.names:
            running += self._probabilities[name]
            self._cumulative.append(running)

    def tasks_for_step(self, step: int, rng: random.Random) -> list[str]:
        return rng.choices(self.names, cum_weights=self._cumulative, k=1)

    def probabilities(self, step: int = 0) -> dict[str, float]:
        return dict(self._probabilities)


@SAMPLERS.register("uniform")
class UniformSampler(_FixedProbabilities):
    """Every task equally often, whatever its size."""

    def __init__(self, sizes: dict[str, int], weights: dict[str, float] | None = None) -> None:
        super().__init__({name: 1.0 for name in sizes}, weights)


@SAMPLERS.register("proportional")
class ProportionalSampler(_FixedProbabilities):
    """Tasks in proportion to their training rows: p_i ∝ n_i."""

    def __init__(self, sizes: dict[str, int], weights: dict[str, float] | None = None) -> None:
        super().__init__({name: float(n) for name, n in sizes.items()}, weights)


@SAMPLERS.register("temperature")
class TemperatureSampler(_FixedProbabilities):
    """p_i ∝ n_i^(1/T), T=1 proportional, large T uniform (Arivazhagan et al. 2019; T5); or `alpha`: p_i ∝ n_i^alpha."""

    def __init__(
        self,
        sizes: dict[str, int],
        weights: dict[str, float] | None = None,
        temperature: float | None = None,
        alpha: float | None = None,
    ) -> None:
        if temperature is not None and alpha is not None:
            raise ValueError("give either temperature or alpha, not both")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if alpha is not None and alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        exponent = alpha if alpha is not None else 1.0 / (temperature if temperature is not None else 2.0)
        self.exponent = exponent
        super().__init__({name: float(n) ** exponent for name, n in sizes.items()}, weights)


def examples_per_task(
    sampler: TaskSampler, step: int, rng: random.Random, batch_size: int, mixed: bool
) -> dict[str, int]:
    """How many rows each task contributes at this step: a whole batch for one task, or a mix."""
    if not mixed:
        names = sampler.tasks_for_step(step, rng)
        return dict.fromkeys(names, batch_size)
    counts: dict[str, int] = {}
    for _ in range(batch_size):
        for name in sampler.tasks_for_step(step, rng):
            counts[name] = counts.get(name, 0) + 1
    return counts
