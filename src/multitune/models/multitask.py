"""MultiTaskModel: hard parameter sharing, one backbone forward for every task's rows, one head per task."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from multitune.data.collate import Batch
from multitune.models.heads import Head


def pool(hidden: Tensor, mask: Tensor, how: str) -> Tensor:
    """[B, L, H] -> [B, H]: the first token, or the mean over real (unpadded) tokens."""
    if how == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MultiTaskModel(nn.Module):
    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], pooling: str = "mean") -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.pooling = pooling

    def encode(self, batch: Batch) -> Tensor:
        """The shared representation of every row: [B, L, H]."""
        return self.backbone(**batch.inputs).last_hidden_state

    def head_outputs(self, hidden: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Each task's head outputs for its rows of the batch."""
        pooled: Tensor | None = None
        outputs = {}
        for name, part in batch.tasks.items():
            head = self.heads[name]
            if head.level == "token":
                outputs[name] = head(hidden[part.rows])
            else:
                if pooled is None:
                    pooled = pool(hidden, batch.inputs["attention_mask"], self.pooling)
                outputs[name] = head(pooled[part.rows])
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

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        return self.heads[name].parameters()
