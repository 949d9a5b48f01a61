"""Metrics: counterfactual error against ground truth, distribution distances, representations."""

from .counterfactual import CounterfactualError, counterfactual_mse
from .distribution import MMDResult, mmd

__all__ = ["CounterfactualError", "MMDResult", "counterfactual_mse", "mmd"]
