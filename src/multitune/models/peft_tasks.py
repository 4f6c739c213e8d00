"""One parameter-efficient adapter per task on a frozen backbone, trained jointly, mixed batches included.

The methods (lora, prompt, bottleneck) live in models/adapters/, one module each, registered in ADAPTERS
with the model kinds they support; TaskAdapters looks `method` up there and does what every method shares:
it keeps the task names, routes each row of a batch to its task's adapter, freezes (or not) the backbone's
own weights and writes the adapters peft can load under RUN_DIR/adapters/TASK.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from multitune.errors import ConfigError
from multitune.models.adapters import ADAPTERS, FIELD, SHARED, AdapterMethod, Routing

__all__ = ["SHARED", "TaskAdapters"]


class TaskAdapters(nn.Module):
    """Per-task adapters inside `backbone`, and the routing of batch rows to them."""

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Sequence[str],
        method: str,
        shared: bool = False,
        train_backbone: bool = False,
        **settings: Any,
    ) -> None:
        """`settings`: the `model.peft` group's other values (r, alpha, virtual_tokens, ...); each method
        takes those its constructor names, so a method's new setting needs only its field in the group."""
        super().__init__()
        if SHARED in tasks:
            raise ConfigError(f"a task may not be called '{SHARED}' when per-task adapters are on", field=FIELD)
        self.method, self.tasks, self.shared = method, list(tasks), shared
        ADAPTERS.get(method, field=f"{FIELD}.method")
        self.adapter_method: AdapterMethod = ADAPTERS.build(method, injected=settings, field=FIELD)
        self.routing = Routing(shared=shared)
        names = self.tasks + ([SHARED] if shared else [])
        for attribute, module in self.adapter_method.attach(backbone, names, self.routing).items():
            self.add_module(attribute, module)
        for p in backbone.parameters():  # after the adapters: peft's injection leaves only its own trainable
            p.requires_grad_(train_backbone)
        for name in names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(True)

    @property
    def inside_backbone(self) -> bool:
        """The adapters' weights are among the backbone's own parameters (LoRA), not this module's."""
        return self.adapter_method.inside_backbone

    @property
    def merges(self) -> bool:
        """Export can fold a task's adapter into the backbone's weights."""
        return self.adapter_method.merges

    @property
    def lora_layers(self) -> list[Any]:
        """peft's LoRA layers in the backbone, where each task's lora_A and lora_B live (method lora only)."""
        return self.adapter_method.lora_layers  # type: ignore[attr-defined,no-any-return]

    def prompt_length(self) -> int:
        """Positions put in front of each row's tokens (virtual tokens), to be dropped from the output."""
        return self.adapter_method.prompt_length(self.shared)

    def prompted_inputs(self, backbone: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The backbone's keyword arguments for the routed batch (with prompts: each row's prompt in front of
        its token embeddings)."""
        return self.adapter_method.backbone_inputs(backbone, inputs, self.routing)

    def decoder_cache(self, device: torch.device) -> Any:
        """An encoder-decoder LM's decoder cache holding the routed rows' prefixes (prefix tuning), or None
        for a method that puts nothing there."""
        build = getattr(self.adapter_method, "decoder_cache", None)
        return build(self.routing, device) if build is not None else None

    @contextlib.contextmanager
    def route(self, row_tasks: list[str]) -> Iterator[None]:
        """Within this block, row i of every backbone forward uses task row_tasks[i]'s adapter."""
        routing = self.routing
        previous = routing.rows, routing.runs, routing.run_of_row
        routing.rows, routing.runs = row_tasks, _runs(row_tasks)
        sizes = torch.tensor([rows.stop - rows.start for _, rows in routing.runs])
        routing.run_of_row = torch.repeat_interleave(torch.arange(len(routing.runs)), sizes)
        try:
            yield
        finally:
            routing.rows, routing.runs, routing.run_of_row = previous

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return self.adapter_method.adapter_parameters(name)

    def can_adopt(self, other: TaskAdapters) -> str | None:
        """None when `other`'s task adapters can join these (`adopt`): both LoRA, no shared adapter (it would
        apply to every row of both), the same rank, scaling and adapted layers; else why not."""
        from multitune.models.adapters.lora import LoRA

        mine, theirs = self.adapter_method, other.adapter_method
        if not isinstance(mine, LoRA) or not isinstance(theirs, LoRA):
            return "only LoRA adapters join another model's"
        if self.shared or other.shared:
            return "a shared adapter applies to every row"
        if (mine.r, mine.alpha) != (theirs.r, theirs.alpha) or len(mine.lora_layers) != len(theirs.lora_layers):
            return "another rank, alpha or set of adapted layers"
        return None

    def adopt(self, backbone: nn.Module, name: str, other: TaskAdapters) -> None:
        """Task `name`'s adapter from `other` (see can_adopt) added to this backbone, routed from now on."""
        self.adapter_method.adopt(backbone, name, other.adapter_method)  # type: ignore[attr-defined]
        self.tasks.append(name)

    def drop(self, name: str) -> None:
        """Remove task `name`'s adapter (one adopted from another model)."""
        self.adapter_method.drop(name)  # type: ignore[attr-defined]
        self.tasks.remove(name)

    def save(self, backbone: nn.Module, folder: Path) -> list[Path]:
        """Each adapter in peft's format under folder/NAME, loadable with `PeftModel.from_pretrained` (LoRA
        and prompts; bottleneck adapters are not a peft method and live in the run's weights only)."""
        from safetensors.torch import save_file

        from multitune.core.files import atomic_write

        states, config = self.adapter_method.saved_states(backbone, self.tasks, self.shared)
        out = []
        for name, state in states.items():
            target = folder / name
            target.mkdir(parents=True, exist_ok=True)
            atomic_write(target / "adapter_model.safetensors", lambda tmp, s=state: save_file(s, str(tmp)))  # type: ignore[misc]
            config.save_pretrained(str(target))
            out.append(target)
        return out


def _runs(names: list[str]) -> list[tuple[str, slice]]:
    """Consecutive rows of the same task: [("a", 0:3), ("b", 3:5)] (batches group rows by task)."""
    out: list[tuple[str, slice]] = []
    start = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[start]:
            out.append((names[start], slice(start, i)))
            start = i
    return out
