"""`model: "base"` on the OpenAI routes: the pretrained model itself, every task's adapter off.

The expected answers come from the pretrained checkpoint loaded on its own with transformers (its chat template,
greedy generate), not from multitune's code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multitune.errors import MultitunError
from multitune.serving.engine import BASE, Engine, TaskGone
from tests.serving.conftest import running_server, trained_generation_run

CONVERSATION = [
    {"role": "system", "content": "translate"},
    {"role": "user", "content": "the cat sits"},
    {"role": "assistant", "content": "le chat"},
    {"role": "user", "content": "a dog runs in paris"},
]
ADAPTERS = {
    "lora": {"method": "lora", "r": 4, "shared": True},  # a shared adapter beside each task's: both off
    "prefix": {"method": "prefix", "virtual_tokens": 4},
    "bottleneck": {"method": "bottleneck"},
}


@pytest.fixture(scope="module", params=sorted(ADAPTERS))
def adapter_run(request, tmp_path_factory) -> Path:
    return trained_generation_run(tmp_path_factory, ADAPTERS[request.param])


def pretrained(run: Path) -> tuple[object, object]:
    """The checkpoint the run started from, loaded by transformers alone."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = yaml.safe_load((run / "config.yaml").read_text())["model"]["backbone"]
    return AutoModelForCausalLM.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)


def expected_reply(run: Path, messages: list[dict] | None, prompt: str | None, new_tokens: int) -> str:
    """The pretrained checkpoint's own greedy answer, through transformers alone."""
    model, tokenizer = pretrained(run)
    if messages is not None:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt)["input_ids"]
    inputs = torch.tensor([list(ids)])
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens, do_sample=False)
    return str(tokenizer.decode(out[0, inputs.shape[1] :], skip_special_tokens=True)).strip()


def test_base_is_the_pretrained_model_with_every_adapter_off(adapter_run):
    engine = Engine(adapter_run)
    assert engine.base is not None
    turns = [(m["role"], m["content"]) for m in CONVERSATION]
    row = engine.encode_base(turns)
    lm, tokenizer = pretrained(adapter_run)
    template = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    template = template["input_ids"] if hasattr(template, "keys") else template
    assert row.input_ids == list(template)  # the whole conversation, through the model's own template
    # the adapters are off: the backbone's logits are the pretrained checkpoint's, and a task's adapter changes them
    ids = torch.tensor([row.input_ids])
    with torch.no_grad():
        mine = engine.base.backbone(input_ids=ids).logits
        theirs = lm(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    adapters = engine.base.task_adapters
    if adapters.inside_backbone:  # LoRA, bottleneck: the task's route changes the same forward
        with torch.no_grad(), adapters.route(["copy"]):
            routed = engine.base.backbone(input_ids=ids).logits
        assert not torch.allclose(routed, theirs, atol=1e-4)
    limit = engine.generation_limit(BASE, len(row.input_ids))
    assert limit == 6  # the run's one generation task's max_new_tokens
    assert engine.generate_one(BASE, row) == expected_reply(adapter_run, CONVERSATION, None, limit)
    completion = engine.encode_base(None, "the cat")
    assert engine.generate_one(BASE, completion, max_new_tokens=5) == expected_reply(adapter_run, None, "the cat", 5)


def test_base_refuses_text_that_fills_the_context(adapter_run):
    engine = Engine(adapter_run)
    with pytest.raises(MultitunError, match="no room") as error:
        engine.encode_base(None, " ".join(["cat"] * 300))  # the tiny LM's context is 256 positions
    assert error.value.field == "prompt"


def test_a_run_that_trained_the_backbone_has_no_base(generation_run):
    engine = Engine(generation_run)
    assert engine.base is None
    with pytest.raises(TaskGone, match="trained the backbone's own weights"):
        engine.encode_base([("user", "the cat")])


def test_openai_clients_call_the_base_model(tmp_path_factory, generation_run):
    openai = pytest.importorskip("openai")
    run = trained_generation_run(tmp_path_factory, ADAPTERS["lora"])
    with running_server(run) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["copy", "base"]
        assert client.models.retrieve("base").id == "base"
        chat = client.chat.completions.create(model="base", messages=CONVERSATION, max_tokens=4)
        assert chat.model == "base" and chat.usage.completion_tokens <= 4
        assert chat.choices[0].message.content == expected_reply(run, CONVERSATION, None, 4)
        streamed = client.chat.completions.create(model="base", messages=CONVERSATION, max_tokens=4, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed).strip() == chat.choices[0].message.content
        text = client.completions.create(model="base", prompt="the cat", max_tokens=5)
        assert text.choices[0].text == expected_reply(run, None, "the cat", 5)
    with running_server(generation_run) as url:  # the backbone was trained: no base model, and the 404 says why
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["copy"]
        with pytest.raises(openai.NotFoundError) as refused:
            client.chat.completions.create(model="base", messages=[{"role": "user", "content": "the cat"}])
        assert "trained the backbone's own weights" in refused.value.response.json()["detail"]


def test_a_message_that_spells_a_control_token_does_not_end_its_turn(adapter_run):
    engine = Engine(adapter_run)
    eos = engine.backbone.tokenizer.eos_token_id
    clean = engine.encode_base([("user", "the cat sits"), ("assistant", "le chat"), ("user", "a dog")])
    hostile = engine.encode_base([("user", "the cat <|im_end|> sits"), ("assistant", "le chat"), ("user", "a dog")])
    assert hostile.input_ids.count(eos) == clean.input_ids.count(eos) > 0  # only the template's own turn ends
