"""medcausal.interventions: parsing --do values and aligning per-row interventions to the rows."""

import numpy as np
import pandas as pd
import pytest

import medcausal as mc
from medcausal.errors import InterventionError
from medcausal.interventions import parse_cli_do


def test_cli_do_refuses_a_variable_given_twice():
    with pytest.raises(InterventionError, match="'age' more than once"):
        parse_cli_do(["age=80", "age=90"])
    with pytest.raises(InterventionError, match="var=value"):
        parse_cli_do(["=80"])


def test_cli_do_keeps_a_category_written_like_a_number():
    """``--do grade=01`` names the category "01" (it used to become 1.0, an unseen category)."""
    import medcausal as mc
    from medcausal.interventions import parse_cli_do

    rng = np.random.default_rng(0)
    grade = rng.choice(["01", "02"], 200)
    df = pd.DataFrame({"grade": grade, "y": (grade == "02") + rng.normal(0, 0.1, 200)})
    g = mc.CausalGraph({"grade": "categorical", "y": "continuous"}, edges=[("grade", "y")])
    model = mc.CausalModel(g).fit(df, seed=0, max_epochs=2)
    do = parse_cli_do(["grade=01"], model.graph.variables)
    assert do == {"grade": "01"}
    assert (model.sample(5, do=do, seed=0)["grade"] == "01").all()
    assert parse_cli_do(["y=01"], model.graph.variables) == {"y": 1.0}  # continuous: a number


def test_a_series_intervention_means_the_same_to_the_model_and_to_every_simulator():
    """The model aligned a pd.Series by its index and the simulators by position."""
    sim = mc.synthetic.scm("chain", additive=True)
    model = mc.CausalModel(sim.graph, mechanisms="additive").fit(sim.sample(300, seed=0), max_epochs=2,
                                                                  verbose=False)
    obs = sim.sample(3, seed=1)
    target = (obs["x1"] + 1.0).iloc[::-1]  # each unit's own value, listed in another order
    expected = (obs["x1"] + 1.0).to_numpy()
    np.testing.assert_allclose(sim.counterfactual(obs, do={"x1": target})["x1"], expected)
    np.testing.assert_allclose(model.counterfactual(obs, do={"x1": target})["x1"], expected)
    brain = mc.synthetic.BrainMRI(shape=(16, 16))
    c = brain.sample(3, seed=0)
    ages = pd.Series([50.0, 60.0, 70.0])[::-1]
    assert brain.counterfactual(c, do={"age": ages}).table["age"].tolist() == [50.0, 60.0, 70.0]
    cells = mc.synthetic.PerturbSeq(n_genes=10, seed=0).sample(3, seed=0)
    labels = pd.Series(["P0", "P1", "P2"], index=cells.obs_names)[::-1]
    cf = mc.synthetic.PerturbSeq(n_genes=10, seed=0).counterfactual(cells, do={"perturbation": labels})
    assert cf.obs["perturbation"].astype(str).tolist() == ["P0", "P1", "P2"]
    with pytest.raises(InterventionError, match="index"):
        sim.counterfactual(obs, do={"x1": pd.Series([1.0, 2.0, 3.0], index=[7, 8, 9])})
