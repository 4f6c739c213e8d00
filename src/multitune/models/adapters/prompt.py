"""`prompt`: prompt tuning (Lester et al., EMNLP 2021, "The power of scale for parameter-efficient prompt
tuning") with peft's PromptEmbedding: `virtual_tokens` learned input vectors per task (initialised from
sampled vocabulary embeddings) put in front of each row's own tokens; with a shared prompt, the shared vectors
come first. The features of the virtual positions are dropped, so heads see the real tokens. As in peft,
token type ids are not passed with prompts.

Each task's prompt is saved in peft's format with the shared prompt in front, so plain peft reproduces it
exactly; a prompt is not a change of weights, so export cannot fold it into the backbone.

Adding another method: a module like this one in this package, a class that does what `AdapterMethod`
(base.py) lists, registered with `@ADAPTERS.register(name, capabilities=Capabilities(model_kinds=...))`,
and its import in the package's __init__.py. Its settings are its constructor's keyword arguments, filled
from the `model.peft` group of the same names.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from multitune.models.adapters.base import ADAPTERS, SHARED, Routing
from multitune.registry import Capabilities


# encoders only: the prompt goes in front of the inputs where MultiTaskModel runs an encoder; the causal and
# seq2seq LM paths (training loss, generation) call the backbone on the tokens themselves. Not on a sharded
# backbone (FSDP) yet.
@ADAPTERS.register("prompt", capabilities=Capabilities(model_kinds=frozenset({"encoder"}), sharded=False))
class PromptTuning:
    """Prompt tuning through peft: `virtual_tokens` learned input vectors per task in front of the tokens."""

    inside_backbone = False  # TaskAdapters owns the prompts (`prompts`)
    merges = False

    def __init__(self, virtual_tokens: int = 20) -> None:
        self.virtual_tokens = virtual_tokens
        self.config: Any = None
        self.prompts = nn.ModuleDict()

    def attach(self, backbone: nn.Module, names: list[str], routing: Routing) -> dict[str, nn.Module]:
        from peft import PromptEmbedding, PromptTuningConfig

        config: Any = backbone.config
        self.config = PromptTuningConfig(
            task_type="FEATURE_EXTRACTION",
            num_virtual_tokens=self.virtual_tokens,
            token_dim=int(config.hidden_size),
            num_transformer_submodules=1,
            num_attention_heads=int(config.num_attention_heads),
            num_layers=int(config.num_hidden_layers),
            prompt_tuning_init="SAMPLE_VOCAB",
        )
        words = backbone.get_input_embeddings()  # type: ignore[operator]
        for name in names:
            self.prompts[name] = PromptEmbedding(self.config, words)
        return {"prompts": self.prompts}

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.prompts[name].parameters()

    def prompt_length(self, shared: bool) -> int:
        return self.virtual_tokens * (2 if shared else 1)

    def backbone_inputs(self, backbone: nn.Module, inputs: dict[str, Tensor], routing: Routing) -> dict[str, Tensor]:
        """Each row's prompt in front of its token embeddings (the shared prompt first)."""
        assert routing.rows is not None
        ids = torch.arange(self.virtual_tokens, device=inputs["input_ids"].device)
        embeds = backbone.get_input_embeddings()(inputs["input_ids"])  # type: ignore[operator]
        pieces = [self.prompts[name](ids).expand(r.stop - r.start, -1, -1) for name, r in routing.runs]
        prompt = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # [B, n, H]
        if routing.shared:
            prompt = torch.cat([self.prompts[SHARED](ids).expand(prompt.shape[0], -1, -1), prompt], dim=1)
        mask = inputs["attention_mask"]
        prefix = torch.ones(mask.shape[0], prompt.shape[1], dtype=mask.dtype, device=mask.device)
        return {
            "inputs_embeds": torch.cat([prompt.to(embeds.dtype), embeds], dim=1),
            "attention_mask": torch.cat([prefix, mask], dim=1),
        }

    def saved_states(
        self, backbone: nn.Module, tasks: list[str], shared: bool
    ) -> tuple[dict[str, dict[str, Tensor]], Any]:
        """Each task's prompt with the shared one in front, and a config of that combined length."""
        ids = torch.arange(self.virtual_tokens, device=next(self.prompts.parameters()).device)
        front = [self.prompts[SHARED](ids)] if shared else []
        states = {name: {"prompt_embeddings": torch.cat([*front, self.prompts[name](ids)]).detach()} for name in tasks}
        config = copy.deepcopy(self.config)
        config.num_virtual_tokens = self.prompt_length(shared)
        return states, config
