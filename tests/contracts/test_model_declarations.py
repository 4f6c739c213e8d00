"""The multi-task model acts on what adapter methods and architectures declare, never on their names: a
method registered under a name no code knows gets its prompt positions put in front and dropped again, and
its weights counted where it says they live; each architecture's `backbone_features` (what export reads)
says truly whether its tasks' features are the backbone's own hidden states."""

from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from multitune.data.collate import Batch, TaskRows
from multitune.models.adapters import ADAPTERS, SHARED, Routing
from multitune.models.architectures import ARCHITECTURES
from multitune.models.causal_lm import CausalLMMultiTask, Seq2SeqMultiTask
from multitune.models.heads import ClassificationHead, TokenClassificationHead
from multitune.models.multitask import MultiTaskModel, pool
from multitune.models.peft_tasks import TaskAdapters
from multitune.registry import Capabilities
from tests.contracts.gain_methods import SETTINGS, InsideGain

TASKS = ["a", "b", "c"]
HIDDEN = 32


def bert(layers: int = 2) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64
    )
    return BertModel(config, add_pooling_layer=False).eval()


class Prefix:
    """One learned vector per task in front of each row's token embeddings (the shared one first): a prompt
    method under a name no code compares with."""

    inside_backbone = False
    merges = False

    def __init__(self) -> None:
        self.vectors = nn.ParameterDict()

    def attach(self, backbone: nn.Module, names: list[str], routing: Routing) -> dict[str, nn.Module]:
        for name in names:
            self.vectors[name] = nn.Parameter(torch.randn(HIDDEN))
        return {"vectors": self.vectors}

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield self.vectors[name]

    def prompt_length(self, shared: bool) -> int:
        return 2 if shared else 1

    def backbone_inputs(self, backbone: nn.Module, inputs: dict[str, Tensor], routing: Routing) -> dict[str, Tensor]:
        assert routing.rows is not None
        embeds = backbone.get_input_embeddings()(inputs["input_ids"])  # type: ignore[operator]
        front = torch.stack([self.vectors[name] for name in routing.rows])[:, None]
        if routing.shared:
            front = torch.cat([self.vectors[SHARED].expand(len(routing.rows), 1, -1), front], dim=1)
        mask = inputs["attention_mask"]
        ones = torch.ones(mask.shape[0], front.shape[1], dtype=mask.dtype)
        return {"inputs_embeds": torch.cat([front, embeds], dim=1), "attention_mask": torch.cat([ones, mask], dim=1)}

    def saved_states(self, backbone: nn.Module, tasks: list[str], shared: bool) -> tuple[dict, None]:
        return {}, None


@pytest.fixture
def registered(monkeypatch):
    """ADAPTERS with `front_vectors` and `inside_gain` added for this test only."""
    monkeypatch.setattr(ADAPTERS, "_factories", dict(ADAPTERS._factories))
    monkeypatch.setattr(ADAPTERS, "_capabilities", dict(ADAPTERS._capabilities))
    encoder = Capabilities(model_kinds=frozenset({"encoder"}))
    ADAPTERS.register("front_vectors", capabilities=encoder)(Prefix)
    ADAPTERS.register("inside_gain", capabilities=encoder)(InsideGain)


def adapted_model(method: str, shared: bool) -> MultiTaskModel:
    backbone = bert()
    heads = {name: ClassificationHead(HIDDEN, 2, dropout=0.0) for name in TASKS}
    model = MultiTaskModel(backbone, heads)  # type: ignore[arg-type]
    model.attach_adapters(TaskAdapters(backbone, TASKS, method=method, shared=shared, **SETTINGS))
    return model.eval()


