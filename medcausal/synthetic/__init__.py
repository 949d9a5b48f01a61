"""Ground-truth simulators whose counterfactuals are known."""
