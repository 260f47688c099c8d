"""Named units of one kind, registered by decorator: unlearning methods, evaluation suites, attributions.

    METHODS = Registry("unlearning method", package="jobs.unlearn.methods")

    @METHODS.register("npo")
    class NPO(Method): ...

    METHODS.get("npo")   # KeyError naming the known ones for an unknown name

With ``package``, every module of that package is imported on the first lookup, so a new unit is one new
file there and nothing else imports it by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: Optional[str] = None, skip: tuple[str, ...] = ()):
        self.kind = kind  # what one unit is called in messages ("unlearning method")
        self.package, self.skip = package, skip
        self._units: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the unit available as ``name``."""

        def deco(unit: T) -> T:
            self.add(name, unit)
            return unit

        return deco

    def add(self, name: str, unit: T) -> None:
        if self._units.get(name, unit) is not unit:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._units[name] = unit

    def get(self, name: str) -> T:
        """The unit registered as ``name``; ``KeyError`` naming the known ones otherwise."""
        self.load()
        try:
            return self._units[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        self.load()
        return sorted(self._units)

    def units(self) -> list[T]:
        """Every unit, in name order."""
        return [self._units[n] for n in self.names()]

    def load(self) -> None:
        """Import every module of ``package`` (each registers what it defines), once."""
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name not in self.skip and not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._units

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
