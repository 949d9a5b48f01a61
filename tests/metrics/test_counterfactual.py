"""counterfactual_mse: the DCM counterfactual score, with alignment checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from medcausal.errors import DataError, InterventionError
from medcausal.graph import CausalGraph, Continuous
from medcausal.metrics import CounterfactualError, counterfactual_mse
from medcausal.synthetic import scm

DIAMOND = CausalGraph({f"x{i}": "continuous" for i in range(1, 5)},
                      edges=[("x1", "x2"), ("x1", "x3"), ("x2", "x3"), ("x2", "x4"), ("x3", "x4")])


def _frames(n=4):
    idx = pd.Index([f"u{i}" for i in range(n)], name="unit")
    true = pd.DataFrame({f"x{i}": np.arange(n, dtype=float) * i for i in range(1, 5)}, index=idx)
    return true, true.copy()


def test_hand_computed_per_variable_and_mean():
    true, pred = _frames()
    pred["x1"] += 100.0               # ancestor: not scored
    pred["x2"] += 5.0                 # intervened: not scored
    pred["x3"] += [1.0, -1.0, 1.0, -1.0]       # MSE 1
    pred["x4"] += [0.0, 0.0, 0.0, 4.0]         # MSE 16 / 4 = 4
    err = counterfactual_mse(true, pred, DIAMOND, ["x2"])
    assert isinstance(err, CounterfactualError)
    assert err.variables == ("x3", "x4")
    assert err.per_variable == {"x3": 1.0, "x4": 4.0}
    assert err.mse == 2.5 and float(err) == 2.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        err.mse = 0.0  # type: ignore[misc]


def test_do_names_forms_and_nested_interventions():
    true, pred = _frames()
    pred["x4"] += 2.0
    for names in ("x2", ["x2"], {"x2": 1.0}, ("x2",)):
        assert float(counterfactual_mse(true, pred, DIAMOND, names)) == pytest.approx(2.0)
    # x1 and x3 intervened: x3 is fixed by the intervention, so only x2 and x4 count
    err = counterfactual_mse(true, pred, DIAMOND, {"x1": 0.0, "x3": 0.0})
    assert err.variables == ("x2", "x4") and err.per_variable == {"x2": 0.0, "x4": 4.0}


def test_vector_variable_uses_all_its_columns():
    g = CausalGraph({"a": "continuous", "z": Continuous(dim=2), "b": "binary"},
                    edges=[("a", "z"), ("a", "b")])
    true = pd.DataFrame({"a": [0.0, 0.0], "z[0]": [0.0, 0.0], "z[1]": [0.0, 0.0], "b": [0, 1]})
    pred = true.assign(**{"z[0]": [1.0, 1.0], "z[1]": [3.0, 3.0], "b": [0, 0]})
    err = counterfactual_mse(true, pred, g, "a")
    assert err.per_variable == {"z": 5.0, "b": 0.5}  # (1 + 9) / 2 over z's two columns
    assert float(err) == pytest.approx(2.75)


def test_rows_are_matched_by_unit_id():
    true, pred = _frames()
    pred["x3"] += [1.0, 2.0, 3.0, 4.0]
    shuffled = pred.iloc[[2, 0, 3, 1]]
    assert float(counterfactual_mse(true, shuffled, DIAMOND, "x2")) == \
        float(counterfactual_mse(true, pred, DIAMOND, "x2"))


def test_alignment_errors_name_the_problem():
    true, pred = _frames()
    with pytest.raises(DataError, match=r"pred_cf lacks column\(s\) \['x4'\]"):
        counterfactual_mse(true, pred.drop(columns="x4"), DIAMOND, "x2")
    with pytest.raises(DataError, match="4 rows but pred_cf has 3"):
        counterfactual_mse(true, pred.iloc[:3], DIAMOND, "x2")
    other = pred.rename(index={"u3": "v9"})
    with pytest.raises(DataError, match=r"different units.*u3.*v9"):
        counterfactual_mse(true, other, DIAMOND, "x2")
    with pytest.raises(DataError, match=r"missing or infinite values in column\(s\) \['x3'\]"):
        counterfactual_mse(true, pred.assign(x3=np.nan), DIAMOND, "x2")
    with pytest.raises(DataError, match="must be a pandas DataFrame"):
        counterfactual_mse(true.to_numpy(), pred, DIAMOND, "x2")
    with pytest.raises(InterventionError, match="unknown variable.*'x9'"):
        counterfactual_mse(true, pred, DIAMOND, ["x9"])
    with pytest.raises(InterventionError, match="no descendants"):
        counterfactual_mse(true, pred, DIAMOND, "x4")
    with pytest.raises(InterventionError, match="empty"):
        counterfactual_mse(true, pred, DIAMOND, [])
    g = CausalGraph({"a": "continuous", "c": "categorical"}, edges=[("a", "c")])
    with pytest.raises(DataError, match="descendants of \\['a'\\] are \\{'c': 'categorical'\\}"):
        counterfactual_mse(pd.DataFrame({"a": [0.0], "c": ["x"]}),
                           pd.DataFrame({"a": [0.0], "c": ["x"]}), g, "a")


def test_scores_the_scalar_descendants_of_a_graph_with_an_image():
    # age -> volume -> mri, age -> scanner: the squared error of volume; mri and scanner listed as not scored
    from medcausal import Cohort
    from medcausal.graph import Image

    g = CausalGraph({"age": "continuous", "volume": "continuous", "scanner": "categorical",
                     "mri": Image((1, 4, 4))},
                    edges=[("age", "volume"), ("volume", "mri"), ("age", "scanner")])
    table = pd.DataFrame({"id": ["p1", "p2"], "age": [80.0, 80.0], "volume": [1.0, 2.0], "scanner": ["A", "B"]})
    true = Cohort(table, {"mri": np.zeros((2, 1, 4, 4))})
    pred = Cohort(table.assign(volume=[1.0, 4.0]).iloc[::-1], {"mri": np.ones((2, 1, 4, 4))})  # other order
    err = counterfactual_mse(true, pred, g, {"age": 80.0})
    assert err.per_variable == {"volume": 2.0} and float(err) == 2.0
    assert err.skipped == ("scanner", "mri") and "not scored" in repr(err)


def test_against_a_ground_truth_simulator():
    sim = scm("diamond", additive=False)
    df = sim.sample(1000, seed=0)
    do = {"x2": 1.0}
    true_cf = sim.counterfactual(df, do)
    assert float(counterfactual_mse(true_cf, true_cf, sim.graph, do)) == 0.0
    # the factual data as a (bad) prediction: its error is the mean squared change
    err = counterfactual_mse(true_cf, df, sim.graph, do)
    for v in ("x3", "x4"):
        assert err.per_variable[v] == pytest.approx(((true_cf[v] - df[v]) ** 2).mean())
    assert err.mse > 0.1
