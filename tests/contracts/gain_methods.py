"""Adapter methods that exist only in the tests: a per-task gain on the last layer's output, registered under
names no code compares with, to show that a method added by registration alone works."""

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from multitune.models.adapters import SHARED, Routing

# the adapter settings (model.peft's) the contract tests build every method with: small and dropout-free
SETTINGS = {
    "r": 4,
    "alpha": 8,
    "dropout": 0.0,
    "target_modules": None,
    "train_backbone": False,
    "bottleneck_size": 8,
    "virtual_tokens": 3,
    "prefix_projection": False,
}


class Gain:
    """Its weights live in TaskAdapters (as bottleneck adapters' do); each starts at `initial`."""

    inside_backbone = False
    merges = False
    initial = 1.0

    def __init__(self) -> None:
        self.routing = Routing(shared=False)
        self.gains = nn.ParameterDict()

    def attach(self, backbone: nn.Module, names: list[str], routing: Routing) -> dict[str, nn.Module]:
        self.routing = routing
        layer = backbone.encoder.layer[-1]  # type: ignore[union-attr,index]
        for name in names:
            self.gains[name] = nn.Parameter(torch.tensor(self.initial))
        layer.register_forward_hook(self.hook)
        if self.inside_backbone:
            layer.gains = self.gains  # a child of the backbone's layer: among backbone.parameters()
            return {}
        return {"gains": self.gains}

    def hook(self, module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple:
        if self.routing.rows is None:
            return output
        scale = torch.stack([self.gains[name] for name in self.routing.rows])[:, None, None]
        if self.routing.shared:
            scale = scale * self.gains[SHARED]
        return (output[0] * scale, *output[1:]) if isinstance(output, tuple) else output * scale

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield self.gains[name]

    def prompt_length(self, shared: bool) -> int:
        return 0

    def backbone_inputs(self, backbone: nn.Module, inputs: dict[str, Tensor], routing: Routing) -> dict[str, Tensor]:
        return dict(inputs)

    def saved_states(self, backbone: nn.Module, tasks: list[str], shared: bool) -> tuple[dict, None]:
        return {}, None


class InsideGain(Gain):
    """Its weights live in the backbone's own last layer (as LoRA's live in the backbone's projections)."""

    inside_backbone = True
    initial = 1.5
