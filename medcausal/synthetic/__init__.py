"""Ground-truth simulators whose counterfactuals are known."""

from .tabular import TabularSCM, scm, scm_names

__all__ = ["BrainMRI", "TabularSCM", "scm", "scm_names"]

from .brain import BrainMRI  # noqa: E402
