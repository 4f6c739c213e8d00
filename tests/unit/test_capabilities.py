"""What each sharing architecture and adapter method declares on registration (the combination rules read
these declarations), checked against the list the rules were written from, and against the models."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from multitune.models.adapters import ADAPTERS
from multitune.models.architectures import ARCHITECTURES
from multitune.registry import Capabilities

ENCODER = frozenset({"encoder"})
ALL_KINDS = frozenset({"encoder", "causal_lm", "seq2seq", "vision"})
POOLED = frozenset({"encoder", "vision"})  # on pooled features: a vision backbone's too

ARCHITECTURE_CAPABILITIES = {
    "hard": Capabilities(model_kinds=ALL_KINDS, shares_parameters=True, takes_adapters=True, sharded=True),
    "soft": Capabilities(model_kinds=POOLED, shares_parameters=False, takes_adapters=False, sharded=False),
    # one backbone per task, but the stitch units are shared by every task
    "cross_stitch": Capabilities(model_kinds=ENCODER, shares_parameters=True, takes_adapters=False, sharded=False),
    "hybrid": Capabilities(model_kinds=POOLED, shares_parameters=True, takes_adapters=True, sharded=False),
    "mmoe": Capabilities(model_kinds=POOLED, shares_parameters=True, takes_adapters=True, sharded=False),
    "ple": Capabilities(model_kinds=POOLED, shares_parameters=True, takes_adapters=True, sharded=False),
}

ADAPTER_KINDS = {
    "lora": ALL_KINDS,
    "prompt": ENCODER,  # not on causal_lm nor seq2seq
    "prefix": frozenset({"encoder", "causal_lm", "seq2seq"}),  # seq2seq: the decoder's self-attention
    "bottleneck": frozenset({"encoder", "causal_lm"}),  # not on seq2seq
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURE_CAPABILITIES))
def test_each_architecture_declares_what_it_supports(name):
    assert ARCHITECTURES.capabilities(name) == ARCHITECTURE_CAPABILITIES[name]


def test_every_architecture_and_adapter_method_is_listed():
    assert set(ARCHITECTURES.names()) == set(ARCHITECTURE_CAPABILITIES)
    assert set(ADAPTERS.names()) == set(ADAPTER_KINDS)


@pytest.mark.parametrize("name", sorted(ARCHITECTURE_CAPABILITIES))
def test_shares_parameters_is_what_the_model_shares(name):
    """The declaration agrees with the built model: it has shared parameters exactly when it says so."""
    torch.manual_seed(0)
    backbone = BertModel(
        BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    heads = {"a": nn.Linear(32, 2), "b": nn.Linear(32, 3)}
    settings = {"hybrid": {"task_layers": 1}, "mmoe": {"experts": 2}, "ple": {"levels": 2}}.get(name, {})
    injected = {"backbone": backbone, "heads": heads, "pooling": "mean", "hidden_size": 32}
    model = ARCHITECTURES.build(name, injected=injected, **settings)
    assert bool(list(model.shared_parameters())) == ARCHITECTURES.capabilities(name).shares_parameters


@pytest.mark.parametrize("method", sorted(ADAPTER_KINDS))
def test_each_adapter_method_declares_its_model_kinds(method):
    capabilities = ADAPTERS.capabilities(method)
    assert capabilities.model_kinds == ADAPTER_KINDS[method]
    assert not capabilities.sharded  # per-task adapters are not available on a sharded backbone (FSDP) yet
