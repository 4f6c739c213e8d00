import random
from collections import Counter

import pytest

from multitune.data.samplers import SAMPLERS, TemperatureSampler, examples_per_task
from multitune.errors import ConfigError

SIZES = {"big": 900, "mid": 90, "small": 10}


def build(name, **params):
    return SAMPLERS.build(name, injected={"sizes": SIZES, "weights": None}, **params)


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


def test_temperature_rejects_both_forms_and_bad_values():
    with pytest.raises(ConfigError, match="either temperature or alpha"):
        build("temperature", temperature=2.0, alpha=0.5)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        build("temperature", temperature=0)


def test_sampling_weight_multiplies_the_probability():
    sampler = SAMPLERS.build("uniform", injected={"sizes": SIZES, "weights": {"small": 2.0}})
    assert sampler.probabilities() == pytest.approx({"big": 0.25, "mid": 0.25, "small": 0.5})


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_frequencies_match_probabilities(name):
    sampler = build(name)
    draws = Counter(t for step in range(20_000) for t in sampler.tasks_for_step(step, random.Random(f"7:{step}")))
    expected = sampler.probabilities()
    for task, p in expected.items():
        assert draws[task] / 20_000 == pytest.approx(p, abs=0.015)


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
