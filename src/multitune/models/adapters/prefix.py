"""`prefix`: prefix tuning (Li & Liang, ACL 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation") with peft's PrefixEncoder: per task, `virtual_tokens` learned key and value vectors in front of
every attention layer's own keys and values, which every real token attends to; the tokens themselves are
unchanged (no positions are added to the output). With `prefix_projection` the prefixes are produced by a
two-layer MLP from smaller embeddings (the paper's reparametrization, which steadies training); without it
they are learned directly.

Rows of a mixed batch each get their own task's prefix: the prefixes of the batch's runs of rows are stacked
into one key/value cache of shape [B, heads, P, head_dim] per layer (the shared prefix first, when there is one)
and passed to the backbone as its cache, with the attention mask extended over the P prefix positions, as peft
passes a prefix. On a causal LM the same cache serves training and scoring, and generation continues it token by
token (CausalLMMultiTask.generate_texts). On an encoder-decoder LM (T5) the prefix is the decoder's, in its
self-attention, as peft places a seq2seq prefix; the encoder reads the tokens alone, and generation grows the
decoder's cache (Seq2SeqMultiTask). Each task's prefix is saved in peft's format (the encoder's output, as
peft saves a prefix), so `PeftModel.from_pretrained(base_model, RUN_DIR/adapters/TASK)` reproduces it; a prefix
is not a change of weights, so export cannot fold it into the backbone.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from multitune.models.adapters.base import ADAPTERS, SHARED, Routing
from multitune.registry import Capabilities


# encoders, causal LMs and encoder-decoder LMs (training, scoring and greedy generation through the prefix
# cache; an encoder-decoder's prefix is its decoder's self-attention cache, as peft places it). Not on a
# sharded backbone (FSDP) yet.
@ADAPTERS.register(
    "prefix", capabilities=Capabilities(model_kinds=frozenset({"encoder", "causal_lm", "seq2seq"}), sharded=False)
)
class PrefixTuning:
    """Prefix tuning through peft: `virtual_tokens` learned key/value vectors per task in every attention layer."""

    inside_backbone = False  # TaskAdapters owns the prefix encoders (`prefixes`)
    merges = False

    def __init__(self, virtual_tokens: int = 20, prefix_projection: bool = False) -> None:
        self.virtual_tokens, self.prefix_projection = virtual_tokens, prefix_projection
        self.config: Any = None
        self.prefixes = nn.ModuleDict()
        self.layers = self.heads = self.head_dim = 0

    def attach(self, backbone: nn.Module, names: list[str], routing: Routing) -> dict[str, nn.Module]:
        from peft import PrefixEncoder, PrefixTuningConfig

        config: Any = backbone.config
        hidden, attention_heads = int(config.hidden_size), int(config.num_attention_heads)
        # grouped-query attention keeps fewer key/value heads than query heads: the prefix has the former
        self.heads = int(getattr(config, "num_key_value_heads", None) or attention_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // attention_heads
        )
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        # an encoder-decoder's prefix is its decoder's: one per decoder layer
        decoder_layers = getattr(config, "num_decoder_layers", None) if self.encoder_decoder else None
        self.layers = int(decoder_layers or config.num_hidden_layers)
        output = getattr(backbone, "get_output_embeddings", None)
        causal = output is not None and output() is not None
        kind = "SEQ_2_SEQ_LM" if self.encoder_decoder else "CAUSAL_LM" if causal else "FEATURE_EXTRACTION"
        self.config = PrefixTuningConfig(
            task_type=kind,  # the PeftModel class that loads it
            num_virtual_tokens=self.virtual_tokens,
            token_dim=self.heads * self.head_dim,
            num_transformer_submodules=2 if self.encoder_decoder else 1,  # peft's layout for each kind
            num_attention_heads=self.heads,
            num_layers=self.layers,
            encoder_hidden_size=hidden,
            prefix_projection=self.prefix_projection,
        )
        for name in names:
            self.prefixes[name] = PrefixEncoder(self.config)
        return {"prefixes": self.prefixes}

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.prefixes[name].parameters()

    def prompt_length(self, shared: bool) -> int:
        return 0  # the prefix is in the keys and values, not among the positions the heads read

    def _prefix(self, name: str, device: torch.device) -> Tensor:
        """Task `name`'s prefix: [n, layers · 2 · kv_heads · head_dim] (keys and values of every layer)."""
        ids = torch.arange(self.virtual_tokens, device=device)[None]
        return self.prefixes[name](ids)[0]

    def backbone_inputs(self, backbone: nn.Module, inputs: dict[str, Tensor], routing: Routing) -> dict[str, Any]:
        """The inputs with each row's prefix as the backbone's key/value cache and the mask over it."""
        cache = self._cache(routing, inputs["input_ids"].device)
        mask = inputs["attention_mask"]
        ones = torch.ones(mask.shape[0], cache.get_seq_length(), dtype=mask.dtype, device=mask.device)
        return {**inputs, "attention_mask": torch.cat([ones, mask], dim=1), _cache_argument(backbone): cache}

    def decoder_cache(self, routing: Routing, device: torch.device) -> Any:
        """An encoder-decoder's cache for its decoder: the prefix in every decoder layer's self-attention and an
        empty cross-attention cache, which the model fills from the encoder states (as peft's get_prompt)."""
        from transformers import DynamicCache, EncoderDecoderCache

        # peft repeats the L key/value pairs for the cross-attention it then drops, and hands them out four
        # entries a layer: decoder layer i reads pair 2i mod L. The same pairs here, so a saved prefix gives
        # what PeftModel.from_pretrained gives
        order = [(2 * layer) % self.layers for layer in range(self.layers)]
        cache = EncoderDecoderCache(self._cache(routing, device, order), DynamicCache())
        for layer in list(cache.is_updated):
            cache.is_updated[layer] = False
        return cache

    def _cache(self, routing: Routing, device: torch.device, order: list[int] | None = None) -> Any:
        """The routed rows' prefixes (the shared one first, when there is one): a DynamicCache of P positions
        in every layer; `order[i]`: the key/value pair layer i reads (default: its own)."""
        from transformers import DynamicCache

        assert routing.rows is not None
        pieces = [self._prefix(name, device).expand(r.stop - r.start, -1, -1) for name, r in routing.runs]
        prefix = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # [B, n, layers·2·kv_heads·head_dim]
        if routing.shared:
            front = self._prefix(SHARED, device).expand(prefix.shape[0], -1, -1)
            prefix = torch.cat([front, prefix], dim=1)
        rows, length = prefix.shape[:2]
        # as peft lays a prefix out: [B, P, layers·2, heads, head_dim] -> [layers·2, B, heads, P, head_dim]
        keys_values = prefix.view(rows, length, 2 * self.layers, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cache = DynamicCache()
        for layer, pair in enumerate(order if order is not None else range(self.layers)):
            cache.update(keys_values[2 * pair], keys_values[2 * pair + 1], layer)
        return cache

    def saved_states(
        self, backbone: nn.Module, tasks: list[str], shared: bool
    ) -> tuple[dict[str, dict[str, Tensor]], Any]:
        """Each task's prefix (with the shared one in front) as peft saves a prefix: the encoder's output
        `prompt_embeddings` [P, layers · 2 · kv_heads · head_dim], and a config of that length."""
        device = next(self.prefixes.parameters()).device
        front = [self._prefix(SHARED, device)] if shared else []
        states = {
            name: {"prompt_embeddings": torch.cat([*front, self._prefix(name, device)]).detach()} for name in tasks
        }
        config = copy.deepcopy(self.config)
        config.num_virtual_tokens = self.virtual_tokens * (2 if shared else 1)
        return states, config


def _cache_argument(backbone: nn.Module) -> str:
    """The name under which the backbone's forward takes a key/value cache (transformers renamed it)."""
    parameters = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
