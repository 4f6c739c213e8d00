"""Greedy decoding of rows that join and leave a running batch between steps: iteration-level scheduling
(Orca: Yu et al., "Orca: A Distributed Serving System for Transformer-Based Generative Models", OSDI 2022),
the scheduling behind continuous batching in vLLM and TGI.

A decoder-only LM's rows sit left-padded in one key/value cache. A row that joins is prefilled on its own
(with the other rows that join at that moment), then its cache is padded on the left to the batch's length
and appended; a row that ends leaves the cache at once, and cache positions that no row still uses are cut
from the left. Each row's positions count its own tokens only (from the attention mask), so padding moves
no row's positions and a row decodes as it would alone (up to the order of floating-point sums).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from multitune.models.causal_lm import CausalLMMultiTask, mask_positions

# generation_config settings with which transformers' greedy generate is not a plain argmax (logits
# processors, stopping criteria), each with the values that leave it so: a model that sets any of them to
# another value generates through generate itself
NOT_PLAIN_GREEDY: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "guidance_scale": (None, 1.0),
    **dict.fromkeys(
        (
            "bad_words_ids",
            "suppress_tokens",
            "begin_suppress_tokens",
            "forced_bos_token_id",
            "forced_eos_token_id",
            "sequence_bias",
            "exponential_decay_length_penalty",
            "watermarking_config",
            "stop_strings",
        ),
        (None, [], ()),
    ),
}


def can_join(model: Any) -> bool:
    """Whether rows can join `model`'s running batch: a decoder-only LM whose per-task adapters, if any, sit
    inside the backbone (LoRA: routed per row), and whose generation config asks for plain greedy decoding
    (none of NOT_PLAIN_GREEDY set). A prefix or prompt lives in front of the cache, and an encoder-decoder
    decodes from its encoder's states: those generate a batch at a time."""
    if not isinstance(model, CausalLMMultiTask) or not model.left_padded:
        return False
    adapters = model.task_adapters
    return (adapters is None or adapters.inside_backbone) and plain_greedy(model.backbone)


def plain_greedy(backbone: Any) -> bool:
    """Whether the backbone's generation config leaves greedy decoding a plain argmax."""
    config = getattr(backbone, "generation_config", None)
    return config is None or all(getattr(config, f, None) in plain for f, plain in NOT_PLAIN_GREEDY.items())


class JoiningBatch:
    """The running batch of one model: `join` prefills new rows (their first new token back), `step` gives
    every row's next token, `leave` keeps some rows. Tensors: the cache's keys and values [B, heads, T, d],
    the attention mask [B, T] (1 where a row has a token), each row's next input token [B].

    A cache whose layers are not all plain (a sliding window, a recurrent state) cannot be merged: rows join
    such a batch only while it is empty (`open`)."""

    def __init__(self, model: CausalLMMultiTask, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = next(model.backbone.parameters()).device
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.next = torch.zeros(0, dtype=torch.long, device=self.device)
        self.tasks: list[str | None] = []
        self._mergeable = True
        forward = inspect.signature(model.backbone.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._cache_name = "cache" if "cache" in forward else "past_key_values"  # renamed in transformers 5

    @property
    def rows(self) -> int:
        return len(self.tasks)

    @property
    def open(self) -> bool:
        """Whether rows may join now."""
        return self._mergeable or not self.tasks

    @torch.inference_mode()
    def join(self, prompts: Sequence[Sequence[int]], tasks: Sequence[str | None]) -> Tensor:
        """Prefill `prompts` (each through its task's adapter; None: no adapter) and append them to the batch.
        Returns their first new tokens [N]. Raises ValueError when the batch is not `open`; whatever it raises
        (out of memory...), the batch is left as it was."""
        if not self.open:
            raise ValueError("this model's cache cannot be merged: rows join only an empty batch")
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, length - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[i, length - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits, cache = self._forward(ids, mask, None, list(tasks))
        first = logits.argmax(-1)
        if not self.tasks:
            self.cache, self.mask, self.next = cache, mask, first
        else:  # built aside, then put in place: nothing below can fail half-way
            states = _merged(self.cache, cache, self.mask.shape[1], length)
            merged_mask = torch.cat([_left_padded(self.mask, length), _left_padded(mask, self.mask.shape[1])])
            merged_next = torch.cat([self.next, first])
            for layer, (keys, values) in zip(self.cache.layers, states, strict=True):
                layer.keys, layer.values = keys, values
            self.mask, self.next = merged_mask, merged_next
        self.tasks += list(tasks)
        self._mergeable = self._mergeable and _plain(self.cache)
        return first

    @torch.inference_mode()
    def step(self) -> Tensor:
        """Feed each row its next token; every row's following token [B]."""
        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.device)], dim=1)
        logits, self.cache = self._forward(self.next[:, None], mask, self.cache, self.tasks)
        self.mask, self.next = mask, logits.argmax(-1)
        return self.next

    def leave(self, keep: Sequence[int]) -> None:
        """Keep only rows `keep` (indices, in order); cut the cache positions no kept row uses."""
        if len(keep) == self.rows:
            return
        self.tasks = [self.tasks[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.next = None, self.mask[:0, :0], self.next[:0]
            return
        index = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        self.mask, self.next = self.mask[index], self.next[index]
        self.cache.batch_select_indices(index)
        unused = int(self.mask.any(0).long().argmax())  # leading positions that are padding in every row
        if unused and self._mergeable:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]

    def _forward(self, ids: Tensor, mask: Tensor, cache: Any, tasks: list[str | None]) -> tuple[Tensor, Any]:
        """The logits at each row's last position [B, V] and the cache after `ids`."""
        positions = mask_positions(mask, ids.shape[1])
        adapters = self.model.task_adapters
        routed = adapters is not None and all(task is not None for task in tasks)
        routing = adapters.route(tasks) if routed and adapters is not None else contextlib.nullcontext()  # type: ignore[arg-type]
        with routing:
            output = self.model.backbone(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_name: cache},
                **self._keep_last,
            )
        return output.logits[:, -1], output.past_key_values


def _left_padded(mask: Tensor, length: int) -> Tensor:
    """`mask` [B, T] with zeros in front up to `length` columns."""
    return torch.nn.functional.pad(mask, (max(length - mask.shape[1], 0), 0))


def _plain(cache: Any) -> bool:
    """Whether every layer of the cache is a plain growing one (keys and values of every position)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return layers is not None and all(type(layer) is DynamicLayer for layer in layers)


def _merged(cache: Any, new: Any, length: int, new_length: int) -> list[tuple[Tensor, Tensor]]:
    """Each layer's keys and values of `cache` (its rows `length` positions long) with `new`'s rows appended,
    both padded on the left to the longer length; new tensors, the caches unchanged."""
    target = max(length, new_length)

    def padded(states: Tensor, size: int) -> Tensor:
        return torch.nn.functional.pad(states, (0, 0, target - size, 0))

    return [
        (
            torch.cat([padded(layer.keys, length), padded(other.keys, new_length)]),
            torch.cat([padded(layer.values, length), padded(other.values, new_length)]),
        )
        for layer, other in zip(cache.layers, new.layers, strict=True)
    ]
