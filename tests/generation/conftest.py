"""A tiny randomly initialised Llama-architecture causal LM with a word-level tokenizer and a chat template."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WORDS

SPECIAL = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
EXTRA = "user assistant sentiment positive negative translate rate question x y z 0 1 2 3 4 5 6 7 8 9 . , ? ! :".split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_causal_lm(folder: Path, **config: Any) -> Path:
    """Save a 2-layer, 32-wide Llama and its tokenizer (with a chat template) into `folder`; no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIAL, *WORDS, *EXTRA]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    settings: dict[str, Any] = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "pad_token_id": vocab["<pad>"],
        "eos_token_id": vocab["<|im_end|>"],
        "bos_token_id": vocab["<|im_start|>"],
        **config,
    }
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    return folder


def build_tiny_t5(folder: Path) -> Path:
    """Save a 2+2-layer, 32-wide T5 and a word-level tokenizer (no chat template) into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    vocab = {token: i for i, token in enumerate(dict.fromkeys(["<pad>", "</s>", "<unk>", *WORDS, *EXTRA]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(0)
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(0)
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


def sentiment_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Unified records of a toy sentiment task: the answer follows 'good' / 'bad'."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        filler = " ".join(rng.choice(WORDS[:20]) for _ in range(rng.randint(2, 6)))
        records.append(
            {
                "task": "sentiment",
                "instruction": "sentiment ?",
                "input": f"{filler} {'good' if i % 2 == 0 else 'bad'} movie",
                "output": label,
            }
        )
    return records


def copy_rows(n: int, seed: int = 1) -> list[dict[str, str]]:
    """A toy text-to-text task: repeat the input words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        rows.append({"text": words, "target": words})
    return rows
