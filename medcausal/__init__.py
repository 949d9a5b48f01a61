"""medcausal: causal generative models for biomedicine.

A causal model is a typed DAG plus one mechanism per variable:

>>> import medcausal as mc
>>> graph = mc.CausalGraph({"age": "continuous", "bp": "continuous"}, edges=[("age", "bp")])
>>> model = mc.CausalModel(graph)
"""

__version__ = "0.1.0"

from . import errors, interventions, mechanisms, metrics, synthetic  # noqa: E402
from .cohort import Cohort  # noqa: E402
from .errors import MedCausalError  # noqa: E402
from .graph import Binary, Categorical, CausalGraph, Continuous, Expression, Image  # noqa: E402
from .model import CausalModel  # noqa: E402
from .privacy import Privacy  # noqa: E402
from .simulate import (ImageClassifier, augment, counterfactual_patients, evaluate_augmentation,  # noqa: E402
                       simulate)

__all__ = ["CausalGraph", "CausalModel", "Cohort", "Continuous", "Binary", "Categorical", "Image",
           "Expression", "Privacy", "MedCausalError", "errors", "interventions", "mechanisms", "metrics",
           "synthetic", "simulate", "ImageClassifier", "counterfactual_patients", "augment", "evaluate_augmentation",
           "__version__"]
