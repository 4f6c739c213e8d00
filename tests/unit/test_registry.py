import pytest

from multitune.errors import ConfigError
from multitune.registry import Registry


def make_registry() -> Registry[object]:
    registry: Registry[object] = Registry("widget")

    @registry.register("round")
    class Round:
        """Round widgets."""

        def __init__(self, sizes: dict[str, int], radius: float = 1.0) -> None:
            self.sizes, self.radius = sizes, radius

    return registry


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown widget 'rund' \(did you mean 'round'\?\); choose from: round"):
        make_registry().get("rund")


def test_build_injects_and_checks_parameters():
    registry = make_registry()
    widget = registry.build("round", injected={"sizes": {"a": 1}}, radius=2.0)
    assert widget.radius == 2.0 and widget.sizes == {"a": 1}
    with pytest.raises(ConfigError, match=r"unknown parameter for widget 'round' \(accepted: radius\)"):
        registry.build("round", injected={"sizes": {}}, diameter=2.0)


def test_registering_a_name_twice_fails():
    registry = make_registry()
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("round")(object)


def test_summaries_use_the_docstring():
    assert make_registry().summaries() == [("round", "Round widgets.")]


def test_parameters_suggest_the_closest_and_must_be_numbers_where_the_method_takes_numbers():
    registry = make_registry()
    with pytest.raises(ConfigError, match=r"\(did you mean 'radius'\? accepted: radius\)"):
        registry.build("round", injected={"sizes": {}}, raduis=2.0)
    for bad in ("1e-3x", True, [1.0], None):
        with pytest.raises(ConfigError, match=r"widget 'round' takes a number here, got"):
            registry.build("round", injected={"sizes": {}}, radius=bad)
    assert registry.build("round", injected={"sizes": {}}, radius=3).radius == 3  # an int is a number


def test_loss_weighting_parameter_given_as_text_is_refused_at_config_time(tmp_path):
    from multitune.catalogue import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "loss_weighting: {name: gradnorm, alpha: '0.1'}\n"
        "tasks: {a: {type: classification, source: {format: jsonl, train: a.jsonl}}}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"field 'loss_weighting.alpha': loss weighting 'gradnorm' takes a number"):
        load_config(path)
