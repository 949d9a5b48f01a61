"""Single-cell metrics against analytic values and known structure."""

from __future__ import annotations

import numpy as np
import pytest

from medcausal.errors import DataError
from medcausal.metrics.singlecell import (counterfactual_error, e_distance, evaluate_condition, lfc_r2,
                                          log_normalize, nmi, r2_mean, r2_var, top_degs)


def test_log_normalize_matches_scanpy():
    import anndata as ad
    import scanpy as sc

    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, size=(50, 20)).astype(np.float32)
    x[0] = 0.0  # an empty cell stays zero
    a = ad.AnnData(x.copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    np.testing.assert_allclose(log_normalize(x), a.X, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="non-negative"):
        log_normalize(-x)


def test_r2_of_means_and_variances_analytic():
    true = np.array([[0.0, 2.0, 4.0, 6.0], [2.0, 2.0, 6.0, 6.0]])  # means 1, 2, 5, 6; variances 1, 0, 1, 0
    pred = true + np.array([1.0, 0.0, 0.0, 0.0])  # mean error 1 on gene 0
    ss_tot = np.sum((np.array([1, 2, 5, 6]) - 3.5) ** 2)
    assert r2_mean(true, pred) == pytest.approx(1 - 1 / ss_tot)
    assert r2_mean(true, pred, genes=[2, 3]) == 1.0
    assert r2_var(true, pred) == 1.0  # a shift leaves variances alone
    # variances (1, 0, 1, 0) vs (4, 0, 4, 0): SS_res = 18, SS_tot = 1
    assert r2_var(true, true * 2) == pytest.approx(1 - 18 / 1.0)


def test_lfc_r2_analytic():
    ctrl = np.zeros((3, 4))
    true = np.tile([1.0, -1.0, 2.0, 0.0], (3, 1))
    assert lfc_r2(true, true, ctrl) == 1.0
    pred = np.tile([1.0, -1.0, 0.0, 0.0], (3, 1))  # misses the LFC of gene 2
    ss_tot = np.sum((np.array([1, -1, 2, 0]) - 0.5) ** 2)
    assert lfc_r2(true, pred, ctrl) == pytest.approx(1 - 4 / ss_tot)


def test_e_distance_gaussians_analytic():
    """For N(0, I) vs N(m, I): E|X - Y|^2 = 2d + |m|^2 and E|X - X'|^2 = 2d, so sq E-distance = 2|m|^2."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(1500, 3)), rng.normal(size=(1500, 3)) + [1.0, 1.0, 0.0]
    assert e_distance(a, b, metric="sqeuclidean", max_points=1500) == pytest.approx(4.0, abs=0.35)
    assert e_distance(a, a) == 0.0
    c = rng.normal(size=(1500, 3))
    assert e_distance(a, c) < 0.02 < e_distance(a, b)
    with pytest.raises(DataError, match="metric"):
        e_distance(a, b, metric="cosine")


def test_counterfactual_error_values():
    true = np.array([[1.0, 1.0], [2.0, 0.0]])
    pred = np.array([[1.0, 1.0], [0.0, 2.0]])
    err = counterfactual_error(true, pred)
    lt, lp = log_normalize(true), log_normalize(pred)
    np.testing.assert_allclose(err.per_cell, np.sqrt(((lt - lp) ** 2).mean(1)))
    assert err.per_cell[0] == 0.0 and err.mae_counts == 1.0
    fact = np.array([[2.0, 0.0], [1.0, 1.0]])
    assert counterfactual_error(true, true, factual=fact).pearson == pytest.approx(1.0)
    with pytest.raises(DataError, match="same cells"):
        counterfactual_error(true, pred[:1])


def test_nmi_separated_and_independent():
    rng = np.random.default_rng(0)
    lab = np.repeat(["a", "b", "c"], 100)
    z = rng.normal(size=(300, 2)) * 0.2 + np.repeat([[0, 0], [5, 0], [0, 5]], 100, axis=0)
    assert nmi(z, lab) == pytest.approx(1.0)
    assert nmi(z, rng.permutation(lab)) < 0.05
    with pytest.raises(DataError, match="labels"):
        nmi(z, lab[:10])


def test_top_degs_find_the_planted_genes():
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(0)
    n, g = 120, 50
    mu = np.full((n, g), 5.0)
    treated = np.arange(n) >= 60
    mu[np.ix_(treated, [3, 7, 11])] *= 6.0  # planted up-regulated genes
    X = rng.poisson(mu).astype(np.float32)
    a = ad.AnnData(sparse.csr_matrix(X), obs=pd.DataFrame({"p": np.where(treated, "A", "control"),
                                                           "ct": "T"}, index=np.arange(n).astype(str)))
    a.layers["counts"] = a.X.copy()
    degs = top_degs(a, "p", "control", n_genes=3, context_key="ct")
    assert set(degs[("T", "A")]) == {3, 7, 11}


def test_evaluate_condition_perfect_prediction():
    rng = np.random.default_rng(0)
    ctrl = rng.poisson(4.0, (100, 30)).astype(float)
    true = rng.poisson(np.r_[np.full(5, 12.0), np.full(25, 4.0)], (100, 30)).astype(float)
    res = evaluate_condition(true, true, ctrl, degs=[0, 1, 2, 3, 4], true_cf_counts=true, factual_counts=ctrl)
    for key in ("r2_mean_all", "r2_var_all", "lfc_r2_all", "r2_mean_deg", "lfc_r2_deg", "cf_delta_pearson"):
        assert res[key] == pytest.approx(1.0)
    assert res["e_distance"] == 0.0 and res["cf_rmse"] == 0.0
    worse = evaluate_condition(true, ctrl, ctrl, degs=[0, 1, 2, 3, 4])
    assert worse["r2_mean_deg"] < 0.5 and worse["e_distance"] > 0.1 and worse["mmd"] > 0.01
