"""Generation tasks at evaluation: greedy decoding of left-padded prompts, in length-sorted batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import nn

from multitune.data.tasks import TaskData
from multitune.data.tokens import Encoded
from multitune.errors import ConfigError


@runtime_checkable
class TextGenerator(Protocol):
    """A model that continues token prompts with text (models/causal_lm.py's CausalLMMultiTask)."""

    def generate_texts(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, task: str | None = None
    ) -> list[str]: ...


def generate_predictions(
    model: nn.Module,
    task: TaskData,
    rows: Sequence[Encoded],
    batch_size: int,
    pad_id: int,
    advance: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One {"prediction": generated text} per row; a row's prompt is its ids before `prompt_length`.
    `advance(n)` is told of each batch of n rows done (a progress bar's update)."""
    generator = getattr(model, "module", model)  # a distributed wrapper holds the model as `.module`
    if not isinstance(generator, TextGenerator):
        raise ConfigError(
            f"task '{task.name}' is a generation task, and {type(generator).__name__} cannot generate",
            field="model.kind",
        )
    prompts = [row.input_ids[: row.prompt_length] if row.prompt_length is not None else row.input_ids for row in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))  # less padding per batch
    results: list[dict[str, Any]] = [{} for _ in rows]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        texts = generator.generate_texts([prompts[i] for i in chunk], task.config.max_new_tokens, pad_id, task.name)
        for i, text in zip(chunk, texts, strict=True):
            results[i] = {"prediction": text}
        if advance is not None:
            advance(len(chunk))
    return results
