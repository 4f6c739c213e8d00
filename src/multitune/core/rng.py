"""torch's random state, saved in a checkpoint and restored by a resume or a micro-batch replay."""

from __future__ import annotations

from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    """torch's random state (and CUDA's, when available): what a checkpoint saves and a replay repeats."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
