"""Mechanisms registered by name: ``register`` a class, ``get`` it back.

>>> from medcausal.mechanisms import registry
>>> registry.get("flow").abduction
'exact'
>>> registry.default_for("binary")
'categorical'
"""

from __future__ import annotations

from ..errors import MedCausalError

_REGISTRY: dict[str, type] = {}
_DEFAULTS = {"continuous": "flow", "binary": "categorical", "categorical": "categorical",
             "image": "hvae", "expression": "fcr"}


def register(cls: type) -> type:
    """Class decorator: make a mechanism available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type:
    if name not in _REGISTRY:
        raise MedCausalError(f"unknown mechanism {name!r}; available: {available()}")
    return _REGISTRY[name]


def available() -> list[str]:
    return sorted(_REGISTRY)


def default_for(kind: str) -> str:
    """The default mechanism name for a variable kind."""
    if kind not in _DEFAULTS:
        raise MedCausalError(f"no default mechanism for variables of kind {kind!r}")
    return _DEFAULTS[kind]
