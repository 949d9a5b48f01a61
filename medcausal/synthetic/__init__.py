"""Ground-truth simulators whose counterfactuals are known."""

from .tabular import TabularSCM, scm, scm_names

__all__ = ["BrainMRI", "PerturbSeq", "TabularSCM", "scm", "scm_names"]

from .brain import BrainMRI  # noqa: E402
from .perturbseq import PerturbSeq  # noqa: E402
