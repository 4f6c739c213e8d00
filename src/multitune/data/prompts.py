"""Encode generation examples for a causal LM: chat-formatted prompt + target + eos, loss on the target only;
or for an encoder-decoder (seq2seq) LM: the prompt to the encoder, target + eos to the decoder.

`input_ids` = prompt ids + target ids; `label[i]` is the token to predict from position i (the targets
shifted by one for next-token prediction), IGNORE_INDEX on the prompt (and, after collation, on padding).
Over `max_length`, the input is cut from its left (its end, and the whole target, are kept).
The instruction, input and target are data text: only the chat template's markup and the tokenizer's own
bos / eos are control tokens (see `markup_ids`), so a row that spells '<|im_end|>' cannot end its turn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from multitune.data.tasks import Example, TaskData
from multitune.data.tokens import IGNORE_INDEX, Encoded, control_ids, text_ids
from multitune.errors import MultitunError

INPUT_MARK = "\u0000multitune-input\u0000"  # where the input goes in the rendered prompt
MESSAGE_MARK = "\u0000multitune-message\u0000"  # where the user turn's text goes in the rendered template

Part = tuple[str, bool]  # a stretch of the rendered prompt, and whether it is data text (else template markup)


def user_message(instruction: str | None, text: str) -> str:
    """The user turn: instruction + a blank line + input, or the input alone."""
    return f"{instruction}\n\n{text}" if instruction and instruction.strip() else text


def chat_frame(tokenizer: Any, content: str) -> tuple[str, str, str] | None:
    """The chat template's markup before the user turn's text, that text as rendered, and the markup after;
    None when the template does not render the text as one stretch (its markup cannot be told from it)."""
    render = tokenizer.apply_chat_template
    rendered = str(render([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False))
    marked = str(render([{"role": "user", "content": MESSAGE_MARK}], add_generation_prompt=True, tokenize=False))
    before, found, after = marked.partition(MESSAGE_MARK)
    fits = len(rendered) >= len(before) + len(after) and rendered.startswith(before) and rendered.endswith(after)
    if not found or not fits:
        return None
    return before, rendered[len(before) : len(rendered) - len(after)], after


def markup_ids(tokenizer: Any, parts: Sequence[Part]) -> list[int]:
    """Ids of the joined parts, where only markup may give control tokens: the joined string is tokenized
    as a whole (a clean row's ids are exactly the template's tokenization); a control token that comes
    (even in part) from data text is re-encoded as text, between the markup's own control tokens."""
    if not getattr(tokenizer, "is_fast", False):  # no offsets: split the markup at its control tokens' spellings
        return _split_markup_ids(tokenizer, parts)
    whole = "".join(text for text, _ in parts)
    spans, at = [], 0
    for text, is_text in parts:
        if is_text:
            spans.append((at, at + len(text)))
        at += len(text)
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    controls = control_ids(tokenizer)
    pairs = zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    found = [(int(i), a, b) for i, (a, b) in pairs if i in controls]

    def from_text(a: int, b: int) -> bool:  # whitespace only: a marker that strips the text's spaces
        return any(whole[max(a, s) : min(b, e)].strip() for s, e in spans)

    if not any(from_text(a, b) for _, a, b in found):
        return list(encoded["input_ids"])
    ids: list[int] = []
    at = 0
    for token, a, b in found:
        if not from_text(a, b):
            ids += [*text_ids(tokenizer, whole[at:a]), token]
            at = b
    return ids + text_ids(tokenizer, whole[at:])


def _split_markup_ids(tokenizer: Any, parts: Sequence[Part]) -> list[int]:
    """markup_ids for a tokenizer without offsets: the stretches between the markup's control tokens are text."""
    names = sorted(tokenizer.convert_ids_to_tokens(sorted(control_ids(tokenizer))), key=len, reverse=True)
    pattern = re.compile("(" + "|".join(re.escape(n) for n in names if n) + ")" if any(names) else "(?!)")
    ids: list[int] = []
    run = ""
    for text, is_text in parts:
        pieces = [text] if is_text else pattern.split(text)
        for k, piece in enumerate(pieces):
            if k % 2:  # a control token of the markup
                ids += [*text_ids(tokenizer, run), int(tokenizer.convert_tokens_to_ids(piece))]
                run = ""
            else:
                run += piece
    return ids + text_ids(tokenizer, run)


