"""GradDrop (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020).

Elementwise on the shared representation: P = ½(1 + Σgᵢ / Σ|gᵢ|) is the sign purity of each element;
with one uniform draw U per element, positive components are kept where P > U and negative ones where
P < U. Defined on activations, so only for the `representation` gradient source.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from multitune.balancing.gradients.base import GRADIENT_AGGREGATORS


@GRADIENT_AGGREGATORS.register("graddrop")
class GradDrop:
    """Keep each element's gradients of one sign, chosen with probability = sign purity (Chen et al. 2020)."""

    sources: tuple[str, ...] = ("representation",)
    paper = "Chen et al. 2020"
    cost = "elementwise over [T, P]"
    randomized = True

    def __init__(self, seed: int = 0, leak: float = 0.0) -> None:
        self.leak = leak
        self.generator = torch.Generator().manual_seed(seed)

    def aggregate(self, grads: Tensor, tasks: Sequence[str]) -> Tensor:
        purity = 0.5 * (1 + grads.sum(0) / (grads.abs().sum(0) + 1e-12))  # [P]
        draw = torch.rand(purity.shape, generator=self.generator).to(grads.device)
        keep = ((grads > 0) & (purity > draw)) | ((grads < 0) & (purity < draw))  # [T, P]
        mask = keep.to(grads.dtype) * (1 - self.leak) + self.leak
        return (grads * mask).sum(0)

    def state_dict(self) -> dict[str, object]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        generator_state = state["generator"]
        assert isinstance(generator_state, Tensor)
        self.generator.set_state(generator_state)
