"""Ground-truth simulators whose counterfactuals are known."""

from .tabular import TabularSCM, scm, scm_names

__all__ = ["TabularSCM", "scm", "scm_names"]