def added_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (e.g. bos before, T5's eos after)."""
    bare = text_ids(tokenizer, "a")
    full = text_ids(tokenizer, "a", add_special_tokens=True)
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return full[:k], full[k + len(bare) :]
    return [], []


def spelled_control(tokenizer: Any, text: str) -> str | None:
    """The first control token spelled in `text`, if any."""
    names = tokenizer.convert_ids_to_tokens(sorted(control_ids(tokenizer)))
    return next((name for name in names if name and name in text), None)


def input_field(data: TaskData, index: int) -> str:
    """The name of the record field that holds an example's `index`-th input text."""
    if data.config.source.format == "unified":
        return "input"
    if data.config.source.format == "parallel":
        return "source"
    fields = [f for f in data.config.text_fields or [] if isinstance(f, str)]
    return fields[index] if index < len(fields) else "input"


def prompt_ids(tokenizer: Any, example: Example, budget: int, data: TaskData | None = None) -> list[int]:
    """The prompt's token ids, at most `budget` of them, cutting the input from its left when too long.
    The instruction and input are data text: they never give control tokens, only the template does."""
    text = "\n".join(example.texts)
    instruction = example.instruction if example.instruction and example.instruction.strip() else None
    message = user_message(instruction, text)
    if not getattr(tokenizer, "chat_template", None):  # plain text, with the tokenizer's own bos / eos
        ids = text_ids(tokenizer, message + "\n", add_special_tokens=True)
        if len(ids) <= budget:
            return ids
        first, last = added_around(tokenizer)
        head = first + (text_ids(tokenizer, f"{instruction}\n\n") if instruction else [])
        tail = text_ids(tokenizer, "\n") + last
        return _cut(head, text_ids(tokenizer, text), tail, budget)
    frame = chat_frame(tokenizer, message)
    if frame is None:  # the text cannot be told from the markup: refuse text that spells a control token
        _refuse_controls(tokenizer, example, data)
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
        )
        ids = markup_ids(tokenizer, [(str(rendered), False)])
        return ids[len(ids) - budget :] if len(ids) > budget else ids
    before, content, after = frame
    ids = markup_ids(tokenizer, [(before, False), (content, True), (after, False)])
    if len(ids) <= budget:
        return ids
    marked = chat_frame(tokenizer, user_message(instruction, INPUT_MARK))
    if marked is None or INPUT_MARK not in marked[1]:
        return ids[len(ids) - budget :]
    lead, _, trail = marked[1].partition(INPUT_MARK)
    head = markup_ids(tokenizer, [(marked[0], False), (lead, True)])
    tail = markup_ids(tokenizer, [(trail, True), (marked[2], False)])
    return _cut(head, text_ids(tokenizer, text), tail, budget)


def _refuse_controls(tokenizer: Any, example: Example, data: TaskData | None) -> None:
    """A DataError naming the first field of `example` whose text spells a control token."""
    fields = [(example.instruction or "", "instruction")]
    fields += [(text, input_field(data, i) if data is not None else "input") for i, text in enumerate(example.texts)]
    for text, field in fields:
        name = spelled_control(tokenizer, text)
        if name is not None:
            raise example.error(
                f"the text spells the control token {name!r}, and this backbone's chat template does not keep"
                " the text apart from its markup, so it cannot be encoded as text",
                field,
            )


def _cut(head: list[int], body: list[int], tail: list[int], budget: int) -> list[int]:
    """head + the end of body + tail in `budget` ids; when even head + tail do not fit, their end."""
    keep = max(budget - len(head) - len(tail), 0)
    ids = head + body[len(body) - keep :] + tail if keep else head + tail
    return ids[len(ids) - budget :] if len(ids) > budget else ids


def target_ids(tokenizer: Any, target: str) -> list[int]:
    """The target's token ids followed by the eos token (so the model learns to stop); a control token
    spelled in the target is text, so eos is the last id and the model can learn to write that spelling."""
    ids = text_ids(tokenizer, target)
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
        prompt = prompt_ids(tokenizer, example, max_length - len(target), data)
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
        prompt = prompt_ids(tokenizer, example, max_length, data)
        label = None
        if with_labels and example.label is not None:
            label = target_ids(tokenizer, str(example.label))[:max_length]
        out.append(Encoded(prompt, None, label, prompt_length=len(prompt), aligned=False))
    return out


def conversation_ids(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> list[int]:
    """A whole conversation ([(role, text), ...], OpenAI's roles) as the prompt of a model's next turn, for the
    pretrained model itself (no task's instruction or format): the tokenizer's chat template with its
    generation prompt, or, without a template, the texts one per line with the tokenizer's own bos / eos.
    The texts are data text, as in `prompt_ids`: a control token spelled in one never ends its turn. Raises
    MultitunError (field messages.I.content) for a text that spells a control token when the template does
    not keep the texts apart from its markup, and (field messages) for a template that refuses the
    conversation (e.g. roles out of order)."""
    if not getattr(tokenizer, "chat_template", None):
        return text_ids(tokenizer, "\n".join(text for _, text in messages) + "\n", add_special_tokens=True)
    turns = [{"role": "system" if role == "developer" else role, "content": text} for role, text in messages]
    marks = [f"{MESSAGE_MARK}{i}\u0000" for i in range(len(turns))]
    try:
        rendered = str(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
        marked = str(
            tokenizer.apply_chat_template(
                [{**turn, "content": mark} for turn, mark in zip(turns, marks, strict=True)],
                add_generation_prompt=True,
                tokenize=False,
            )
        )
    except Exception as error:  # jinja's TemplateError, or a template's own raise_exception
        raise MultitunError(f"the model's chat template refuses this conversation: {error}", field="messages") from None
    parts: list[Part] = []
    rest = marked
    for (_, text), mark in zip(messages, marks, strict=True):
        before, found, rest = rest.partition(mark)
        if not found:  # the template dropped or changed a turn: its texts cannot be told from its markup
            parts = []
            break
        parts += [(before, False), (text, True)]
    if parts and "".join(p for p, _ in parts) + rest == rendered:
        return markup_ids(tokenizer, [*parts, (rest, False)])
    for i, (_, text) in enumerate(messages):
        name = spelled_control(tokenizer, text)
        if name is not None:
            raise MultitunError(
                f"the text spells the control token {name!r}, and this model's chat template does not keep the"
                " text apart from its markup, so it cannot be encoded as text",
                field=f"messages.{i}.content",
            )
    return markup_ids(tokenizer, [(rendered, False)])
