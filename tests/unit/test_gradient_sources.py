"""The gradient sources are registry entries: the config's choices, their declared capabilities, and the
forward each one asks of `balanced_backward`."""

import datetime

import pytest
import torch
import torch.distributed as dist

from multitune.balancing.backward import GRADIENT_SOURCES, Balancer, balanced_backward
from multitune.balancing.gradients.base import SOURCES
from multitune.catalogue import validate_config
from multitune.core.processes import ALONE, Processes
from multitune.errors import ConfigError
from multitune.registry import Capabilities
from tests.contracts.test_balancing import BATCH, TwoHeadModel, build, weighting


def test_the_registered_sources_are_the_configs_choices():
    assert GRADIENT_SOURCES.names() == sorted(SOURCES)  # the sources an aggregator may declare
    base = {"tasks": {"a": {"type": "classification", "source": {"format": "jsonl", "train": "x.jsonl"}}}}
    for source in GRADIENT_SOURCES.names():
        config = validate_config({**base, "gradient_aggregation": {"name": "mgda", "source": source}})
        assert config.gradient_aggregation.source == source
    with pytest.raises(ConfigError, match="did you mean 'parameters'") as error:
        validate_config({**base, "gradient_aggregation": {"name": "mgda", "source": "parameter"}})
    assert error.value.field == "gradient_aggregation.source"


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


# Rank 0 holds task a's last row and all of task b's; rank 1 task a's first two rows and none of b's.
PLACES = {0: ((2, 6), {"a": 1 / 3, "b": 1.0}), 1: ((0, 2), {"a": 2 / 3, "b": 0.0})}


def _step(source, group=ALONE, batch=BATCH, shares=None):
    """One gradnorm + PCGrad step: the model's gradients and the weights GradNorm moved to."""
    model, balancer = TwoHeadModel(), Balancer(weighting("gradnorm"), build("pcgrad"), source)
    balanced_backward(model, batch, balancer, 0, group=group, shares=shares)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, balancer.weighting.task_weights.clone()


def _one_of_two_processes(rank, store, source, out):
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    (start, stop), shares = PLACES[rank]
    torch.save(_step(source, Processes(rank, 2), BATCH.rows(start, stop), shares), out / f"{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("source", GRADIENT_SOURCES.names())
def test_a_process_with_one_tasks_rows_balances_with_the_others(tmp_path, source):
    """Every process takes part in the same sums over the processes, whichever tasks its rows hold; each
    ends with the gradients and GradNorm weights of one process on the whole batch."""
    torch.multiprocessing.spawn(_one_of_two_processes, args=(tmp_path / "store", source, tmp_path), nprocs=2)
    grads, weights = _step(source)
    for rank in (0, 1):
        got_grads, got_weights = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got_weights, weights)
        assert got_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7)
