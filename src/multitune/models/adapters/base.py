"""What every per-task adapter method provides (`AdapterMethod`), the registry that names them, and the
routing state their hooks read.

TaskAdapters (models/peft_tasks.py) owns what the methods share: the task names, routing rows to tasks,
freezing the backbone, saving files. A method owns what differs: how its adapters are built and attached
to the backbone, where their weights live, what it does to the backbone's inputs, what it saves in peft's
format, and whether export can fold it into the backbone's weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from multitune.registry import Registry

SHARED = "shared"
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
FIELD = "model.peft"


@dataclass
class Routing:
    """Which adapter each row of the current batch uses. TaskAdapters.route sets it for a block of code;
    the methods' hooks read it (one object, so a deep copy of the model keeps hooks and state together)."""

    shared: bool  # every row also goes through the shared adapter
    rows: list[str] | None = None  # each row's adapter; None: outside `route`, the adapters are off
    runs: list[tuple[str, slice]] = field(default_factory=list)  # runs of consecutive rows of one adapter
    run_of_row: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # [B]: index into runs


class AdapterMethod(Protocol):
    """One way to give each task its own small set of weights on a shared backbone."""

    inside_backbone: bool  # its weights live in the backbone's own modules (in backbone.parameters())
    merges: bool  # export can fold a task's adapter into the backbone's weights

    def attach(self, backbone: nn.Module, names: list[str], routing: Routing) -> dict[str, nn.Module]:
        """Add one adapter per name in `names` to `backbone`, routed by `routing`. Returns the modules
        TaskAdapters keeps as its own children (attribute name -> module): their names are the keys of
        the run's saved weights, so they never change once a method is released."""
        ...

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The weights of adapter `name`."""
        ...

    def prompt_length(self, shared: bool) -> int:
        """How many positions the method puts in front of each row's tokens (dropped from the output)."""
        ...

    def backbone_inputs(self, backbone: nn.Module, inputs: dict[str, Tensor], routing: Routing) -> dict[str, Tensor]:
        """The backbone's keyword arguments for a routed batch of `inputs`."""
        ...

    def saved_states(
        self, backbone: nn.Module, tasks: list[str], shared: bool
    ) -> tuple[dict[str, dict[str, Tensor]], Any]:
        """What `save` writes in peft's format: {folder name: state dict} and the peft config they share
        (({}, None) for a method that peft cannot load)."""
        ...


ADAPTERS: Registry[AdapterMethod] = Registry("adapter method")
