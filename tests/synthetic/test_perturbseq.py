"""The perturb-seq simulator: structure, exact count noise, true counterfactuals, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from medcausal.errors import DataError, InterventionError, MedCausalError
from medcausal.synthetic.perturbseq import PerturbSeq, nb_cdf, nb_quantile, parse_perturbation


@pytest.fixture(scope="module")
def sim():
    return PerturbSeq(n_genes=60, n_perturbations=4, combinations=["P0+P1", "P2+P3"], seed=3)


@pytest.fixture(scope="module")
def cells(sim):
    return sim.sample(600, seed=0)


def _dense(a, layer="counts"):
    return a.layers[layer].toarray()


# --------------------------------------------------------------------------- the NB quantile
def test_nb_quantile_matches_scipy_on_a_grid():
    rng = np.random.default_rng(0)
    mu = np.exp(rng.uniform(-5, 7, 20000))
    theta = np.exp(rng.uniform(-2, 4, 20000))
    u = rng.uniform(0, 1, 20000)
    u[:4] = [1e-12, 1 - 1e-9, 0.5, 1e-300]
    expect = stats.nbinom.ppf(u, theta, theta / (theta + mu))
    np.testing.assert_array_equal(nb_quantile(u, mu, theta), expect)


def test_nb_quantile_large_means_take_the_exact_cdf_path():
    u = np.array([0.1, 0.5, 0.9])
    mu, theta = np.array([5e4, 2e5, 1e6]), np.array([50.0, 80.0, 200.0])
    np.testing.assert_array_equal(nb_quantile(u, mu, theta), stats.nbinom.ppf(u, theta, theta / (theta + mu)))
    np.testing.assert_allclose(nb_cdf(np.array([3.0]), 2.0, 5.0), stats.nbinom.cdf(3, 5.0, 5 / 7), rtol=1e-12)


def test_parse_perturbation_rules():
    assert parse_perturbation("B+A") == ("A", "B")
    assert parse_perturbation(" ctrl ", control="ctrl") == ()
    for bad in ("A+", "+A", "A++B", "A+A", "control+A"):
        with pytest.raises(DataError):
            parse_perturbation(bad)


# --------------------------------------------------------------------------- sampling
def test_sample_structure(sim, cells):
    assert cells.shape == (600, 60)
    assert list(cells.obs.columns) == ["cell_type", "donor", "perturbation", "dose"]
    assert cells.obs_names[5] == "perturbseq:0:5"
    k = sim.dims
    assert cells.obsm["z_context"].shape == (600, k["context"])
    assert cells.obsm["z_treatment"].shape == (600, k["treatment"])
    assert cells.obsm["z_interaction"].shape == (600, k["interaction"])
    assert cells.obsm["programs"].shape == (600, sum(k.values()))
    X = _dense(cells)
    assert (X >= 0).all() and np.array_equal(X, np.round(X))
    assert (cells.X != cells.layers["counts"]).nnz == 0
    assert set(cells.obs["perturbation"].astype(str)) == set(sim.conditions)
    ctrl = cells.obs["perturbation"] == "control"
    assert (cells.obs.loc[ctrl, "dose"] == 0).all()
    assert set(cells.obs.loc[~ctrl, "dose"]) <= set(sim.dose_levels)
    frac = ctrl.mean()
    assert abs(frac - sim.control_fraction) < 4 * np.sqrt(0.2 * 0.8 / 600)


def test_sample_is_deterministic_and_prefix_stable(sim):
    a, b = sim.sample(80, seed=4), sim.sample(40, seed=4)
    assert (a[:40].layers["counts"] != b.layers["counts"]).nnz == 0
    pd.testing.assert_frame_equal(a.obs.iloc[:40].astype(str), b.obs.astype(str))
    c = sim.sample(40, seed=5)
    assert (c.layers["counts"] != b.layers["counts"]).nnz > 0


def test_counts_are_the_nb_quantile_of_the_cell_noise(sim, cells):
    """Each count y satisfies F(y - 1) < u <= F(y) for its own uniform u (exact coupling)."""
    y = _dense(cells)
    mean = sim.expected_counts(cells)
    theta = np.broadcast_to(sim.theta, y.shape)
    u = sim.noise(cells)["counts"]
    assert (nb_cdf(y - 1, mean, theta) < u).all() and (u <= nb_cdf(y, mean, theta)).all()


def test_counts_have_the_nb_moments():
    """Gene sums over 3000 cells of one condition agree with the NB mean and variance."""
    sim = PerturbSeq(n_genes=40, n_cell_types=1, n_donors=1, n_perturbations=2, combinations=0, seed=1)
    a = sim.sample(3000, seed=0, conditions=["control"])
    mean = sim.expected_counts(a)
    var = mean + mean ** 2 / sim.theta
    z = (_dense(a).sum(0) - mean.sum(0)) / np.sqrt(var.sum(0))
    assert np.abs(z).max() < 4.5  # 40 genes: P(max |z| > 4.5) < 3e-4


def test_conditions_and_exclude(sim):
    a = sim.sample(400, seed=1, conditions=["control", "P1+P0"], exclude=[("CT1", "P0+P1")])
    assert set(a.obs["perturbation"].astype(str)) == {"control", "P0+P1"}
    assert (a.obs.loc[a.obs["cell_type"] == "CT1", "perturbation"] == "control").all()
    with pytest.raises(InterventionError, match="P9"):
        sim.sample(10, conditions=["P9"])
    with pytest.raises(MedCausalError, match="CT7"):
        sim.sample(10, exclude=[("CT7", "P0")])
    with pytest.raises(MedCausalError, match="integer >= 0"):
        sim.sample(-1)
    # as the tabular and brain simulators: n = 0 is an empty sample, with every field in place
    empty = sim.sample(0)
    assert empty.shape == (0, sim.n_genes) and empty.layers["counts"].shape == (0, sim.n_genes)
    assert empty.obsm["z_interaction"].shape[0] == 0 and list(empty.obs.columns) == list(a.obs.columns)
    assert sim.counterfactual(empty, do={"perturbation": "P0"}).n_obs == 0


# --------------------------------------------------------------------------- counterfactuals
def test_factual_do_reproduces_the_counts_exactly(sim, cells):
    same = sim.counterfactual(cells, do={"perturbation": cells.obs["perturbation"].astype(str).to_numpy()})
    assert (same.layers["counts"] != cells.layers["counts"]).nnz == 0
    np.testing.assert_array_equal(same.obsm["z_interaction"], cells.obsm["z_interaction"])


def test_counterfactual_moves_each_block_as_the_equations_say(sim, cells):
    ctrl = cells[(cells.obs["perturbation"] == "control").to_numpy()]
    cf = sim.counterfactual(ctrl, do={"perturbation": "P0+P1", "dose": 0.5})
    assert (cf.obs["perturbation"] == "P0+P1").all() and (cf.obs["dose"] == 0.5).all()
    assert (cf.obs["factual_perturbation"] == "control").all()
    np.testing.assert_array_equal(cf.obsm["z_context"], ctrl.obsm["z_context"])  # context untouched
    eps = sim.noise(ctrl)["treatment"]
    t = np.zeros(len(sim.perturbations)); t[[0, 1]] = 0.5
    log_s = np.clip(np.log(0.5) + t @ sim._r, np.log(0.15), np.log(1.5))
    np.testing.assert_allclose(cf.obsm["z_treatment"], t @ sim._a + np.exp(log_s) * eps, rtol=1e-6, atol=1e-6)
    eps_c = sim.noise(ctrl)["treatment"]
    np.testing.assert_allclose(ctrl.obsm["z_treatment"], 0.5 * eps_c, rtol=1e-6, atol=1e-6)


def test_counterfactual_counts_are_comonotone_with_the_mean(sim, cells):
    cf = sim.counterfactual(cells, do={"perturbation": "P2+P3"})
    m0, m1 = sim.expected_counts(cells), sim.expected_counts(cf)
    y0, y1 = _dense(cells), _dense(cf)
    assert (y1[m1 > m0] >= y0[m1 > m0]).all() and (y1[m1 < m0] <= y0[m1 < m0]).all()


def test_counterfactual_of_a_subset_is_the_subset_of_the_counterfactual(sim, cells):
    full = sim.counterfactual(cells, do={"perturbation": "P1"})
    idx = [17, 3, 250]
    part = sim.counterfactual(cells[idx], do={"perturbation": "P1"})
    np.testing.assert_array_equal(_dense(part), _dense(full)[idx])


def test_control_to_treated_gets_the_largest_dose(sim, cells):
    cf = sim.counterfactual(cells, do={"perturbation": "P3"})
    was_ctrl = (cells.obs["perturbation"] == "control").to_numpy()
    assert (cf.obs["dose"].to_numpy()[was_ctrl] == max(sim.dose_levels)).all()
    np.testing.assert_array_equal(cf.obs["dose"].to_numpy()[~was_ctrl], cells.obs["dose"].to_numpy()[~was_ctrl])
    back = sim.counterfactual(cells, do={"perturbation": "control"})
    assert (back.obs["dose"] == 0).all()


def test_hard_interventions_cut_the_target_programs():
    sim = PerturbSeq(n_genes=20, n_perturbations=4, combinations=0, hard_fraction=1.0, seed=2)
    a = sim.sample(50, seed=0, conditions=["P1"])
    z = np.concatenate([a.obsm["z_context"], a.obsm["z_treatment"], a.obsm["z_interaction"]], 1)
    targets = sim._targets[1]
    np.testing.assert_allclose(a.obsm["programs"][:, targets], z[:, targets], rtol=1e-6)
    free = [j for j in range(z.shape[1]) if sim.program_graph[:, j].any() and j not in targets]
    assert not np.allclose(a.obsm["programs"][:, free], z[:, free])


def test_context_counterfactual(sim, cells):
    cf = sim.counterfactual(cells, do={"cell_type": "CT0"})
    assert (cf.obs["cell_type"] == "CT0").all()
    eps = sim.noise(cells)["context"]
    d = pd.Categorical(cells.obs["donor"].astype(str), categories=sim.donors).codes
    expect = sim._m_ct[0] + sim._m_donor[d] + np.exp(sim._s_ct[0]) * eps
    np.testing.assert_allclose(cf.obsm["z_context"], expect, rtol=1e-5, atol=1e-6)


def test_h5ad_round_trip_keeps_counterfactuals(sim, cells, tmp_path):
    import anndata as ad

    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    back = ad.read_h5ad(path)
    a = sim.counterfactual(back, do={"perturbation": "P0"})
    b = sim.counterfactual(cells, do={"perturbation": "P0"})
    assert (a.layers["counts"] != b.layers["counts"]).nnz == 0


# --------------------------------------------------------------------------- errors
def test_counterfactual_errors_name_the_culprit(sim, cells):
    with pytest.raises(InterventionError, match="age"):
        sim.counterfactual(cells, do={"age": 3})
    with pytest.raises(InterventionError, match="P7"):
        sim.counterfactual(cells, do={"perturbation": "P0+P7"})
    with pytest.raises(InterventionError, match="empty member"):
        sim.counterfactual(cells, do={"perturbation": "P0+"})
    with pytest.raises(InterventionError, match="CT9"):
        sim.counterfactual(cells, do={"cell_type": "CT9"})
    with pytest.raises(InterventionError, match="3 values for 600"):
        sim.counterfactual(cells, do={"perturbation": ["P0"] * 3})
    for null in ({}, None):  # the null intervention, as for the other simulators
        assert (sim.counterfactual(cells[:20], do=null).layers["counts"] != cells[:20].layers["counts"]).nnz == 0
    with pytest.raises(InterventionError, match="2 values for 600"):  # not "doses must be numbers"
        sim.counterfactual(cells, do={"dose": [1.0, 2.0]})
    other = PerturbSeq(n_genes=60, n_perturbations=4, combinations=["P0+P1", "P2+P3"], seed=4)
    with pytest.raises(DataError, match="fingerprint"):
        other.counterfactual(cells, do={"perturbation": "P0"})
    renamed = cells[:3].copy()
    renamed.obs_names = ["a", "b", "c"]
    with pytest.raises(DataError, match="'a' was not produced"):
        sim.counterfactual(renamed, do={"perturbation": "P0"})
    dropped = cells[:3].copy()
    del dropped.obs["donor"]
    with pytest.raises(DataError, match="donor"):
        sim.counterfactual(dropped, do={"perturbation": "P0"})


def test_constructor_validation():
    with pytest.raises(MedCausalError, match="n_genes"):
        PerturbSeq(n_genes=0)
    with pytest.raises(MedCausalError, match="P9"):
        PerturbSeq(n_perturbations=3, combinations=["P0+P9"])
    with pytest.raises(MedCausalError, match="dose_levels"):
        PerturbSeq(dose_levels=(0.0,))
    assert len(PerturbSeq(n_perturbations=3, combinations=10).combinations) == 3  # all pairs


def test_graph_for_causal_models(sim):
    g = sim.graph
    assert g.parents("expression") == ("cell_type", "donor", "perturbation", "dose")
    assert g.variables["expression"].n_genes == 60



def test_nb_helpers_with_huge_theta_and_bad_input():
    # log P(Y=0) = theta (log theta - log(theta + mu)) cancelled for huge theta (wrong counts);
    # u > 1, theta = 0 or a NaN mean looped forever instead of raising
    from scipy import stats

    from medcausal.synthetic.perturbseq import nb_quantile, nb_quantile_normal

    u = np.random.default_rng(0).uniform(size=5000)
    assert (nb_quantile(u, 5.0, 1e12) == stats.nbinom.ppf(u, 1e12, 1e12 / (1e12 + 5.0))).all()
    assert (nb_quantile(u, 5.0, 1e15) == stats.poisson.ppf(u, 5.0)).all()  # scipy's nbinom cancels there too
    for bad in ((np.array([0.3, 1.0 + 2 ** -52]), 3.0, 2.0), (1.5, 3.0, 2.0)):
        with pytest.raises(ValueError, match="outside"):
            nb_quantile(*bad)
    for mean, theta in ((3.0, 0.0), (np.nan, 2.0), (-1.0, 2.0)):
        with pytest.raises(ValueError, match="negative mean|non-positive theta"):
            nb_quantile_normal(9.0, mean, theta)


# --------------------------------------------------------------------------- bad input and edge cases, on a smaller simulator

@pytest.fixture(scope="module")
def small_sim():
    return PerturbSeq(n_genes=8, n_perturbations=3, combinations=["P0+P1"], seed=0)


@pytest.fixture(scope="module")
def small_cells(small_sim):
    return small_sim.sample(20, seed=0)


def test_duplicate_combinations_are_rejected_by_name():
    # "P1+P0" is the same combination as "P0+P1": listing both used to give a duplicated
    # condition and then a GraphError from sim.graph
    with pytest.raises(MedCausalError, match="P1\\+P0"):
        PerturbSeq(n_genes=5, n_perturbations=2, combinations=["P0+P1", "P1+P0"], seed=0)


def test_single_combination_string_is_one_label():
    sim = PerturbSeq(n_genes=5, n_perturbations=2, combinations="P1+P0", seed=0)
    assert sim.conditions == ["control", "P0", "P1", "P0+P1"]
    assert sim.fingerprint == PerturbSeq(n_genes=5, n_perturbations=2, combinations=["P0+P1"],
                                         seed=0).fingerprint


def test_sample_conditions_as_one_string(small_sim):
    a = small_sim.sample(6, seed=0, conditions="P1+P0")
    assert a.obs["perturbation"].astype(str).unique().tolist() == ["P0+P1"]


@pytest.mark.parametrize("seed", [1.5, -1, None, "0", True, 10**18])
def test_constructor_seed_must_be_an_integer(seed):
    with pytest.raises(MedCausalError, match="seed"):
        PerturbSeq(n_genes=5, seed=seed)


def test_constructor_numpy_seed_is_the_int_seed():
    a = PerturbSeq(n_genes=5, seed=np.int64(3))
    assert a.fingerprint == PerturbSeq(n_genes=5, seed=3).fingerprint


@pytest.mark.parametrize("kwargs, name", [
    ({"hard_fraction": "x"}, "hard_fraction"),
    ({"control_fraction": None}, "control_fraction"),
    ({"dose_levels": 1.0}, "dose_levels"),
    ({"dose_levels": "ab"}, "dose_levels"),
    ({"library_size": float("nan")}, "library_size"),
    ({"library_size": float("inf")}, "library_size"),
    ({"library_size": "big"}, "library_size"),
    ({"dispersion": float("nan")}, "dispersion"),
])
def test_constructor_bad_numbers_name_the_argument(kwargs, name):
    with pytest.raises(MedCausalError, match=name):
        PerturbSeq(n_genes=5, **kwargs)


@pytest.mark.parametrize("dose", [float("nan"), -1.0, "abc", None])
def test_obs_with_bad_dose_is_a_data_error(small_sim, small_cells, dose):
    bad = small_cells.copy()
    bad.obs["dose"] = dose
    for call in (lambda: small_sim.expected_counts(bad),
                 lambda: small_sim.counterfactual(bad, do={"perturbation": "P2"})):
        with pytest.raises(DataError, match="dose"):
            call()


def test_do_dose_not_a_number_is_an_intervention_error(small_sim, small_cells):
    with pytest.raises(InterventionError, match="dose"):
        small_sim.counterfactual(small_cells, do={"dose": "abc"})


def test_sample_exclude_must_be_pairs(small_sim):
    with pytest.raises(MedCausalError, match="exclude"):
        small_sim.sample(5, exclude=["CT0"])


def test_counterfactual_on_reordered_subset_uses_each_cells_own_noise(small_sim, small_cells):
    sub = small_cells[[7, 2, 11]].copy()
    full = small_sim.counterfactual(small_cells, do={"perturbation": "P2", "dose": 1.0})
    part = small_sim.counterfactual(sub, do={"perturbation": "P2", "dose": 1.0})
    assert np.array_equal(full[[7, 2, 11]].X.toarray(), part.X.toarray())
    same = small_sim.counterfactual(sub, do={"perturbation": sub.obs["perturbation"].to_numpy(),
                                       "dose": sub.obs["dose"].to_numpy()})
    assert (same.X != sub.X).nnz == 0
