"""Unlearning methods: one small file each, registered by name.

A method turns a batch (``{"forget": tensors, "retain": tensors or None}``) into a loss. It receives the
model being trained and, when it asks for one (``needs_reference``), a frozen reference model. The
training loop knows no method by name: it looks the name up here.
"""

from __future__ import annotations

from jobs.registry import Registry
from jobs.unlearn.methods.base import LossOutput, Method

METHODS: Registry[type[Method]] = Registry("unlearning method", package=__name__, skip=("base",))


def register(name: str):
    """Class decorator: make a Method available as ``unlearn.method: <name>``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def method_names() -> list[str]:
    return METHODS.names()


def build_method(name: str, params: dict | None = None) -> Method:
    """Instantiate a method with validated parameters (pydantic raises naming the bad field)."""
    cls = get_method(name)
    return cls(cls.Params(**(params or {})))


__all__ = ["LossOutput", "Method", "METHODS", "register", "get_method", "method_names", "build_method"]
