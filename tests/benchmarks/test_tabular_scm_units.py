"""The unit-contribution diagnostic adds up to the tabular benchmark's CF MSE."""

import numpy as np
import pytest

import medcausal as mc
from medcausal.metrics import counterfactual_mse


@pytest.mark.parametrize("name", ["diamond", "vector"])
def test_contributions_sum_to_the_benchmarks_cf_mse(load_benchmark, name):
    units, bench = load_benchmark("tabular_scm_units"), load_benchmark("tabular_scm")
    sim = mc.synthetic.scm(name, additive=True)
    train, qs, factual, truth = bench.protocol_data(sim, n_train=300, n_units=20, n_values=2)
    rng = np.random.default_rng(0)
    # any prediction will do: the truth plus noise of a different size per query
    preds = [t + rng.normal(0, 0.1 * (i + 1), t.shape) for i, t in enumerate(truth)]
    c = units.contributions(sim, qs, factual, truth, preds, train)
    want = np.mean([float(counterfactual_mse(t, p, sim.graph, {v: x})) for t, p, (v, x) in zip(truth, preds, qs)])
    assert len(c) == len(qs) * 20
    assert c["contrib_x100"].sum() == pytest.approx(100 * want, rel=1e-9)
