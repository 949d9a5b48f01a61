"""Metrics: counterfactual error against ground truth, distribution distances, images, representations.

- tabular: :func:`counterfactual_mse`, :func:`mmd`;
- images (:mod:`.images`): axiomatic soundness (:func:`composition`, :func:`reversibility`,
  :func:`effectiveness` with :class:`AntiCausalPredictor`), ground truth
  (:func:`true_counterfactual_error`, :func:`oracle_effectiveness`), realism
  (:func:`feature_frechet_distance`);
- single cells: :mod:`.singlecell`; representations (MCC, DCI, ...): :mod:`.representation`.
"""

from . import images, representation, singlecell  # noqa: F401
from .counterfactual import CounterfactualError, counterfactual_mse
from .distribution import MMDResult, mmd
from .images import (composition, counterfactual_latent_divergence, effectiveness, feature_frechet_distance, oracle_effectiveness,
                     reversibility, true_counterfactual_error)
from .predictors import AntiCausalPredictor

__all__ = ["CounterfactualError", "MMDResult", "counterfactual_mse", "mmd", "composition", "reversibility",
           "effectiveness", "true_counterfactual_error", "oracle_effectiveness", "feature_frechet_distance",
           "AntiCausalPredictor", "counterfactual_latent_divergence", "images", "representation", "singlecell"]
