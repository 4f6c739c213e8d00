"""Encode generation examples for a causal LM: chat-formatted prompt + target + eos, loss on the target only;
or for an encoder-decoder (seq2seq) LM: the prompt to the encoder, target + eos to the decoder.

`input_ids` = prompt ids + target ids; `label[i]` is the token to predict from position i (the targets
shifted by one for next-token prediction), IGNORE_INDEX on the prompt (and, after collation, on padding).
Over `max_length`, the input is cut from its left (its end, and the whole target, are kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from multitune.data.encoding import IGNORE_INDEX, Encoded
from multitune.data.tasks import Example, TaskData

INPUT_MARK = "\u0000multitune-input\u0000"  # where the input goes in the rendered prompt


def user_message(instruction: str | None, text: str) -> str:
    """The user turn: instruction + a blank line + input, or the input alone."""
    return f"{instruction}\n\n{text}" if instruction and instruction.strip() else text


def render_prompt(tokenizer: Any, message: str) -> tuple[str, bool]:
    """The prompt text, and whether the tokenizer must still add its special tokens (no chat template)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        return str(rendered), False
    return message + "\n", True


def prompt_ids(tokenizer: Any, example: Example, budget: int) -> list[int]:
    """The prompt's token ids, at most `budget` of them, cutting the input from its left when too long."""
    text = "\n".join(example.texts)
    rendered, special = render_prompt(tokenizer, user_message(example.instruction, text))
    ids: list[int] = tokenizer(rendered, add_special_tokens=special)["input_ids"]
    if len(ids) <= budget:
        return ids
    template, _ = render_prompt(tokenizer, user_message(example.instruction, INPUT_MARK))
    before, _, after = template.partition(INPUT_MARK)
    head: list[int] = tokenizer(before, add_special_tokens=special)["input_ids"]
    tail: list[int] = tokenizer(after, add_special_tokens=False)["input_ids"]
    body: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max(budget - len(head) - len(tail), 0)
    ids = head + body[len(body) - keep :] + tail if keep else head + tail
    return ids[len(ids) - budget :] if len(ids) > budget else ids  # even the template is too long: keep its end


def target_ids(tokenizer: Any, target: str) -> list[int]:
    """The target's token ids followed by the eos token (so the model learns to stop)."""
    ids: list[int] = tokenizer(target, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids + ([int(eos)] if eos is not None else [])


def encode_generation(
    examples: Sequence[Example], data: TaskData, tokenizer: Any, max_length: int, with_labels: bool = True
) -> list[Encoded]:
    """Prompt + target rows with next-token labels on the target only; without labels, the prompt alone."""
    out = []
    for example in examples:
        target = target_ids(tokenizer, str(example.label)) if with_labels and example.label is not None else []
        target = target[: max_length - 1]  # a target longer than the window keeps its start and one prompt token
        prompt = prompt_ids(tokenizer, example, max_length - len(target))
        ids = prompt + target
        label: list[int] | None = None
        if target:
            label = [IGNORE_INDEX] * len(ids)
            label[len(prompt) - 1 : len(ids) - 1] = target  # position i predicts token i + 1
        out.append(Encoded(ids, None, label, prompt_length=len(prompt)))
    return out


def encode_seq2seq(
    examples: Sequence[Example], data: TaskData, tokenizer: Any, max_length: int, with_labels: bool = True
) -> list[Encoded]:
    """The prompt (cut from its left when too long) as encoder input; target ids + eos as decoder labels,
    at most `max_length` of them."""
    out = []
    for example in examples:
        prompt = prompt_ids(tokenizer, example, max_length)
        label = None
        if with_labels and example.label is not None:
            label = target_ids(tokenizer, str(example.label))[:max_length]
        out.append(Encoded(prompt, None, label, prompt_length=len(prompt), aligned=False))
    return out
