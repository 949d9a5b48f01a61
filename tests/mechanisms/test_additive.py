"""The ``additive`` mechanism (medcausal.mechanisms.additive)."""

import torch

from medcausal.graph import Continuous
from medcausal.mechanisms.additive import AdditiveMechanism


def test_additive_fitted_on_one_row_has_a_finite_likelihood():
    m = AdditiveMechanism(Continuous(), parents=1, hidden=[4])
    m.finalize(torch.ones(1, 1), torch.zeros(1, 1))
    assert torch.isfinite(m.bandwidth).all()
    assert torch.isfinite(m.log_prob(torch.ones(1, 1), torch.zeros(1, 1))).all()
