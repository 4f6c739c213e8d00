"""multitune: fine-tune one pretrained model on several tasks at once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from multitune.api import FittedModel, Task, fit
    from multitune.config import EarlyStopping

__all__ = ["EarlyStopping", "FittedModel", "Task", "fit"]


def __getattr__(name: str) -> Any:
    """The Python API (api/), imported on first use: the CLI starts without loading torch."""
    if name in ("FittedModel", "Task", "fit"):
        from multitune import api

        return getattr(api, name)
    if name == "EarlyStopping":
        from multitune.config import EarlyStopping

        return EarlyStopping
    raise AttributeError(f"module 'multitune' has no attribute {name!r}")