layouts = st.lists(
    st.tuples(st.sampled_from(TASKS), st.integers(1, 3)), min_size=1, max_size=4, unique_by=lambda r: r[0]
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts, shared=st.booleans(), seed=st.integers(0, 2**16))
def test_a_prompt_method_of_any_name_gets_its_positions_in_front_and_dropped(registered, layout, shared, seed):
    model = adapted_model("front_vectors", shared)
    method: Prefix = model.task_adapters.adapter_method  # type: ignore[union-attr,assignment]
    generator = torch.Generator().manual_seed(seed)
    rows = sum(n for _, n in layout)
    ids = torch.randint(1, 60, (rows, 5), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0  # a padded row
    tasks, start = {}, 0
    for name, n in layout:
        tasks[name] = TaskRows(slice(start, start + n), None)
        start += n
    row_tasks = [name for name, n in layout for _ in range(n)]
    with torch.no_grad():
        hidden = model.encode(Batch({"input_ids": ids, "attention_mask": mask}, tasks))
        for i, task in enumerate(row_tasks):  # row by row, the prefix written out here
            front = [method.vectors[SHARED], method.vectors[task]] if shared else [method.vectors[task]]
            embeds = torch.cat([torch.stack(front), model.backbone.embeddings.word_embeddings(ids[i])])[None]
            row_mask = torch.cat([torch.ones(len(front), dtype=mask.dtype), mask[i]])[None]
            expected = model.backbone(inputs_embeds=embeds, attention_mask=row_mask).last_hidden_state[0, len(front) :]
            real = mask[i].bool()
            assert hidden.shape[1:] == (5, HIDDEN)
            assert torch.allclose(hidden[i][real], expected[real], atol=1e-5)


def names_of(model: nn.Module, parameters: Iterator[nn.Parameter]) -> list[str]:
    by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    return [by_id[id(p)] for p in parameters]


@pytest.mark.parametrize("shared", [False, True])
def test_weights_inside_the_backbone_count_where_they_live_whatever_the_name(registered, shared):
    model = adapted_model("inside_gain", shared)
    gains = [f"backbone.encoder.layer.1.gains.{name}" for name in [*TASKS, *([SHARED] if shared else [])]]
    own = [name for name, _ in model.backbone.named_parameters(prefix="backbone")]
    # shared: the backbone's own weights and the shared gain (once: it is one of the backbone's); no task's gain
    assert names_of(model, model.shared_parameters()) == [n for n in own if n not in gains[:3]]
    # pretrained: the backbone's own weights only, no gain at all
    assert names_of(model, model.pretrained_parameters()) == [n for n in own if n not in gains]
    assert names_of(model, model.task_parameters("b")) == [
        "heads.b.out.weight",
        "heads.b.out.bias",
        "backbone.encoder.layer.1.gains.b",
    ]


@pytest.mark.parametrize("shared", [False, True])
def test_weights_outside_the_backbone_count_once_whatever_the_name(registered, shared):
    model = adapted_model("front_vectors", shared)
    own = [name for name, _ in model.backbone.named_parameters(prefix="backbone")]
    shared_names = names_of(model, model.shared_parameters())
    assert shared_names == own + (["task_adapters.vectors.shared"] if shared else [])
    assert names_of(model, model.pretrained_parameters()) == own


# --- architectures -----------------------------------------------------------------------------------

ARCHITECTURE_SETTINGS = {"hybrid": {"task_layers": 1}}


def heads_for(names: list[str]) -> dict[str, nn.Module]:
    return {
        names[0]: ClassificationHead(HIDDEN, 3, dropout=0.0),
        **{name: TokenClassificationHead(HIDDEN, 4, dropout=0.0) for name in names[1:]},
    }


def plain_head_outputs(model: MultiTaskModel, hidden: Tensor, batch: Batch) -> dict[str, Tensor]:
    """Each task's head straight on `hidden`, the backbone's own hidden states (what export writes)."""
    mask = batch.inputs["attention_mask"]
    out = {}
    for name, part in batch.tasks.items():
        head = model.heads[name]
        rows = hidden[part.rows]
        out[name] = head(rows if head.level == "token" else pool(rows, mask[part.rows], model.pooling))
    return out


def perturbed(model: nn.Module) -> nn.Module:
    """Every weight moved at random: no expert, tower, copy or stitch stays at an identity it may start from."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def a_batch(names: list[str]) -> Batch:
    ids = torch.randint(1, 60, (2 * len(names), 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    tasks = {name: TaskRows(slice(2 * i, 2 * i + 2), None) for i, name in enumerate(names)}
    return Batch({"input_ids": ids, "attention_mask": mask}, tasks)


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_an_architecture_declares_backbone_features_exactly_when_its_heads_read_the_backbones_own(name):
    backbone = bert(layers=3)
    names = ["a", "b", "c"]
    injected = {"backbone": backbone, "heads": heads_for(names), "pooling": "mean", "hidden_size": HIDDEN}
    model = perturbed(ARCHITECTURES.build(name, injected=injected, **ARCHITECTURE_SETTINGS.get(name, {})))
    batch = a_batch(names)
    with torch.no_grad():
        ours = model(batch)
        # the module passed in, called as a plain transformers model (hybrid has cut its top layers away)
        hidden = backbone(**batch.inputs).last_hidden_state
        plain = plain_head_outputs(model, hidden, batch)
    same = all(torch.allclose(ours[n], plain[n], atol=1e-5) for n in names)
    assert model.backbone_features is same


def llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=60,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
    )
    return LlamaForCausalLM(config)


def t5() -> nn.Module:
    return T5ForConditionalGeneration(
        T5Config(vocab_size=60, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
    )


@pytest.mark.parametrize(
    ("cls", "make", "own"),
    [
        (CausalLMMultiTask, llama, lambda lm, inputs: lm.model(**inputs).last_hidden_state),
        (Seq2SeqMultiTask, t5, lambda lm, inputs: lm.encoder(**inputs).last_hidden_state),
    ],
)
def test_language_models_declare_backbone_features_and_their_heads_read_the_bodys_states(cls, make, own):
    torch.manual_seed(0)
    names = ["a", "b"]
    lm = make()
    model = perturbed(cls(lm, None, heads_for(names), generation_tasks=[], pooling="mean"))
    batch = a_batch(names)
    with torch.no_grad():
        plain = plain_head_outputs(model, own(lm, batch.inputs), batch)
        ours = model(batch)
    assert model.backbone_features is True
    assert all(torch.allclose(ours[n], plain[n], atol=1e-5) for n in names)
