"""Property-based tests: data text is text. Random texts, instructions, targets and token words with the
tokenizer's control-token spellings ('<|im_end|>', '[SEP]', '</s>', '<pad>' ...) embedded anywhere, through
every encode path (classification, pairs, regression, token tagging, causal-LM prompts and targets with and
without a chat template, with and without labels, cut or whole, seq2seq): the only control tokens in the ids are
those the tokenizer or the chat template adds itself. The expected control tokens are read off the tokenizer's
own encoding of clean text, not from multitune's encoder.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from multitune.config import TaskConfig
from multitune.data.encoding import encode
from multitune.data.tasks import Example, TaskData
from multitune.data.tokens import IGNORE_INDEX
from tests.conftest import WORDS
from tests.generation.conftest import build_tiny_causal_lm, build_tiny_t5

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
LOOKALIKES = ["<", "|", ">", "[", "]", "</", "/", "_", "im", "end", "sep"]


def controls(tokenizer: Any) -> set[int]:
    """Ids no text may give: special and special-flagged added tokens, except unk (unknown text maps to it)."""
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return (set(tokenizer.all_special_ids) | added) - {tokenizer.unk_token_id}


def spellings(tokenizer: Any) -> list[str]:
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens))


ANY = st.characters(blacklist_categories=["Cs"])
# assigned, printable characters of the basic plane: SmolLM2's tokenizer has no piece for some control
# characters and some bytes of 4-byte characters, and drops them whatever multitune does
PRINTABLE = st.characters(max_codepoint=0xFFFF, blacklist_categories=["Cs", "Cc", "Cn", "Co"])


def texts(
    tokenizer: Any, max_pieces: int = 8, alphabet: st.SearchStrategy[str] = ANY, min_pieces: int = 1
) -> st.SearchStrategy[str]:
    """Words, control-token spellings, look-alike fragments and random characters, joined by random spacing."""
    piece = st.one_of(
        st.sampled_from(WORDS[:30]),
        st.sampled_from(spellings(tokenizer)),
        st.sampled_from(LOOKALIKES),
        st.text(alphabet=alphabet, min_size=1, max_size=3),
    )
    glue = st.sampled_from(["", " ", " ", "\n", "  "])
    return st.lists(st.tuples(piece, glue), min_size=min_pieces, max_size=max_pieces).map(
        lambda parts: "".join(p + g for p, g in parts)
    )


def only(ids: list[int], tokenizer: Any) -> list[int]:
    found = controls(tokenizer)
    return [i for i in ids if i in found]


def task(kind: str, labels: list[str] | None = None, **extra: Any) -> TaskData:
    config = TaskConfig.model_validate({"type": kind, "source": {"format": "jsonl", "train": "x"}, **extra})
    return TaskData("t", config, {}, labels)


def template_controls(tokenizer: Any) -> list[int]:
    """The control tokens of a prompt around clean text, from the tokenizer's own encoding."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
        )
        return only(tokenizer(rendered, add_special_tokens=False)["input_ids"], tokenizer)
    return only(tokenizer("x\n")["input_ids"], tokenizer)


# --- tokenizers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(tiny_backbone):
    return AutoTokenizer.from_pretrained(tiny_backbone)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("fuzz-llama"))


@pytest.fixture(scope="module")
def llama(tiny_lm):
    return AutoTokenizer.from_pretrained(str(tiny_lm))


@pytest.fixture(scope="module")
def plain_llama(tiny_lm):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm))
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return AutoTokenizer.from_pretrained(str(build_tiny_t5(tmp_path_factory.mktemp("fuzz-t5"))))


def draw_texts(
    data: st.DataObject, tokenizer: Any, max_pieces: int = 8, alphabet: Any = ANY, min_pieces: int = 1
) -> str:
    return str(data.draw(texts(tokenizer, max_pieces, alphabet, min_pieces)))


# --- encoders: classification, pairs, regression, token tagging -------------------------------------------


