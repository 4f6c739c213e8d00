"""MultiTaskModel: one backbone forward for every task's rows, an optional per-task stage, one head per task.

Hard parameter sharing is this class as is. The other architectures (models/architectures.py) change one
of three hooks: `encode` (what the shared representation is), `task_features` (what each task does with
its rows of it before its head), `regularizers` (penalties on the weights, e.g. soft sharing's pull).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager

from torch import Tensor, nn

from multitune.data.collate import Batch
from multitune.models.heads import Head
from multitune.models.peft_tasks import SHARED, TaskAdapters
from multitune.models.regularization import Regularizer
from multitune.models.vision import PIXELS, image_features


def pool(hidden: Tensor, mask: Tensor, how: str) -> Tensor:
    """[B, L, H] -> [B, H]: the first token, or the mean over real (unpadded) tokens."""
    if how == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MultiTaskModel(nn.Module):
    architecture = "hard"
    # each task's features are the backbone's own hidden states (no per-task layers, experts or backbones between
    # them and the head), so one task is the plain backbone plus its head: what export can write. An architecture
    # that changes `encode` or `task_features` away from the backbone's own output sets it False.
    backbone_features = True

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], pooling: str = "mean") -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.pooling = pooling
        self.task_adapters: TaskAdapters | None = None

    def attach_adapters(self, adapters: TaskAdapters) -> None:
        """Per-task adapters inside the backbone (models/peft_tasks.py): every forward routes rows to them."""
        self.task_adapters = adapters

    def encode(self, batch: Batch) -> Tensor:
        """The shared representation of every row: [B, L, H]."""
        return self.run_backbone(self.backbone, batch)

    def run_backbone(self, module: nn.Module, batch: Batch) -> Tensor:
        """`module`'s last hidden states for the batch, with per-task adapters routed (and per-task prompts
        put in front of the tokens, their positions dropped again from the output)."""
        adapters = self.task_adapters
        with self.routed(batch):
            if adapters is None or PIXELS in batch.inputs:  # no prompt goes in front of an image
                return self.hidden_states(module, batch.inputs)
            hidden = module(**adapters.prompted_inputs(module, batch.inputs)).last_hidden_state
            return hidden[:, adapters.prompt_length() :]  # type: ignore[no-any-return]

    def hidden_states(self, module: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        """`module`'s features of a batch's inputs: its last hidden states [B, L, H], or for images one
        pooled feature per image [B, 1, H] (models/vision.py)."""
        if PIXELS in inputs:
            return image_features(module(pixel_values=inputs[PIXELS]), self.pooling)
        return module(**inputs).last_hidden_state  # type: ignore[no-any-return]

    def routed(self, batch: Batch) -> AbstractContextManager[None]:
        if self.task_adapters is None:
            return contextlib.nullcontext()
        return self.task_adapters.route([name for name, part in batch.tasks.items() for _ in _range(part.rows)])

    def task_features(self, name: str, hidden: Tensor, mask: Tensor) -> Tensor:
        """Task `name`'s features [b, L, H] from its rows of the shared representation (identity here)."""
        return hidden

    def head_outputs(self, hidden: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Each task's head outputs for its rows of the batch."""
        outputs = {}
        mask = batch.inputs["attention_mask"]
        for name, part in batch.tasks.items():
            head = self.heads[name]
            rows_mask = mask[part.rows]
            features = self.task_features(name, hidden[part.rows], rows_mask)
            outputs[name] = head(features if head.level == "token" else pool(features, rows_mask, self.pooling))
        return outputs

    def head_losses(self, hidden: Tensor, batch: Batch) -> dict[str, Tensor]:
        """{task: scalar loss} for the tasks in the batch."""
        outputs = self.head_outputs(hidden, batch)
        losses = {}
        for name, part in batch.tasks.items():
            assert part.labels is not None, f"batch for task '{name}' has no labels"
            head: Head = self.heads[name]  # type: ignore[assignment]
            losses[name] = head.loss(outputs[name], part.labels)
        return losses

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return self.head_outputs(self.encode(batch), batch)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        return self.head_losses(self.encode(batch), batch)

    def regularizers(self) -> list[Regularizer]:
        """Penalties the architecture itself adds to every step (soft sharing's pull between backbones)."""
        return []

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss depends on: what gradient aggregation balances."""
        adapters = self.task_adapters
        own = {id(p) for name in adapters.tasks for p in adapters.adapter_parameters(name)} if adapters else set()
        yield from (p for p in self.backbone.parameters() if id(p) not in own)
        if adapters is not None and adapters.shared and not adapters.inside_backbone:  # else: among the backbone's
            yield from adapters.adapter_parameters(SHARED)
        yield from self.extra_shared_parameters()

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that start from the pretrained checkpoint (what L2-SP pulls back toward)."""
        adapters = self.task_adapters
        new = {id(p) for p in adapters.parameters()} if adapters else set()
        if adapters is not None and adapters.inside_backbone:
            names = [*adapters.tasks, *([SHARED] if adapters.shared else [])]
            new |= {id(p) for name in names for p in adapters.adapter_parameters(name)}
        return (p for p in self.backbone.parameters() if id(p) not in new)

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Parameters only task `name` uses."""
        yield from self.heads[name].parameters()
        if self.task_adapters is not None:
            yield from self.task_adapters.adapter_parameters(name)
        yield from self.extra_task_parameters(name)

    def extra_shared_parameters(self) -> Iterator[nn.Parameter]:
        """An architecture's shared parameters outside the backbone (experts, gates of shared paths)."""
        return iter(())

    def extra_task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """An architecture's parameters of task `name` outside its head (towers, gates)."""
        return iter(())


def _range(rows: slice) -> range:
    return range(rows.start or 0, rows.stop)
