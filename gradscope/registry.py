"""Name -> entry registries, shared by every zoo module (cells, activations, inits, tasks, probes).

Adding a cell or a task is one function and one ``@REGISTRY.register(...)`` line; ``gradscope
list`` prints every registry that is created here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")

# Every registry that exists, by kind, in creation order (what `gradscope list` prints).
ALL: dict[str, Registry] = {}


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str  # what users type
    value: T  # the factory, function or spec behind the name
    help: str  # one line for `gradscope list` and error messages


class Registry(Generic[T]):
    """An ordered name -> value table whose lookups fail with a user-facing ConfigError."""

    def __init__(self, kind: str, option: str) -> None:
        self.kind = kind  # e.g. "cell": used in messages
        self.option = option  # e.g. "--cell": the flag that selects an entry
        self._entries: dict[str, Entry[T]] = {}
        ALL[kind] = self

    def register(self, name: str, help: str) -> Callable[[T], T]:
        def add(value: T) -> T:
            self.add(name, value, help)
            return value

        return add

    def add(self, name: str, value: T, help: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, value, help)

    def get(self, name: str, option: str | None = None) -> T:
        """The entry called ``name``; ``option`` names the flag in the error (default: own)."""
        try:
            return self._entries[name].value
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r} for {option or self.option}; choose from: "
                + ", ".join(self._entries)
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())
