"""The ``categorical`` mechanism (medcausal.mechanisms.categorical)."""

import pytest
import torch

from medcausal.errors import MedCausalError
from medcausal.graph import Categorical
from medcausal.mechanisms.categorical import CategoricalMechanism


def test_bad_categorical_hidden_is_refused():
    with pytest.raises(MedCausalError, match="hidden"):
        CategoricalMechanism(Categorical(("a", "b")), parents=1, hidden=[0])


@pytest.mark.parametrize("index", [3.0, -1.0])
def test_categorical_value_outside_its_categories_is_refused(index):
    m = CategoricalMechanism(Categorical(("a", "b", "c")), parents=1)
    for verb in (m.log_prob, m.abduct):
        with pytest.raises(MedCausalError, match="categor"):
            verb(torch.tensor([[0.0], [index]]), torch.zeros(2, 1))


def test_the_base_rate_start_is_smoothed_for_a_declared_category_never_seen():
    m = CategoricalMechanism(Categorical(("I", "II", "III", "IV")), {})
    value = torch.tensor([[0.0]] * 60 + [[1.0]] * 35 + [[2.0]] * 5)
    m.start_from_data(value, torch.zeros(100, 0))
    p = m.logits(torch.zeros(1, 0)).exp()[0]
    torch.testing.assert_close(p, torch.tensor([60.5, 35.5, 5.5, 0.5]) / 102.0)
