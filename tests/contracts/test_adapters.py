"""Every registered adapter method runs through the same checks: rows routed to their own task's adapter
whatever the layout of the batch, weights where the method says they live, the model kinds it declares, a
deep copy that keeps its own adapters; and a method added by registration alone works in TaskAdapters."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTModel,
)

from multitune.errors import ConfigError
from multitune.models.adapters import ADAPTERS, SHARED
from multitune.models.peft_tasks import TaskAdapters
from multitune.registry import MODEL_KINDS, Capabilities
from tests.contracts.gain_methods import SETTINGS, Gain

TASKS = ["a", "b", "c"]
MAKERS = {
    "encoder": lambda: BertModel(
        BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    ),
    "causal_lm": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=60,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
        )
    ),
    "seq2seq": lambda: T5ForConditionalGeneration(
        T5Config(vocab_size=60, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    ),
    "vision": lambda: ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=16,
            patch_size=8,
        ),
        add_pooling_layer=False,
    ),
}


def adapted(method: str, shared: bool = False, kind: str = "encoder") -> tuple[nn.Module, TaskAdapters]:
    """A tiny backbone with per-task adapters whose weights are all nonzero (LoRA's B and the bottleneck's
    up projection start at zero, which would make every adapter the identity)."""
    torch.manual_seed(0)
    backbone = MAKERS[kind]().eval()
    adapters = TaskAdapters(backbone, TASKS, method=method, shared=shared, **SETTINGS)
    with torch.no_grad():
        for name in [*TASKS, *([SHARED] if shared else [])]:
            for p in adapters.adapter_parameters(name):
                p.normal_(0, 0.5)
    return backbone, adapters


def features(backbone: nn.Module, adapters: TaskAdapters, ids: Tensor, row_tasks: list[str]) -> Tensor:
    """The routed backbone's features of the real tokens [B, L, H] (prompt positions dropped): an encoder's
    last hidden states, a causal LM's last layer's."""
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad(), adapters.route(row_tasks):
        out = backbone(**adapters.prompted_inputs(backbone, inputs), output_hidden_states=True).hidden_states[-1]
    return out[:, adapters.prompt_length() :]


@pytest.mark.parametrize(
    "method,kind",
    [(m, k) for m in ADAPTERS.names() for k in ("encoder", "causal_lm") if k in ADAPTERS.capabilities(m).model_kinds],
)
@pytest.mark.parametrize("shared", [False, True])
def test_every_row_goes_through_its_own_tasks_adapter_whatever_the_batch_layout(method, kind, shared):
    backbone, adapters = adapted(method, shared, kind)

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        runs=st.lists(st.tuples(st.sampled_from(TASKS), st.integers(1, 3)), min_size=1, max_size=4),
        seed=st.integers(0, 2**16),
    )
    def check(runs, seed):
        row_tasks = [task for task, size in runs for _ in range(size)]
        ids = torch.randint(5, 60, (len(row_tasks), 6), generator=torch.Generator().manual_seed(seed))
        mixed = features(backbone, adapters, ids, row_tasks)
        for i, task in enumerate(row_tasks):  # each row alone, through its own task's adapter
            alone = features(backbone, adapters, ids[i : i + 1], [task])
            # float32 kernels of other batch shapes round differently (up to ~2e-5 of the value); a row routed
            # to another task's adapter differs by O(1)
            assert torch.allclose(mixed[i : i + 1], alone, rtol=1e-4, atol=1e-4)

    check()
    ids = torch.randint(5, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(
        features(backbone, adapters, ids, ["a", "a"]), features(backbone, adapters, ids, ["b", "b"])
    )


@pytest.mark.parametrize("method", ADAPTERS.names())
def test_weights_live_where_the_method_says_and_only_they_train(method):
    backbone, adapters = adapted(method, shared=True)
    per_name = {name: {id(p) for p in adapters.adapter_parameters(name)} for name in [*TASKS, SHARED]}
    assert all(per_name.values())
    every = set().union(*per_name.values())
    assert sum(map(len, per_name.values())) == len(every), "two adapters share a weight"
    home = backbone if adapters.inside_backbone else adapters
    assert every <= {id(p) for p in home.parameters()}
    trainable = {id(p) for p in [*backbone.parameters(), *adapters.parameters()] if p.requires_grad}
    assert trainable == every, "the backbone's own weights stay frozen; every adapter weight trains"


@pytest.mark.parametrize("method", ADAPTERS.names())
def test_the_prompt_length_is_what_the_output_gains(method):
    """prompt_length: the positions the backbone's output has in front of the tokens (dropped before the
    heads); a prefix lengthens the keys (the mask) but not the output."""
    backbone, adapters = adapted(method, shared=True)
    ids = torch.randint(5, 60, (2, 6))
    with adapters.route(["a", "b"]), torch.no_grad():
        inputs = adapters.prompted_inputs(backbone, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        hidden = backbone(**inputs).last_hidden_state
    assert hidden.shape[:2] == (2, 6 + adapters.prompt_length())
    keys = 2 * SETTINGS["virtual_tokens"] if method in ("prompt", "prefix") else 0
    assert inputs["attention_mask"].shape == (2, 6 + keys)
    assert adapters.prompt_length() == (2 * SETTINGS["virtual_tokens"] if method == "prompt" else 0)


@pytest.mark.parametrize("method", ADAPTERS.names())
def test_a_deep_copy_runs_its_own_adapters(method):
    """One model per task (serving) is a deep copy: its hooks must apply the copy's adapters, not the
    original's (which a later load_weights or training step may change)."""
    backbone, adapters = adapted(method, shared=True)
    ids = torch.randint(5, 60, (3, 6))
    before = features(backbone, adapters, ids, ["a", "b", "b"])
    twin_backbone, twin_adapters = copy.deepcopy((backbone, adapters))
    with torch.no_grad():
        for name in [*TASKS, SHARED]:
            for p in adapters.adapter_parameters(name):
                p.zero_()
    assert torch.allclose(features(twin_backbone, twin_adapters, ids, ["a", "b", "b"]), before, atol=1e-6)
    assert not torch.allclose(features(backbone, adapters, ids, ["a", "b", "b"]), before, atol=1e-3)


