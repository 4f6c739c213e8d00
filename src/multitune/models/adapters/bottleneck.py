"""`bottleneck`: a Houlsby-style bottleneck adapter (Houlsby et al., ICML 2019, "Parameter-efficient transfer
learning for NLP") after every transformer layer, h + W_up·GELU(W_down·h), one per task (peft has no
bottleneck adapter); each run of rows of one task goes through its own task's adapters.

The adapters are not a peft method: they live in the run's weights only (nothing under adapters/), and
export cannot fold them into the backbone's weights.

Adding another method: a module like this one in this package, a class that does what `AdapterMethod`
(base.py) lists, registered with `@ADAPTERS.register(name, capabilities=Capabilities(model_kinds=...))`,
and its import in the package's __init__.py. Its settings are its constructor's keyword arguments, filled
from the `model.peft` group of the same names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from multitune.errors import ConfigError
from multitune.models.adapters.base import ADAPTERS, FIELD, SHARED, Routing
from multitune.registry import Capabilities


# encoders and causal LMs: the adapters follow `encoder.layer` or `layers`; a seq2seq model (T5, BART) keeps
# its encoder's and decoder's blocks apart, under other names. Not on a sharded backbone (FSDP) yet.
@ADAPTERS.register(
    "bottleneck", capabilities=Capabilities(model_kinds=frozenset({"encoder", "causal_lm"}), sharded=False)
)
class BottleneckAdapters:
    """Houlsby bottleneck adapters after every transformer layer, one set per task (multitune's own)."""

    inside_backbone = False  # TaskAdapters owns them (`bottlenecks`); hooks on the layers apply them
    merges = False

    def __init__(self, bottleneck_size: int) -> None:
        self.size = bottleneck_size
        self.bottlenecks = nn.ModuleDict()
        self.routing = Routing(shared=False)

    def attach(self, backbone: nn.Module, names: list[str], routing: Routing) -> dict[str, nn.Module]:
        self.routing = routing
        body = getattr(backbone, "base_model", backbone)  # a causal LM keeps its layers in its body
        layers = getattr(getattr(body, "encoder", None), "layer", None) or getattr(body, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(
                "bottleneck adapters need a backbone with encoder.layer or layers", field=f"{FIELD}.method"
            )
        hidden = int(backbone.config.hidden_size)  # type: ignore[union-attr,arg-type]
        for name in names:
            self.bottlenecks[name] = nn.ModuleList(Bottleneck(hidden, self.size) for _ in layers)
        for index, layer in enumerate(layers):
            layer.register_forward_hook(LayerHook(self, index))
        return {"bottlenecks": self.bottlenecks}

    def apply(self, index: int, hidden: Tensor) -> Tensor:
        """Layer `index`'s output through the shared adapter (if any), then each row's own task's adapter."""
        if self.routing.shared:
            hidden = self.bottlenecks[SHARED][index](hidden)  # type: ignore[index]
        pieces = [self.bottlenecks[name][index](hidden[rows]) for name, rows in self.routing.runs]  # type: ignore[index]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.bottlenecks[name].parameters()

    def prompt_length(self, shared: bool) -> int:
        return 0

    def backbone_inputs(self, backbone: nn.Module, inputs: dict[str, Tensor], routing: Routing) -> dict[str, Tensor]:
        return dict(inputs)

    def saved_states(
        self, backbone: nn.Module, tasks: list[str], shared: bool
    ) -> tuple[dict[str, dict[str, Tensor]], Any]:
        return {}, None


class LayerHook:
    """The forward hook on layer `index`: an object rather than a closure, so that a deep copy of the model
    (one model per task when serving) applies the copy's adapters, not the original's."""

    def __init__(self, adapters: BottleneckAdapters, index: int) -> None:
        self.adapters, self.index = adapters, index

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if self.adapters.routing.rows is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = self.adapters.apply(self.index, hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


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
