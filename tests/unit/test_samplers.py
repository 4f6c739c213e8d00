import random

import pytest

from multitune.data.samplers import SAMPLERS, TemperatureSampler, examples_per_task
from multitune.errors import ConfigError

SIZES = {"big": 900, "mid": 90, "small": 10}


def build(name, **params):
    return SAMPLERS.build(name, injected={"sizes": SIZES, "weights": None, "total_steps": 11}, **params)


def test_temperature_convention_and_exponent_form():
    p = build("temperature", temperature=2.0).probabilities()
    total = sum(n**0.5 for n in SIZES.values())
    assert p == pytest.approx({k: n**0.5 / total for k, n in SIZES.items()})
    assert build("temperature", alpha=0.5).probabilities() == pytest.approx(p)
    assert build("temperature", temperature=1.0).probabilities() == pytest.approx(build("proportional").probabilities())
    assert build("temperature", temperature=1e6).probabilities() == pytest.approx(
        build("uniform").probabilities(), abs=1e-4
    )
    assert build("temperature", alpha=0.0).probabilities() == pytest.approx(build("uniform").probabilities())


def test_a_low_temperature_gives_the_largest_task_without_overflowing():
    # 900^(1/0.001) overflows a float; the limit of p_i ∝ n_i^(1/T) as T -> 0 puts all mass on the largest task,
    # and (9/10)^1000 ≈ 1.7e-46 is what "big" vs a 1,000-row task keeps at T = 0.001 exactly.
    assert build("temperature", temperature=0.001).probabilities() == pytest.approx(
        {"big": 1.0, "mid": 0.0, "small": 0.0}
    )
    assert build("temperature", alpha=200.0).probabilities()["big"] == pytest.approx(1.0)
    annealed = build("annealed", start=0.001, end=1.0)
    assert annealed.probabilities(0) == pytest.approx({"big": 1.0, "mid": 0.0, "small": 0.0})
    assert annealed.probabilities(10) == pytest.approx(build("proportional").probabilities())
    two = SAMPLERS.build(
        "temperature", injected={"sizes": {"a": 1000, "b": 900}, "weights": None, "total_steps": 1}, temperature=0.001
    ).probabilities()
    assert two["b"] / two["a"] == pytest.approx(0.9**1000, rel=1e-9)


def test_temperature_rejects_both_forms_and_bad_values():
    with pytest.raises(ConfigError, match="either temperature or alpha"):
        build("temperature", temperature=2.0, alpha=0.5)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        build("temperature", temperature=0)


def test_sampling_weight_multiplies_the_probability():
    sampler = SAMPLERS.build("uniform", injected={"sizes": SIZES, "weights": {"small": 2.0}})
    assert sampler.probabilities() == pytest.approx({"big": 0.25, "mid": 0.25, "small": 0.5})


def test_draws_are_a_pure_function_of_seed_and_step():
    sampler = TemperatureSampler(SIZES, temperature=2.0)
    first = [sampler.tasks_for_step(s, random.Random(f"1:{s}")) for s in range(50)]
    resumed = [sampler.tasks_for_step(s, random.Random(f"1:{s}")) for s in range(25, 50)]
    assert first[25:] == resumed


def test_examples_per_task_single_and_mixed():
    sampler = build("uniform")
    single = examples_per_task(sampler, 0, random.Random(0), 16, mixed=False)
    assert len(single) == 1 and next(iter(single.values())) == 16
    mixed = examples_per_task(sampler, 0, random.Random(0), 64, mixed=True)
    assert sum(mixed.values()) == 64 and len(mixed) == 3


def test_temperature_cap_limits_large_tasks():
    capped = build("temperature", temperature=1.0, cap=90).probabilities()
    assert capped["big"] == pytest.approx(capped["mid"]) and capped["small"] == pytest.approx(10 / 190)


def test_annealed_moves_from_proportional_toward_uniform():
    sampler = build("annealed", start=1.0, end=1e6)
    assert sampler.probabilities(0) == pytest.approx(build("proportional").probabilities())
    assert sampler.probabilities(10) == pytest.approx(build("uniform").probabilities(), abs=1e-4)


