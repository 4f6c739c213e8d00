"""Registry[T]: short config name -> factory, with parameter checks and a clear error on a typo."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from multitune.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names the implementations of one extension point (samplers, loss weightings, metrics, heads)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = factory
            return factory

        return add

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
