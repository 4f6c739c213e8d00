"""Task heads: features -> outputs, each with its own loss and its own decoding of outputs."""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitune.data.tokens import IGNORE_INDEX
from multitune.registry import Registry


@runtime_checkable
class Head(Protocol):
    """An nn.Module mapping backbone features to task outputs; `level` says which features it reads."""

    level: Literal["sequence", "token"]

    def __call__(self, features: Tensor) -> Tensor: ...

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor: ...


HEADS: Registry[nn.Module] = Registry("head")


@HEADS.register("classification")
@HEADS.register("pair_classification")
class ClassificationHead(nn.Module):
    """Pooled features [B, H] -> class logits [B, C]; cross-entropy."""

    level: Literal["sequence", "token"] = "sequence"

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, features: Tensor) -> Tensor:
        return self.out(self.dropout(features))

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(outputs.float(), labels)


@HEADS.register("regression")
class RegressionHead(nn.Module):
    """Pooled features [B, H] -> one standardised score [B]; mean squared error."""

    level: Literal["sequence", "token"] = "sequence"

    def __init__(self, hidden_size: int, num_labels: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.out(self.dropout(features)).squeeze(-1)

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return F.mse_loss(outputs.float(), labels.float())


@HEADS.register("token_classification")
class TokenClassificationHead(nn.Module):
    """Token features [B, L, H] -> tag logits [B, L, C]; cross-entropy on each word's first sub-token."""

    level: Literal["sequence", "token"] = "token"

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, features: Tensor) -> Tensor:
        return self.out(self.dropout(features))

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        if not torch.any(labels != IGNORE_INDEX):  # every word truncated away: no signal, zero loss
            return outputs.sum() * 0.0
        return F.cross_entropy(outputs.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