@FUZZ
@given(data=st.data(), max_length=st.integers(4, 48))
def test_encoder_inputs_have_only_cls_and_sep(bert, data, max_length):
    cls, sep = bert.cls_token_id, bert.sep_token_id
    first, second = draw_texts(data, bert), draw_texts(data, bert)
    (one,) = encode([Example((first,), "a")], task("classification", ["a"]), bert, max_length)
    assert only(one.input_ids, bert) == [cls, sep] and len(one.input_ids) <= max_length
    (two,) = encode([Example((first, second), 0.5)], task("regression", text_fields=["a", "b"]), bert, max_length)
    assert only(two.input_ids, bert) == [cls, sep, sep]
    words = tuple(data.draw(st.lists(texts(bert, 2).filter(str.strip), min_size=1, max_size=6)))
    tags = task("token_classification", ["O"])
    (tagged,) = encode([Example(words, ("O",) * len(words))], tags, bert, max_length)
    assert only(tagged.input_ids, bert) == [cls, sep]
    assert all(tagged.input_ids[s] not in controls(bert) for s in tagged.word_starts if s >= 0)


# --- causal LM: prompts and targets, chat template or plain text, cut or whole --------------------------


def check_generation(tokenizer: Any, data: st.DataObject, max_length: int, input_pieces: int) -> None:
    instruction = draw_texts(data, tokenizer, 3) if data.draw(st.booleans()) else None
    source = draw_texts(data, tokenizer, input_pieces, min_pieces=input_pieces // 4)
    target = draw_texts(data, tokenizer, 4)
    example = Example((source,), target, instruction=instruction)
    eos = tokenizer.eos_token_id
    (row,) = encode([example], task("generation"), tokenizer, max_length)
    event("prompt cut" if len(row.input_ids) == max_length else "prompt whole")
    prompt, rest = row.input_ids[: row.prompt_length], row.input_ids[row.prompt_length :]
    assert len(row.input_ids) <= max_length
    assert only(prompt, tokenizer) == template_controls(tokenizer)
    assert only(rest, tokenizer) == [eos] and rest[-1] == eos
    assert [t for t in row.label if t != IGNORE_INDEX] == rest
    (bare,) = encode([example], task("generation"), tokenizer, max_length, with_labels=False)  # predict, serve
    assert only(bare.input_ids, tokenizer) == template_controls(tokenizer) and bare.label is None


@FUZZ
@given(data=st.data(), max_length=st.integers(28, 80))
def test_causal_lm_with_a_chat_template(llama, data, max_length):
    check_generation(llama, data, max_length, 40)


@FUZZ
@given(data=st.data(), max_length=st.integers(28, 80))
def test_causal_lm_without_a_chat_template(plain_llama, data, max_length):
    check_generation(plain_llama, data, max_length, 40)


@FUZZ
@given(data=st.data(), max_length=st.integers(160, 240))
def test_smollm2_prompts_and_targets(smollm2, data, max_length):
    check_generation(smollm2, data, max_length, 120)


@FUZZ
@given(data=st.data())
def test_smollm2_whole_prompts_and_targets_decode_to_the_text(smollm2, data):
    """Byte-level BPE loses nothing: a prompt that was not cut decodes to the rendered template, a target to
    itself (in printable characters: see PRINTABLE)."""
    instruction, source, target = (draw_texts(data, smollm2, 4, PRINTABLE) for _ in range(3))
    (row,) = encode([Example((source,), target, instruction=instruction)], task("generation"), smollm2, 1024)
    message = f"{instruction}\n\n{source}" if instruction.strip() else source
    rendered = smollm2.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
    )
    assert smollm2.decode(row.input_ids[: row.prompt_length]) == rendered
    assert smollm2.decode(row.input_ids[row.prompt_length : -1]) == target


# --- seq2seq: the prompt to the encoder, the target to the decoder -------------------------------------


@FUZZ
@given(data=st.data(), max_length=st.integers(14, 60))
def test_seq2seq_prompts_and_targets(t5, data, max_length):
    instruction = draw_texts(data, t5, 3) if data.draw(st.booleans()) else None
    example = Example((draw_texts(data, t5, 40, min_pieces=10),), draw_texts(data, t5, 4), instruction=instruction)
    (row,) = encode([example], task("generation"), t5, max_length, decoder_targets=True)
    event("prompt cut" if len(row.input_ids) == max_length else "prompt whole")
    eos = t5.eos_token_id
    assert only(row.input_ids, t5) == [eos] and row.input_ids[-1] == eos and len(row.input_ids) <= max_length
    assert isinstance(row.label, list) and only(row.label, t5) == [eos] and row.label[-1] == eos
