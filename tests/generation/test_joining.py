"""Continuous batching (models/decoding.py): rows that join a running batch between steps, and leave it, each
decode exactly what transformers' own greedy generate gives that row alone."""

from __future__ import annotations

import pytest
import torch

from multitune.models.causal_lm import CausalLMMultiTask, Seq2SeqMultiTask, load_causal_lm, load_seq2seq_lm
from multitune.models.decoding import JoiningBatch, can_join
from tests.generation.conftest import build_tiny_causal_lm


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tmp_path_factory):
    """A tiny LM whose greedy continuations vary (weights drawn wide): Llama (rotary positions) and GPT-2
    (learned absolute positions, which a row's padding must not shift)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = build_tiny_causal_lm(tmp_path_factory.mktemp("lm"), initializer_range=1.0)
    if request.param == "gpt2":
        vocab = len(load_causal_lm(str(folder)).tokenizer)
        config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=1.0)
        for old in folder.glob("model*.safetensors"):
            old.unlink()
        GPT2LMHeadModel(config).save_pretrained(folder)
    backbone = load_causal_lm(str(folder))
    return CausalLMMultiTask(backbone.model, backbone.tokenizer, {}, ["a"]).eval()


def alone(model: CausalLMMultiTask, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy generate of one unpadded prompt, up to its end of sequence (included)."""
    ids = torch.tensor([prompt])
    out = model.backbone.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=model.tokenizer.pad_token_id,
    )[0, len(prompt) :].tolist()
    eos = model.tokenizer.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out


def test_rows_joining_and_leaving_between_steps_decode_as_each_alone(model):
    prompts = {
        "p0": [2, 66, 27, 31, 3, 2, 67],
        "p1": [2, 40, 3],
        "p2": [2, 66, 27, 31, 41, 42, 43, 44, 45, 46, 3, 2],
        "p3": [2, 50, 51, 3, 67],
    }
    batch = JoiningBatch(model, model.tokenizer.pad_token_id)
    rows: list[str] = []
    got: dict[str, list[int]] = {}

    def join(*names: str) -> None:
        first = batch.join([prompts[n] for n in names], [None] * len(names)).tolist()
        rows.extend(names)
        for name, token in zip(names, first, strict=True):
            got[name] = [token]

    def step(times: int) -> None:
        for _ in range(times):
            for name, token in zip(rows, batch.step().tolist(), strict=True):
                got[name].append(token)

    def leave(name: str) -> None:
        keep = [i for i, n in enumerate(rows) if n != name]
        batch.leave(keep)
        rows[:] = [rows[i] for i in keep]

    join("p0")
    step(2)
    join("p1", "p2")  # a short and a long prompt join a row three tokens in
    step(3)
    leave("p0")
    assert bool(batch.mask[:, 0].any())  # positions no row uses any more were cut
    step(1)
    join("p3")
    step(4)
    leave("p2")
    step(2)
    assert batch.rows == 2 and batch.mask.shape[0] == 2
    compared = 0
    for name, tokens in got.items():
        expected = alone(model, prompts[name], len(tokens))
        assert tokens[: len(expected)] == expected, name
        compared += len(expected)
    assert compared >= 20  # not rows that all ended at their first token


def test_every_row_leaving_empties_the_batch_and_a_new_one_starts(model):
    batch = JoiningBatch(model, model.tokenizer.pad_token_id)
    batch.join([[2, 40, 3]], [None])
    batch.step()
    batch.leave([])
    assert batch.rows == 0 and batch.cache is None and batch.open
    first = batch.join([[2, 50, 51, 3, 67]], [None]).tolist()
    tokens = first + [int(batch.step()[0]) for _ in range(3)]
    expected = alone(model, [2, 50, 51, 3, 67], 4)
    assert tokens[: len(expected)] == expected


def test_which_models_take_rows_mid_run(model, tiny_t5):
    assert can_join(model)
    t5 = load_seq2seq_lm(str(tiny_t5))
    assert not can_join(Seq2SeqMultiTask(t5.model, t5.tokenizer, {}, ["a"]))
    assert not can_join(torch.nn.Linear(2, 2))
