"""The gradient sources are registry entries: the config's choices, their declared capabilities, and the
forward each one asks of `balanced_backward`."""

import typing

import pytest

from multitune.balancing.backward import GRADIENT_SOURCES, Balancer, balanced_backward
from multitune.balancing.gradients.base import SOURCES
from multitune.config import GradientConfig
from multitune.errors import ConfigError
from multitune.registry import Capabilities
from tests.contracts.test_balancing import BATCH, TwoHeadModel, build, weighting


def test_the_registered_sources_are_the_configs_choices():
    accepted = typing.get_args(GradientConfig.model_fields["source"].annotation)
    assert GRADIENT_SOURCES.names() == sorted(accepted) == sorted(SOURCES)


def test_each_source_declares_what_it_supports():
    assert GRADIENT_SOURCES.capabilities("parameters") == Capabilities(whole_gradients=True, sharded=False)
    representation = GRADIENT_SOURCES.capabilities("representation")
    assert representation == Capabilities()
    assert representation.sharded and not representation.whole_gradients


class CountingModel(TwoHeadModel):
    """Records the rows of every forward of the backbone."""

    def __init__(self):
        super().__init__()
        self.encoded = []

    def encode(self, batch):
        self.encoded.append(batch.size)
        return super().encode(batch)


@pytest.mark.parametrize(
    ("source", "micro_batches", "forwards"),
    [
        ("parameters", 1, [3, 3]),  # whole gradients: each task's own forward on its own rows
        ("representation", 1, [6]),  # one forward of the joint batch
        ("representation", 3, [2, 2, 2, 2, 2, 2]),  # three parts without a graph, then their replay
    ],
)
def test_the_source_decides_the_forward(source, micro_batches, forwards):
    model = CountingModel()
    balanced_backward(
        model, BATCH, Balancer(weighting("equal"), build("pcgrad"), source), 0, micro_batches=micro_batches
    )
    assert model.encoded == forwards


def test_an_unknown_source_is_a_config_error_naming_the_field():
    balancer = Balancer(weighting("equal"), build("pcgrad"), "parameter")
    with pytest.raises(ConfigError, match=r"unknown gradient source 'parameter'.*did you mean 'parameters'") as error:
        balanced_backward(TwoHeadModel(), BATCH, balancer, 0)
    assert error.value.field == "gradient_aggregation.source"