def test_round_robin_and_all_tasks():
    assert [build("round_robin").tasks_for_step(s, random.Random(0)) for s in range(4)] == [
        ["big"],
        ["mid"],
        ["small"],
        ["big"],
    ]
    assert build("all_tasks").tasks_for_step(5, random.Random(0)) == ["big", "mid", "small"]
    assert examples_per_task(build("all_tasks"), 0, random.Random(0), 8, mixed=False) == {
        "big": 8,
        "mid": 8,
        "small": 8,
    }


def test_manual_needs_every_task():
    assert build("manual", probabilities={"big": 1, "mid": 1, "small": 2}).probabilities()["small"] == 0.5
    with pytest.raises(ConfigError, match="missing"):
        build("manual", probabilities={"big": 1})


def test_dynamic_sampler_favours_the_lagging_task():
    sampler = build("dynamic", signal="loss", tau=0.1, floor=0.1)
    for step in range(20):
        sampler.observe_losses({"big": 1.0 / (step + 1), "mid": 1.0 / (step + 1), "small": 1.0}, step)
    p = sampler.probabilities()
    assert p["small"] > 0.8 and p["big"] >= 0.1 / 3 - 1e-9
    by_validation = build("dynamic", signal="validation", targets={"big": 0.9, "mid": 0.9, "small": 0.9})
    by_validation.observe_validation({"big": 0.9, "mid": 0.85, "small": 0.3}, 100)
    assert max(by_validation.probabilities(), key=by_validation.probabilities().get) == "small"


def test_sequential_sampler_trains_tasks_in_stages():
    from multitune.data.samplers import SAMPLERS

    sampler = SAMPLERS.build(
        "sequential",
        injected={"sizes": {"a": 10, "b": 10, "c": 10}, "weights": None, "total_steps": 100},
        order=["c", "a", "b"],
        fractions=[2, 1, 1],
    )
    drawn = [sampler.tasks_for_step(step, random.Random(step))[0] for step in range(100)]
    assert drawn == ["c"] * 50 + ["a"] * 25 + ["b"] * 25
    assert sampler.probabilities(60) == {"c": 0.0, "a": 1.0, "b": 0.0}
    with pytest.raises(ConfigError, match="order must name every task"):
        SAMPLERS.build("sequential", injected={"sizes": {"a": 1, "b": 1}, "total_steps": 10}, order=["a"])


def test_token_mix_draws_inversely_to_row_length_so_token_shares_are_the_probabilities():
    from multitune.data.samplers import SAMPLERS, ObservesTraining, token_mix

    inner = SAMPLERS.build("uniform", injected={"sizes": {"a": 10, "b": 10}, "weights": None, "total_steps": 0})
    mix = token_mix(inner, {"a": 10.0, "b": 30.0})
    drawn = mix.draw_probabilities()
    assert drawn == pytest.approx({"a": 0.75, "b": 0.25})  # (1/10) / (1/10 + 1/30)
    assert mix.probabilities() == {"a": 0.5, "b": 0.5}  # the target: token shares
    tokens = {n: drawn[n] * length for n, length in {"a": 10, "b": 30}.items()}
    assert tokens["a"] / sum(tokens.values()) == pytest.approx(0.5)
    rng = random.Random(0)
    counts = {"a": 0, "b": 0}
    for step in range(4000):
        counts[mix.tasks_for_step(step, rng)[0]] += 1
    assert counts["a"] / 4000 == pytest.approx(0.75, abs=0.03)
    assert not isinstance(mix, ObservesTraining)
    dynamic = SAMPLERS.build("dynamic", injected={"sizes": {"a": 10, "b": 10}, "weights": None, "total_steps": 10})
    assert isinstance(token_mix(dynamic, {"a": 1.0, "b": 2.0}), ObservesTraining)


@pytest.mark.parametrize(
    "sampling,schedule", [("all_tasks", "joint"), ("round_robin", "joint"), ("uniform", "sequential")]
)
def test_mix_by_tokens_refuses_samplers_that_do_not_draw_by_probability(sampling, schedule):
    from multitune.catalogue import validate_config

    data = {
        "sampling": {"name": sampling},
        "training": {"mix_by": "tokens", "schedule": {"name": schedule}},
        "tasks": {n: {"type": "classification", "source": {"format": "jsonl", "train": "x.jsonl"}} for n in "ab"},
    }
    with pytest.raises(ConfigError, match="picks tasks by a rule") as caught:
        validate_config(data)
    assert caught.value.field == "training.mix_by"