@pytest.mark.parametrize("method", ADAPTERS.names())
@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
def test_the_declared_model_kinds_are_the_ones_it_attaches_to(method, kind):
    """bottleneck cannot find a seq2seq model's layers; prompt attaches to an LM but the LM paths never put
    the prompt in front of the tokens, so it is declared for encoders only (the config refuses it)."""
    declared = kind in ADAPTERS.capabilities(method).model_kinds
    if method == "bottleneck" and kind == "seq2seq":
        assert not declared
        with pytest.raises(ConfigError) as error:
            adapted(method, kind=kind)
        assert error.value.field == "model.peft.method"
        return
    if declared:
        adapted(method, kind=kind)


def test_an_unknown_method_names_the_field():
    with pytest.raises(ConfigError, match=r"unknown adapter method 'lorra' \(did you mean 'lora'\?\)") as error:
        TaskAdapters(MAKERS["encoder"](), TASKS, method="lorra", shared=False, **SETTINGS)
    assert error.value.field == "model.peft.method"


def test_a_method_added_by_registration_alone_works_in_task_adapters(monkeypatch):
    monkeypatch.setattr(ADAPTERS, "_factories", dict(ADAPTERS._factories))
    monkeypatch.setattr(ADAPTERS, "_capabilities", dict(ADAPTERS._capabilities))
    ADAPTERS.register("gain", capabilities=Capabilities(model_kinds=frozenset({"encoder"})))(Gain)
    torch.manual_seed(0)
    backbone = MAKERS["encoder"]().eval()
    ids = torch.arange(5, 11)[None]
    with torch.no_grad():
        plain = backbone(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    adapters = TaskAdapters(backbone, TASKS, method="gain", shared=False, **SETTINGS)
    assert dict(adapters.named_parameters()).keys() == {"gains.a", "gains.b", "gains.c"}
    assert [p.requires_grad for p in backbone.parameters()] == [False] * len(list(backbone.parameters()))
    with torch.no_grad():
        adapters.gains["b"].fill_(3.0)
    out = features(backbone, adapters, ids.repeat(2, 1), ["a", "b"])  # BERT's output is its last layer's
    assert torch.allclose(out[0], plain, atol=1e-5) and torch.allclose(out[1], 3 * plain, atol=1e-5)
