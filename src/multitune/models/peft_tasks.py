"""One parameter-efficient adapter per task on a frozen backbone, trained jointly, mixed batches included.

- `lora`: peft's LoRA layers and weights, one adapter per task (plus an optional `shared` one that every
  row uses). peft routes each row of a batch to its own adapter only at inference (its `adapter_names`
  argument is refused in training mode), one small matmul pair per adapter. We route in training and in
  evaluation alike: a forward pre-hook tells each LoRA layer to compute only its frozen base projection,
  and a forward hook adds every row's own adapter update, gathered from the stacked task adapters and
  applied with two batched matmuls, so a step costs about the same whatever the number of tasks in it.
- `prompt`: prompt tuning (Lester et al., EMNLP 2021, "The power of scale for parameter-efficient prompt
  tuning") with peft's PromptEmbedding, `virtual_tokens` learned input vectors per task (initialised from
  sampled vocabulary embeddings) put in front of each row's own tokens; with a shared prompt, the shared
  vectors come first. The features of the virtual positions are dropped, so heads see the real tokens.
  As in peft, token type ids are not passed with prompts.
- `bottleneck`: a Houlsby-style bottleneck adapter (Houlsby et al., ICML 2019, "Parameter-efficient
  transfer learning for NLP") after every transformer layer, h + W_up·GELU(W_down·h), one per task (peft
  has no bottleneck adapter); rows are routed the same way.

Each task's LoRA adapter is saved in peft's own format (`adapter_config.json` + `adapter_model.safetensors`)
so `PeftModel.from_pretrained(base_model, RUN_DIR/adapters/TASK)` loads it with plain peft.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from multitune.errors import ConfigError

SHARED = "shared"
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
FIELD = "model.peft"


class TaskAdapters(nn.Module):
    """Per-task adapters inside `backbone`, and the routing of batch rows to them."""

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Sequence[str],
        method: str,
        r: int,
        alpha: int,
        dropout: float,
        target_modules: list[str] | None,
        shared: bool,
        train_backbone: bool,
        bottleneck_size: int,
        virtual_tokens: int = 20,
    ) -> None:
        super().__init__()
        if SHARED in tasks:
            raise ConfigError(f"a task may not be called '{SHARED}' when per-task adapters are on", field=FIELD)
        self.method, self.tasks, self.shared = method, list(tasks), shared
        self.routing: list[str] | None = None  # the adapter of each row of the current batch
        self.runs: list[tuple[str, slice]] = []  # the same as runs of consecutive rows, derived once per batch
        self.run_of_row = torch.empty(0, dtype=torch.long)  # [B]: each row's index into `runs`
        self.base_names: list[str] = []  # what peft's LoRA layers are told: base projection only, per row
        self.lora_config: Any = None
        self.bottlenecks = nn.ModuleDict()
        names = self.tasks + ([SHARED] if shared else [])
        if method == "lora":
            self._inject_lora(backbone, names, r, alpha, dropout, target_modules)
        elif method == "bottleneck":
            self._add_bottlenecks(backbone, names, bottleneck_size)
        elif method == "prompt":
            self._add_prompts(backbone, names, virtual_tokens)
        else:
            raise ConfigError(
                f"unknown adapter method '{method}'; choose: bottleneck, lora, prompt", field=f"{FIELD}.method"
            )
        for p in backbone.parameters():  # after the adapters: peft's injection leaves only its own trainable
            p.requires_grad_(train_backbone)
        for name in names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(True)

    # --- LoRA through peft ----------------------------------------------------------------------

    def _inject_lora(
        self,
        backbone: nn.Module,
        names: list[str],
        r: int,
        alpha: int,
        dropout: float,
        target_modules: list[str] | None,
    ) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        self.lora_config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
        try:
            for name in names:
                with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    inject_adapter_in_model(self.lora_config, backbone, adapter_name=name)
        except ValueError as error:
            raise ConfigError(f"cannot add LoRA adapters: {error}", field=f"{FIELD}.target_modules") from None
        self.lora_layers = [m for m in backbone.modules() if isinstance(m, LoraLayer)]
        for layer in self.lora_layers:
            layer.register_forward_pre_hook(self._route_lora, with_kwargs=True)
            layer.register_forward_hook(self._lora_hook)

    def _route_lora(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # peft's layer computes only the frozen base projection ("__base__" rows); _lora_hook adds the adapters
        if self.routing is not None:
            kwargs["adapter_names"] = self.base_names
        return args, kwargs

    def _lora_hook(self, module: Any, args: tuple[Any, ...], output: Tensor) -> Tensor:
        """output + scaling_t · B_t A_t x for each row's task t, batched over rows: the per-row adapter
        matrices are gathered from the stacked task adapters, then two batched matmuls (as S-LoRA and
        Punica serve many LoRAs), so the cost does not grow with the number of tasks in the batch."""
        if self.routing is None:
            return output
        x = args[0]
        runs = self.runs
        if self.shared:
            output = output + _lora_update(module, SHARED, x)
        if len(runs) == 1:
            return output + _lora_update(module, runs[0][0], x).to(output.dtype)
        names = [name for name, _ in runs]
        a = torch.stack([module.lora_A[n].weight for n in names])  # [R, r, in]
        b = torch.stack([module.lora_B[n].weight for n in names])  # [R, out, r]
        scale = torch.tensor([module.scaling[n] for n in names], dtype=a.dtype, device=a.device)
        run_of_row = self.run_of_row.to(x.device)
        flat = module.lora_dropout[names[0]](x.to(a.dtype)).reshape(x.shape[0], -1, x.shape[-1])  # [B, L, in]
        down = torch.bmm(flat, a[run_of_row].transpose(1, 2))  # [B, L, r]
        up = torch.bmm(down, b[run_of_row].transpose(1, 2)) * scale[run_of_row, None, None]  # [B, L, out]
        return output + up.reshape(output.shape).to(output.dtype)

    # --- bottleneck adapters (ours) -------------------------------------------------------------

    def _add_bottlenecks(self, backbone: nn.Module, names: list[str], size: int) -> None:
        body = getattr(backbone, "base_model", backbone)  # a causal LM keeps its layers in its body
        layers = getattr(getattr(body, "encoder", None), "layer", None) or getattr(body, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(
                "bottleneck adapters need a backbone with encoder.layer or layers", field=f"{FIELD}.method"
            )
        hidden = int(backbone.config.hidden_size)  # type: ignore[union-attr,arg-type]
        for name in names:
            self.bottlenecks[name] = nn.ModuleList(Bottleneck(hidden, size) for _ in layers)
        for index, layer in enumerate(layers):
            layer.register_forward_hook(self._bottleneck_hook(index))

    def _bottleneck_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if self.routing is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = self._apply_bottlenecks(index, hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _apply_bottlenecks(self, index: int, hidden: Tensor) -> Tensor:
        assert self.routing is not None
        if self.shared:
            hidden = self.bottlenecks[SHARED][index](hidden)  # type: ignore[index]
        pieces = []
        for name, rows in self.runs:
            pieces.append(self.bottlenecks[name][index](hidden[rows]))  # type: ignore[index]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    # --- prompt tuning through peft's PromptEmbedding --------------------------------------------

    def _add_prompts(self, backbone: nn.Module, names: list[str], virtual_tokens: int) -> None:
        from peft import PromptEmbedding, PromptTuningConfig

        config: Any = backbone.config
        self.virtual_tokens = virtual_tokens
        self.prompt_config = PromptTuningConfig(
            task_type="FEATURE_EXTRACTION",
            num_virtual_tokens=virtual_tokens,
            token_dim=int(config.hidden_size),
            num_transformer_submodules=1,
            num_attention_heads=int(config.num_attention_heads),
            num_layers=int(config.num_hidden_layers),
            prompt_tuning_init="SAMPLE_VOCAB",
        )
        words = backbone.get_input_embeddings()  # type: ignore[operator]
        self.prompts = nn.ModuleDict({name: PromptEmbedding(self.prompt_config, words) for name in names})

    def prompt_length(self) -> int:
        return self.virtual_tokens * (2 if self.shared else 1) if self.method == "prompt" else 0

    def prompted_inputs(self, backbone: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The backbone's keyword arguments with each row's prompt in front of its token embeddings."""
        assert self.routing is not None
        ids = torch.arange(self.virtual_tokens, device=inputs["input_ids"].device)
        embeds = backbone.get_input_embeddings()(inputs["input_ids"])  # type: ignore[operator]
        pieces = [self.prompts[name](ids).expand(r.stop - r.start, -1, -1) for name, r in self.runs]
        prompt = torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # [B, n, H]
        if self.shared:
            prompt = torch.cat([self.prompts[SHARED](ids).expand(prompt.shape[0], -1, -1), prompt], dim=1)
        mask = inputs["attention_mask"]
        prefix = torch.ones(mask.shape[0], prompt.shape[1], dtype=mask.dtype, device=mask.device)
        return {
            "inputs_embeds": torch.cat([prompt.to(embeds.dtype), embeds], dim=1),
            "attention_mask": torch.cat([prefix, mask], dim=1),
        }

    # --- routing, parameters, saving ------------------------------------------------------------

    @contextlib.contextmanager
    def route(self, row_tasks: list[str]) -> Iterator[None]:
        """Within this block, row i of every backbone forward uses task row_tasks[i]'s adapter."""
        previous = self.routing, self.runs, self.run_of_row, self.base_names
        self.routing, self.runs = row_tasks, _runs(row_tasks)
        sizes = torch.tensor([rows.stop - rows.start for _, rows in self.runs])
        self.run_of_row = torch.repeat_interleave(torch.arange(len(self.runs)), sizes)
        self.base_names = [BASE] * len(row_tasks)
        try:
            yield
        finally:
            self.routing, self.runs, self.run_of_row, self.base_names = previous

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if self.method == "lora":
            for layer in self.lora_layers:
                yield from layer.lora_A[name].parameters()  # type: ignore[index]
                yield from layer.lora_B[name].parameters()  # type: ignore[index]
        elif self.method == "prompt":
            yield from self.prompts[name].parameters()
        else:
            yield from self.bottlenecks[name].parameters()

    def save(self, backbone: nn.Module, folder: Path) -> list[Path]:
        """Each adapter in peft's format under folder/NAME, loadable with `PeftModel.from_pretrained` (LoRA
        and prompts; bottleneck adapters are not a peft method and live in the run's weights only). A task's
        saved prompt includes the shared prompt in front, so plain peft reproduces it exactly."""
        from safetensors.torch import save_file

        from multitune.core.files import atomic_write

        states: dict[str, dict[str, Tensor]] = {}
        if self.method == "lora":
            from peft.utils import get_peft_model_state_dict

            for name in self.tasks + ([SHARED] if self.shared else []):
                state = get_peft_model_state_dict(backbone, adapter_name=name)
                states[name] = {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()}
            config = self.lora_config
        elif self.method == "prompt":
            import copy

            ids = torch.arange(self.virtual_tokens, device=next(self.prompts.parameters()).device)
            shared = [self.prompts[SHARED](ids)] if self.shared else []
            for name in self.tasks:
                states[name] = {"prompt_embeddings": torch.cat([*shared, self.prompts[name](ids)]).detach()}
            config = copy.deepcopy(self.prompt_config)
            config.num_virtual_tokens = self.prompt_length()
        out = []
        for name, state in states.items():
            target = folder / name
            target.mkdir(parents=True, exist_ok=True)
            atomic_write(target / "adapter_model.safetensors", lambda tmp, s=state: save_file(s, str(tmp)))  # type: ignore[misc]
            config.save_pretrained(str(target))
            out.append(target)
        return out


def _lora_update(module: Any, name: str, x: Tensor) -> Tensor:
    a, b = module.lora_A[name], module.lora_B[name]
    return b(a(module.lora_dropout[name](x.to(a.weight.dtype)))) * module.scaling[name]  # type: ignore[no-any-return]


class Bottleneck(nn.Module):
    """h + up(GELU(down(h))); `up` starts at zero, so the adapter starts as the identity."""

    def __init__(self, hidden: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.up(torch.nn.functional.gelu(self.down(hidden)))


def _runs(names: list[str]) -> list[tuple[str, slice]]:
    """Consecutive rows of the same task: [("a", 0:3), ("b", 3:5)] (batches group rows by task)."""
    out: list[tuple[str, slice]] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            out.append((names[start], slice(start, i)))
            start = i
    return out
