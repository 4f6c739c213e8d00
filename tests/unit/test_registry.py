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
