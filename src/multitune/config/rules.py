"""The rules a valid config follows beyond its schema: usable numbers, and which choices combine. The
combination rules read the capabilities each method declares on its registry entry (registry.Capabilities),
given to them as a lookup, and never compare a method's name."""

from __future__ import annotations

import math
from typing import Any

from multitune.config.schema import Config
from multitune.errors import ConfigError

FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: the weights' dtype (bf16 shares its range)


INT64_MAX = 2**63 - 1  # torch's and numpy's widest integers


def check_numbers(value: Any, field: str) -> None:
    """Every number in a setting (method parameters too) is usable: a float is finite and within float32's
    range (the weights and losses it scales are float32, where a larger one is inf), an integer within int64.
    An inf learning rate would skip every update and still exit 0."""
    stack: list[tuple[str, Any]] = [(field, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, float) and not (math.isfinite(item) and abs(item) <= FLOAT32_MAX):
            raise ConfigError(f"must be a finite number within float32's range (±3.4e38), got {item!r}", field=path)
        if isinstance(item, int) and abs(item) > INT64_MAX:
            raise ConfigError(
                f"must be an integer within int64's range, got one of {len(str(abs(item)))} digits", field=path
            )
        children = (
            item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, (list, tuple)) else ()
        )
        stack.extend(reversed([(f"{path}.{key}" if path else str(key), child) for key, child in children]))


def check_speed_options(config: Config) -> None:
    """Packing and gradient accumulation: where they apply."""
    training = config.training
    if training.packing:
        not_generation = [name for name, task in config.tasks.items() if task.type != "generation"]
        if config.model.kind != "causal_lm" or not_generation:
            raise ConfigError(
                "packing puts several generation examples in one row of a causal LM; "
                + (
                    f"task '{not_generation[0]}' is a {config.tasks[not_generation[0]].type} task"
                    if not_generation
                    else f"this model is a {config.model.kind}"
                ),
                field="training.packing",
            )
        if config.model.peft is not None and not config.model.peft.shared:
            raise ConfigError(
                "per-task adapters route whole rows to one task; a packed row holds several tasks' examples",
                field="training.packing",
            )
        if training.pack_length is not None and training.pack_length < config.model.max_length:
            raise ConfigError(
                f"pack_length {training.pack_length} is shorter than model.max_length {config.model.max_length}",
                field="training.pack_length",
            )
    if training.gradient_accumulation > training.batch_size:
        raise ConfigError(
            f"gradient_accumulation {training.gradient_accumulation} splits a batch of {training.batch_size} rows "
            "into more parts than it has rows",
            field="training.gradient_accumulation",
        )
    gradient = config.gradient_aggregation
    if training.gradient_accumulation > 1 and gradient is not None and gradient.source == "parameters":
        raise ConfigError(
            "gradient accumulation splits the shared representation's backward; with the parameters source use "
            "a smaller batch, several processes, or the representation source",
            field="training.gradient_accumulation",
        )
