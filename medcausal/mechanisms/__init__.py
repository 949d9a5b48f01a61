"""Mechanisms: one file per family, all behind :mod:`medcausal.mechanisms.base`.

Importing this package registers every built-in mechanism by name.
"""

from . import registry
from .base import Mechanism
from .additive import AdditiveMechanism
from .categorical import CategoricalMechanism
from .cvae import CVAEMechanism
from .diffusion import DiffusionMechanism
from .fcr import FCRMechanism
from .flow import FlowMechanism
from .hvae import HVAEMechanism
from .image_diffusion import ImageDiffusionMechanism

__all__ = ["Mechanism", "registry", "AdditiveMechanism", "CategoricalMechanism", "CVAEMechanism",
           "DiffusionMechanism", "FCRMechanism", "FlowMechanism", "HVAEMechanism",
           "ImageDiffusionMechanism"]
