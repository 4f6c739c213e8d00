"""Registry[T]: short config name -> factory, with parameter checks and a clear error on a typo."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from multitune.errors import ConfigError

T = TypeVar("T")

MODEL_KINDS = frozenset({"encoder", "causal_lm", "seq2seq", "vision"})


@dataclass(frozen=True)
class Capabilities:
    """What a registered method supports, declared where it is registered. The combination rules
    (config/rules.py) read these declarations and never compare a method's name.

    - `model_kinds`: the backbones it works on (model.kind: encoder, causal_lm, seq2seq, vision).
    - `shares_parameters`: (architectures) the tasks share trainable parameters, so per-task gradients of them
      exist (the `parameters` gradient source, task affinity and the negative-transfer guard need them).
    - `takes_adapters`: (architectures) per-task adapters may be attached to its backbone.
    - `sharded`: it works with the backbone sharded across processes (FSDP2).
    - `whole_gradients`: (gradient sources) it needs whole per-task gradients of the shared weights, so it
      cannot run on a sharded backbone nor split a batch into micro-batches.
    - `one_task_per_step`: (schedules) each step trains one task: no mixed batches, no gradient aggregation.
    - `writes_weights`: (schedules) it writes the weights outside the optimizer step (a meta-update, per-task
      copies), so not with a sharded backbone nor DeepSpeed ZeRO's partitioned optimizer.
    """

    model_kinds: frozenset[str] = MODEL_KINDS
    shares_parameters: bool = True
    takes_adapters: bool = True
    sharded: bool = True
    whole_gradients: bool = False
    one_task_per_step: bool = False
    writes_weights: bool = False


EVERYTHING = Capabilities()


class Registry(Generic[T]):
    """Names the implementations of one extension point (samplers, loss weightings, metrics, heads)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._capabilities: dict[str, Capabilities] = {}

    def register(
        self, name: str, capabilities: Capabilities = EVERYTHING
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Register a factory under `name`, with what it supports (by default: everything)."""

        def add(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = factory
            self._capabilities[name] = capabilities
            return factory

        return add

    def capabilities(self, name: str, *, field: str | None = None) -> Capabilities:
        """What `name` supports; ConfigError naming `field` for an unknown name."""
        self.get(name, field=field)
        return self._capabilities[name]

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str, *, field: str | None = None) -> Callable[..., T]:
        if name not in self._factories:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind} '{name}'{hint}; choose from: {', '.join(self.names())}", field=field
            )
        return self._factories[name]

    def parameters(self, name: str, injected: Iterable[str] = ()) -> dict[str, inspect.Parameter]:
        """The parameters a config may set for `name`: the factory's keyword arguments minus the injected."""
        skip = set(injected)
        signature = inspect.signature(self.get(name))
        return {
            p.name: p
            for p in signature.parameters.values()
            if p.name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    def check_params(
        self, name: str, params: dict[str, Any], injected: Iterable[str] = (), field: str | None = None
    ) -> None:
        accepted = self.parameters(name, injected)
        for key, value in params.items():
            where = f"{field}.{key}" if field else key
            if key not in accepted:
                listed = ", ".join(accepted) or "none"
                close = difflib.get_close_matches(key, list(accepted), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ConfigError(f"unknown parameter for {self.kind} '{name}' ({hint}accepted: {listed})", field=where)
            wanted = _number_kind(accepted[key].annotation)
            if wanted is not None and not _is_number(value, wanted, optional="None" in str(accepted[key].annotation)):
                raise ConfigError(f"{self.kind} '{name}' takes {wanted} here, got {value!r}", field=where)

    def build(
        self, name: str, /, *, injected: dict[str, Any] | None = None, field: str | None = None, **params: Any
    ) -> T:
        """Call the factory with the config's `params` and those `injected` values it declares; a value the
        factory rejects is a ConfigError naming `field` (the config group the parameters came from)."""
        injected = injected or {}
        self.check_params(name, params, injected, field=field)
        factory = self.get(name)
        accepted = inspect.signature(factory).parameters
        wanted = {key: value for key, value in injected.items() if key in accepted}
        try:
            return factory(**wanted, **params)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{self.kind} '{name}': {error}", field=field) from None

    def summaries(self) -> list[tuple[str, str]]:
        """(name, first docstring line) for `multitune list` and the README methods table."""
        out = []
        for name in self.names():
            doc = inspect.getdoc(self._factories[name]) or ""
            out.append((name, doc.splitlines()[0] if doc else ""))
        return out


def _number_kind(annotation: Any) -> str | None:
    """'a number' for a float parameter, 'an integer' for an int one (annotations are text here), else None."""
    text = str(annotation).replace(" ", "").replace("|None", "").replace("None|", "")
    return {"float": "a number", "int": "an integer", "<class'float'>": "a number", "<class'int'>": "an integer"}.get(
        text
    )


def _is_number(value: Any, kind: str, optional: bool) -> bool:
    if value is None:
        return optional
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == "an integer" else isinstance(value, (int, float))
