"""Swappable parts by name: compression policies, attention backends.

A part registers itself when its module is imported (`Registry.register` as the decorator of a
class with a `name`). The registry imports its built-in modules on the first lookup, not when it
is itself imported, so the modules that register into it may import it without an import cycle.
Invariant: a name maps to exactly one entry; registering a name twice raises.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    """What a registry holds: anything with a `name` (a class with a `name` attribute)."""

    name: str


T = TypeVar("T", bound=Named)


class UnknownName(ValueError):
    """A lookup of a name nothing registered; the message lists the known names."""


class Registry(Generic[T]):
    def __init__(self, kind: str, builtins: tuple[str, ...] = ()) -> None:
        """`kind` names the parts in error messages; `builtins` are module paths imported on first lookup."""
        self.kind = kind
        self._builtins = builtins
        self._loaded = not builtins
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add `entry` under its `name`; usable as a class decorator. Raises ValueError on a taken name."""
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered ({self._entries[entry.name]!r})")
        self._entries[entry.name] = entry
        return entry

    def _load(self) -> None:
        if not self._loaded:
            for module in self._builtins:
                importlib.import_module(module)
            self._loaded = True

    def __getitem__(self, name: str) -> T:
        """The entry registered as `name`; raises UnknownName listing the known names."""
        if name not in self:
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs, sorted by name."""
        return [(name, self._entries[name]) for name in self.names()]
