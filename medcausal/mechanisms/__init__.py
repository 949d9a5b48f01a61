"""Mechanisms: one file per family, all behind :mod:`medcausal.mechanisms.base`.

Importing this package registers every built-in mechanism by name.
"""

from . import registry
from .base import Mechanism
from .additive import AdditiveMechanism
from .categorical import CategoricalMechanism
from .diffusion import DiffusionMechanism
from .flow import FlowMechanism

__all__ = ["Mechanism", "registry", "AdditiveMechanism", "CategoricalMechanism", "DiffusionMechanism", "FlowMechanism"]
