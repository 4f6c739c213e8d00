"""Task samplers: which task feeds the batch at each step.

Convention (as seqio and jiant): with n_i training rows, temperature sampling draws task i with
p_i ∝ n_i^(1/T). T=1 is proportional sampling, T→∞ uniform. The exponent form `alpha` is accepted too:
p_i ∝ n_i^alpha, so alpha = 1/T (a "T=0.5" written as an exponent, as in the seeds, means alpha=0.5).
A task's `sampling_weight` multiplies its probability before normalisation.

Every sampler here draws from the step's own `random.Random(f"{seed}:{step}")`; the only one with
state (`dynamic`) keeps it in `state_dict`, so a resumed run draws the same task sequence.
"""

from __future__ import annotations

import math
import random
from typing import Any, Protocol, runtime_checkable

from multitune.registry import Registry


@runtime_checkable
class TaskSampler(Protocol):
    """Which task(s) feed the batch at this step; a pure function of (step, rng) for the samplers here."""

    def tasks_for_step(self, step: int, rng: random.Random) -> list[str]: ...

    def probabilities(self, step: int = 0) -> dict[str, float]: ...


@runtime_checkable
class ObservesTraining(Protocol):
    """A sampler that adapts to training progress; its state goes into checkpoints."""

    def observe_losses(self, losses: dict[str, float], step: int) -> None: ...

    def observe_validation(self, scores: dict[str, float], step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SAMPLERS: Registry[TaskSampler] = Registry("sampler")
SAMPLER_INJECTED = ("sizes", "weights", "total_steps")  # filled in by the wiring, never by the config


def tasks_per_step(sampler: TaskSampler) -> str:
    """'all' for samplers that feed every task each step, else 'one'."""
    return str(getattr(sampler, "tasks_per_step", "one"))


def _normalised(raw: dict[str, float], weights: dict[str, float] | None) -> dict[str, float]:
    weights = weights or {}
    scaled = {name: value * weights.get(name, 1.0) for name, value in raw.items()}
    total = sum(scaled.values())
    if not scaled or total <= 0 or not math.isfinite(total):
        raise ValueError("no task has a positive sampling probability")
    return {name: value / total for name, value in scaled.items()}


def relative_powers(sizes: dict[str, float], exponent: float) -> dict[str, float]:
    """n_i^exponent / max_j n_j^exponent, in log space: a low temperature (exponent 1000) would overflow
    n_i^exponent, and the ratios are all a sampler needs."""
    logs = {name: exponent * math.log(n) for name, n in sizes.items()}
    top = max(logs.values())
    return {name: math.exp(value - top) for name, value in logs.items()}


class _FixedProbabilities:
    """Draws one task per step from a fixed distribution."""

    def __init__(self, scores: dict[str, float], weights: dict[str, float] | None) -> None:
        self._probabilities = _normalised(scores, weights)
        self.names = list(self._probabilities)
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

    def __init__(self, sizes: dict[str, int], weights: dict[str, float] | None = None, total_steps: int = 0) -> None:
        super().__init__(dict.fromkeys(sizes, 1.0), weights)


@SAMPLERS.register("proportional")
class ProportionalSampler(_FixedProbabilities):
    """Tasks in proportion to their training rows: p_i ∝ n_i."""

    def __init__(self, sizes: dict[str, int], weights: dict[str, float] | None = None, total_steps: int = 0) -> None:
        super().__init__({name: float(n) for name, n in sizes.items()}, weights)


@SAMPLERS.register("temperature")
class TemperatureSampler(_FixedProbabilities):
    """p_i ∝ min(n_i, cap)^(1/T): T=1 proportional, large T uniform; or `alpha`: p_i ∝ n_i^alpha."""

    paper = "Arivazhagan et al. 2019; Raffel et al. 2020"

    def __init__(
        self,
        sizes: dict[str, int],
        weights: dict[str, float] | None = None,
        total_steps: int = 0,
        temperature: float | None = None,
        alpha: float | None = None,
        cap: int | None = None,
    ) -> None:
        if temperature is not None and alpha is not None:
            raise ValueError("give either temperature or alpha, not both")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if alpha is not None and alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if cap is not None and cap < 1:
            raise ValueError(f"cap must be >= 1, got {cap}")
        exponent = alpha if alpha is not None else 1.0 / (temperature if temperature is not None else 2.0)
        self.exponent = exponent
        capped = {name: float(min(n, cap) if cap is not None else n) for name, n in sizes.items()}
        super().__init__(relative_powers(capped, exponent), weights)


@SAMPLERS.register("manual")
class ManualSampler(_FixedProbabilities):
    """Probabilities given per task in the config (normalised to sum to 1)."""

    def __init__(
        self,
        sizes: dict[str, int],
        weights: dict[str, float] | None = None,
        total_steps: int = 0,
        probabilities: dict[str, float] | None = None,
    ) -> None:
        given = probabilities or {}
        missing, unknown = set(sizes) - set(given), set(given) - set(sizes)
        if missing or unknown:
            raise ValueError(
                f"probabilities must name every task exactly (missing: {sorted(missing)}, unknown: {sorted(unknown)})"
            )
        if any(p < 0 for p in given.values()):
            raise ValueError("probabilities must be >= 0")
        super().__init__({name: float(given[name]) for name in sizes}, weights)


@SAMPLERS.register("annealed")
class AnnealedSampler:
    """Temperature moved linearly from `start` to `end` over training (default 1 -> 5)."""

    paper = "Stickland & Murray 2019"

    def __init__(
        self,
        sizes: dict[str, int],
        weights: dict[str, float] | None = None,
        total_steps: int = 0,
        start: float = 1.0,
        end: float = 5.0,
    ) -> None:
        if start <= 0 or end <= 0:
            raise ValueError("start and end temperatures must be > 0")
        self.sizes, self.weights = dict(sizes), weights
        self.start, self.end = start, end
        self.total_steps = max(total_steps, 1)
        self.names = list(sizes)

    def temperature(self, step: int) -> float:
        progress = min(max(step / max(self.total_steps - 1, 1), 0.0), 1.0)
        return self.start + (self.end - self.start) * progress

    def probabilities(self, step: int = 0) -> dict[str, float]:
        exponent = 1.0 / self.temperature(step)
        return _normalised(relative_powers({name: float(n) for name, n in self.sizes.items()}, exponent), self.weights)

    def tasks_for_step(self, step: int, rng: random.Random) -> list[str]:
        return draw_one(self.probabilities(step), rng)


@SAMPLERS.register("round_robin")
class RoundRobinSampler:
    """Tasks in turn, one per step (alternating training)."""

    def __init__(self, sizes: dict[str, int], weights: dict[str, float] | None = None, total_steps: int = 0) -> None:
        self.names = list(sizes)

    def tasks_for_step(self, step: int, rng: random.Random) -> list[str]:
        return [self.names[step % len(self.names)]]

    def probabilities(self, step: int = 0) -> dict[str, float]:
        return dict.fromkeys(self.names, 1.0 / len(self.names))


@SAMPLERS.register("sequential")
class SequentialSampler:
    """Tasks one after another (a curriculum): task k of `order` owns the k-th stage of training.

    Stage lengths are proportional to `fractions` (default: equal). One task per step, no mixing."""

    def __init__(
        self,
        sizes: dict[str, int],
        weights: dict[str, float] | None = None,
        total_steps: int = 0,
        order: list[str] | None = None,
        fractions: list[float] | None = None,
    ) -> None:
        self.order = list(order) if order is not None else list(sizes)
        if sorted(self.order) != sorted(sizes):
            raise ValueError(f"order must name every task once: {', '.join(sizes)}")
        shares = fractions if fractions is not None else [1.0] * len(self.order)
        if len(shares) != len(self.order) or any(f <= 0 for f in shares):
            raise ValueError("fractions: one positive number per task in order")
        self.total_steps = max(total_steps, 1)
        cumulative, running = [], 0.0
        for share in shares:
            running += share / sum(shares)
            cumulative.append(running)
        self.ends = [round(c * self.total_steps) for c in cumulative]  # stage k covers steps < ends[k]

    def stage(self, step: int) -> str:
        for name, end in zip(self.order, self.ends, strict=True):
            if step < end:
                return name
        return self.order[-1]

    def tasks_for_step(self, step: int, rng: random.Random) -> list[str]:
        return [self.stage(step)]

    def probabilities(self, step: int = 0) -> dict[str, float]:
        current = self.stage(step)
        return {name: float(name == current) for name in self.order}


@SAMPLERS.register("all_tasks")
class AllTasksSampler:
    """One batch of every task each step (what gradient aggregation needs); batch_size is per task."""

    tasks_per_step = "all"

    def __init__(self, sizes: dict[str, int], weights: dict[str, float] | None = None, total_steps: int = 0) -> None:
        self.names = list(sizes)

    def tasks_for_step(self, step: int, rng: random.Random) -> list[str]:
        return list(self.names)

    def probabilities(self, step: int = 0) -> dict[str, float]:
        return dict.fromkeys(self.names, 1.0 / len(self.names))


@SAMPLERS.register("dynamic")
class DynamicSampler:
    """More draws for tasks that lag: p ∝ softmax(lag/τ), mixed with a uniform floor.

    `signal: loss` measures lag as r_i = current / first running loss (the task whose loss falls slowest
    lags most; GradNorm's inverse training rate). `signal: validation` measures it as
    (target_i − score_i) / target_i from each validation (Sharma, Jha, Hegde & Ravindran, "Learning to
    Multi-Task by Active Sampling", ICLR 2018, who use single-task scores as targets; default target 1.0).
    """

    paper = "Sharma et al. 2018"

    def __init__(
        self,
        sizes: dict[str, int],
        weights: dict[str, float] | None = None,
        total_steps: int = 0,
        signal: str = "loss",
        tau: float = 0.1,
        floor: float = 0.1,
        targets: dict[str, float] | None = None,
    ) -> None:
        if signal not in ("loss", "validation"):
            raise ValueError(f"signal must be 'loss' or 'validation', got {signal!r}")
        if tau <= 0 or not 0 <= floor <= 1:
            raise ValueError("tau must be > 0 and floor in [0, 1]")
        self.names = list(sizes)
        self.weights = weights
        self.signal, self.tau, self.floor = signal, tau, floor
        self.targets = {name: (targets or {}).get(name, 1.0) for name in self.names}
        self.first: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.lag: dict[str, float] = dict.fromkeys(self.names, 0.0)

    def probabilities(self, step: int = 0) -> dict[str, float]:
        peak = max(self.lag.values())
        soft = {name: math.exp((self.lag[name] - peak) / self.tau) for name in self.names}
        total = sum(soft.values())
        mixed = {n: (1 - self.floor) * soft[n] / total + self.floor / len(self.names) for n in self.names}
        return _normalised(mixed, self.weights)

    def tasks_for_step(self, step: int, rng: random.Random) -> list[str]:
        return draw_one(self.probabilities(step), rng)

    def observe_losses(self, losses: dict[str, float], step: int) -> None:
        for name, value in losses.items():
            self.running[name] = value if name not in self.running else 0.9 * self.running[name] + 0.1 * value
            self.first.setdefault(name, max(value, 1e-8))
            if self.signal == "loss":
                self.lag[name] = self.running[name] / self.first[name]

    def observe_validation(self, scores: dict[str, float], step: int) -> None:
        if self.signal == "validation":
            for name, score in scores.items():
                target = self.targets.get(name, 1.0) or 1.0
                self.lag[name] = (target - score) / abs(target)

    def state_dict(self) -> dict[str, Any]:
        return {"first": dict(self.first), "running": dict(self.running), "lag": dict(self.lag)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first, self.running, self.lag = dict(state["first"]), dict(state["running"]), dict(state["lag"])


class TokenMix:
    """Any sampler, its probabilities read as shares of training tokens instead of rows: task t is drawn with
    probability ∝ p_t / L_t (L_t its mean training row length in tokens), so the expected share of the tokens
    it receives is p_t whatever its row length. Drawing by rows gives a task with long rows more than its
    share of tokens (and, packed, more than its share of every packed row). `probabilities` reports the
    target token shares (the wrapped sampler's); `draw_probabilities` the row probabilities drawn from."""

    def __init__(self, inner: TaskSampler, mean_lengths: dict[str, float]) -> None:
        self.inner = inner
        self.lengths = {name: max(float(length), 1.0) for name, length in mean_lengths.items()}

    def draw_probabilities(self, step: int = 0) -> dict[str, float]:
        target = self.inner.probabilities(step)
        raw = {name: p / self.lengths[name] for name, p in target.items()}
        total = sum(raw.values())
        return {name: value / total for name, value in raw.items()}

    def tasks_for_step(self, step: int, rng: random.Random) -> list[str]:
        return draw_one(self.draw_probabilities(step), rng)

    def probabilities(self, step: int = 0) -> dict[str, float]:
        return self.inner.probabilities(step)


class _ObservingTokenMix(TokenMix):
    """TokenMix over a sampler that adapts to training: what it observes and its state pass through."""

    def observe_losses(self, losses: dict[str, float], step: int) -> None:
        self.inner.observe_losses(losses, step)  # type: ignore[attr-defined]

    def observe_validation(self, scores: dict[str, float], step: int) -> None:
        self.inner.observe_validation(scores, step)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()  # type: ignore[attr-defined,no-any-return]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)  # type: ignore[attr-defined]


def token_mix(inner: TaskSampler, mean_lengths: dict[str, float]) -> TokenMix:
    """`inner` drawn so that its probabilities are token shares (TokenMix), keeping what it observes."""
    return (_ObservingTokenMix if isinstance(inner, ObservesTraining) else TokenMix)(inner, mean_lengths)


def draw_one(probabilities: dict[str, float], rng: random.Random) -> list[str]:
    names = list(probabilities)
    return rng.choices(names, weights=[probabilities[n] for n in names], k=1)


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
