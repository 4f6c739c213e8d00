"""`lora`: peft's LoRA layers and weights, one adapter per task (plus an optional `shared` one that every
row uses).

peft routes each row of a batch to its own adapter only at inference (its `adapter_names` argument is
refused in training mode), one small matmul pair per adapter. We route in training and in evaluation alike:
a forward pre-hook tells each LoRA layer to compute only its frozen base projection, and a forward hook adds
every row's own adapter update, gathered from the stacked task adapters and applied with two batched
matmuls, so a step costs about the same whatever the number of tasks in it.

Each task's adapter is saved in peft's own format (`adapter_config.json` + `adapter_model.safetensors`), so
`PeftModel.from_pretrained(base_model, RUN_DIR/adapters/TASK)` loads it with plain peft, and export merges
it into the backbone's weights with peft.

Adding another method: a module like this one in this package, a class that does what `AdapterMethod`
(base.py) lists, registered with `@ADAPTERS.register(name, capabilities=Capabilities(model_kinds=...))`,
and its import in the package's __init__.py. Its settings are its constructor's keyword arguments, filled
from the `model.peft` group of the same names.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from multitune.errors import ConfigError
from multitune.models.adapters.base import ADAPTERS, BASE, FIELD, SHARED, Routing
from multitune.registry import Capabilities


# every model kind; not on a sharded backbone (FSDP) yet
@ADAPTERS.register(
    "lora",
    capabilities=Capabilities(model_kinds=frozenset({"encoder", "causal_lm", "seq2seq", "vision"}), sharded=False),
)
class LoRA:
    """LoRA through peft: a low-rank update of the chosen projections per task; exports merged."""

    inside_backbone = True  # peft injects lora_A / lora_B into the backbone's own layers
    merges = True

    def __init__(self, r: int, alpha: int, dropout: float, target_modules: list[str] | None) -> None:
        self.r, self.alpha, self.dropout, self.target_modules = r, alpha, dropout, target_modules
        self.config: Any = None
        self.lora_layers: list[Any] = []
        self.routing = Routing(shared=False)

    def attach(self, backbone: nn.Module, names: list[str], routing: Routing) -> dict[str, nn.Module]:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        self.routing = routing
        self.config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules
        )
        if self.target_modules is None:
            self.config.target_modules = attention_targets(backbone) or self.config.target_modules
        try:
            for name in names:
                with warnings.catch_warnings():  # peft warns that a second adapter is added: that is the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    inject_adapter_in_model(self.config, backbone, adapter_name=name)
        except ValueError as error:
            raise ConfigError(f"cannot add LoRA adapters: {error}", field=f"{FIELD}.target_modules") from None
        self.lora_layers = [m for m in backbone.modules() if isinstance(m, LoraLayer)]
        for layer in self.lora_layers:
            layer.register_forward_pre_hook(self._route, with_kwargs=True)
            layer.register_forward_hook(self._add_updates)
        return {}

    def _route(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # peft's layer computes only the frozen base projection ("__base__" rows); _add_updates adds the routed
        # rows' adapters. Outside `route` too: peft would otherwise add its active adapter (the last injected,
        # e.g. the shared one), and the model outside `route` is the pretrained one (Routing's contract)
        x = args[0] if args else kwargs.get("x", kwargs.get("input"))
        rows = x.shape[0] if isinstance(x, Tensor) else len(self.routing.rows or [])
        kwargs["adapter_names"] = [BASE] * rows
        return args, kwargs

    def _add_updates(self, module: Any, args: tuple[Any, ...], output: Tensor) -> Tensor:
        """output + scaling_t · B_t A_t x for each row's task t, batched over rows: the per-row adapter
        matrices are gathered from the stacked task adapters, then two batched matmuls (as S-LoRA and
        Punica serve many LoRAs), so the cost does not grow with the number of tasks in the batch."""
        if self.routing.rows is None:
            return output
        x = args[0]
        runs = self.routing.runs
        if self.routing.shared:
            output = output + _lora_update(module, SHARED, x)
        if len(runs) == 1:
            return output + _lora_update(module, runs[0][0], x).to(output.dtype)
        names = [name for name, _ in runs]
        a = torch.stack([module.lora_A[n].weight for n in names])  # [R, r, in]
        b = torch.stack([module.lora_B[n].weight for n in names])  # [R, out, r]
        scale = torch.tensor([module.scaling[n] for n in names], dtype=a.dtype, device=a.device)
        run_of_row = _per_input_row(self.routing.run_of_row.to(x.device), x.shape[0])
        flat = module.lora_dropout[names[0]](x.to(a.dtype)).reshape(x.shape[0], -1, x.shape[-1])  # [B, L, in]
        down = torch.bmm(flat, a[run_of_row].transpose(1, 2))  # [B, L, r]
        up = torch.bmm(down, b[run_of_row].transpose(1, 2)) * scale[run_of_row, None, None]  # [B, L, out]
        return output + up.reshape(output.shape).to(output.dtype)

    def adopt(self, backbone: nn.Module, name: str, source: LoRA) -> None:
        """Adapter `name` of another model's LoRA layers (`source`: the same backbone, target modules and rank)
        added to this backbone's layers, its weights copied, routed like the others from now on: a task of
        another run served on this model for the cost of its adapter. Raises ValueError when the layers do not
        correspond."""
        from peft import inject_adapter_in_model

        if len(source.lora_layers) != len(self.lora_layers):
            raise ValueError(f"{len(source.lora_layers)} LoRA layers, not {len(self.lora_layers)}")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(self.config, backbone, adapter_name=name)
        with torch.no_grad():
            for mine, theirs in zip(self.lora_layers, source.lora_layers, strict=True):
                mine.lora_A[name].weight.copy_(theirs.lora_A[name].weight)
                mine.lora_B[name].weight.copy_(theirs.lora_B[name].weight)
                mine.scaling[name] = theirs.scaling[name]
                mine.train(mine.training)  # the new adapter's dropout in its layer's mode (peft builds it training)

    def drop(self, name: str) -> None:
        """Remove adapter `name` from every layer (its weights are let go)."""
        for layer in self.lora_layers:
            layer.delete_adapter(name)

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for layer in self.lora_layers:
            yield from layer.lora_A[name].parameters()
            yield from layer.lora_B[name].parameters()

    def prompt_length(self, shared: bool) -> int:
        return 0

    def backbone_inputs(self, backbone: nn.Module, inputs: dict[str, Tensor], routing: Routing) -> dict[str, Tensor]:
        return dict(inputs)

    def saved_states(
        self, backbone: nn.Module, tasks: list[str], shared: bool
    ) -> tuple[dict[str, dict[str, Tensor]], Any]:
        """Every adapter, the shared one included, keyed as peft's PeftModel keys them."""
        from peft.utils import get_peft_model_state_dict

        states = {}
        for name in tasks + ([SHARED] if shared else []):
            state = get_peft_model_state_dict(backbone, adapter_name=name)
            states[name] = {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()}
        return states, self.config


