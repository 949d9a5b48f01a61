"""Metrics: counterfactual error against ground truth, distribution distances, representations."""
