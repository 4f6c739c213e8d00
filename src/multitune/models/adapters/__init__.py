"""Per-task adapter methods, one per file; importing this package registers them all in ADAPTERS.

Adding a method: its own module here (a class doing what base.AdapterMethod lists, registered with the model
kinds it supports) and its import below.
"""

from multitune.models.adapters import bottleneck, lora, prefix, prompt
from multitune.models.adapters.base import ADAPTERS, BASE, FIELD, SHARED, AdapterMethod, Routing

__all__ = ["ADAPTERS", "BASE", "FIELD", "SHARED", "AdapterMethod", "Routing", "bottleneck", "lora", "prefix", "prompt"]