def _lora_update(module: Any, name: str, x: Tensor) -> Tensor:
    a, b = module.lora_A[name], module.lora_B[name]
    return b(a(module.lora_dropout[name](x.to(a.weight.dtype)))) * module.scaling[name]  # type: ignore[no-any-return]


def _per_input_row(run_of_row: Tensor, rows: int) -> Tensor:
    """Each input row's run, where a layer sees several rows per example: Swin's windowed attention runs on
    [B · windows, ...], each example's windows one after another (window partitioning keeps the batch dimension
    outermost), so every example's run repeats once per window. Raises ValueError for any other layout."""
    examples = run_of_row.shape[0]
    if rows == examples:
        return run_of_row
    if rows % examples:
        raise ValueError(f"a LoRA layer saw {rows} rows for a batch of {examples}: its rows cannot be routed to tasks")
    return run_of_row.repeat_interleave(rows // examples)


# the query and value projections under the names transformers gives them (BERT and older ViTs; ViT, DeiT
# and Llama-style models): LoRA's own choice (Hu et al. 2021, section 7.1)
ATTENTION_PAIRS = (("query", "value"), ("q_proj", "v_proj"))


def attention_targets(backbone: nn.Module) -> set[str] | None:
    """LoRA's targets for a model type peft has no default for (a ViT): its query and value projections,
    found by name; None when peft has a default or no such pair exists (peft then says what to set)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if getattr(getattr(backbone, "config", None), "model_type", None) in DEFAULTS:
        return None
    names = {name.rsplit(".", 1)[-1] for name, _ in backbone.named_modules()}
    return next((set(pair) for pair in ATTENTION_PAIRS if set(pair) <= names), None)
