"""Single-cell metrics against analytic values and known structure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from medcausal.errors import DataError
from medcausal.metrics import singlecell as sc
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


def test_lfc_r2_rejects_a_control_with_other_genes():
    t = np.array([[1.0, 0.0, -1.0, 2.0]] * 2)
    with pytest.raises(DataError, match="control"):
        sc.lfc_r2(t, t, np.zeros((2, 3)))
    # with a gene subset the mismatch used to go unnoticed (a silently wrong score)
    with pytest.raises(DataError, match="control"):
        sc.lfc_r2(t, t, np.zeros((2, 6)), genes=[0, 1, 2])


def test_counterfactual_error_rejects_a_factual_of_other_cells_or_genes():
    t = np.array([[1.0, 3.0], [2.0, 2.0], [4.0, 1.0]])
    with pytest.raises(DataError, match="factual"):  # one cell used to broadcast silently
        sc.counterfactual_error(t, t, factual=t[:1])
    with pytest.raises(DataError, match="factual"):
        sc.counterfactual_error(t, t, factual=np.ones((3, 3)))
    # known answer: predicted change = true change (non-constant in every cell) -> correlation 1
    f = np.array([[3.0, 1.0], [1.0, 3.0], [1.0, 4.0]])
    assert sc.counterfactual_error(t, t, factual=f).pearson == pytest.approx(1.0, abs=1e-12)


def test_r2_needs_cells_and_valid_gene_indices():
    rng = np.random.default_rng(0)
    t, p = rng.random((5, 4)), rng.random((5, 4))
    with pytest.raises(DataError, match="cell"):
        sc.r2_mean(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(DataError, match="cell"):  # one cell: both variances 0 -> R² of 1.0
        sc.r2_var(t[:1], p[:1])
    with pytest.raises(DataError, match="genes"):
        sc.r2_mean(t, p, genes=[0, 9])
    with pytest.raises(DataError, match="true"):
        sc.r2_mean([["a", "b"]], [["a", "b"]])


def test_nmi_and_e_distance_reject_impossible_settings():
    rng = np.random.default_rng(0)
    z = rng.random((3, 2))
    with pytest.raises(DataError, match="n_clusters"):
        sc.nmi(z, ["a", "b", "c"], n_clusters=5)
    with pytest.raises(DataError, match="max_points"):
        sc.e_distance(z, z + 1.0, max_points=1)


def test_counterfactual_pearson_leaves_out_cells_the_intervention_does_not_change():
    factual = np.array([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]])
    true_cf = np.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])  # cell 1: true counterfactual == factual
    # Old code scored cell 1 (zero true change) as correlation 0: a perfect prediction got 0.5.
    assert counterfactual_error(true_cf, true_cf, factual=factual).pearson == pytest.approx(1.0, abs=1e-12)
    # Same when the unchanged cell's counts are only rescaled (a library-size change: no change
    # after log-normalization, up to rounding).
    scaled = true_cf.copy()
    scaled[1] *= 3.0
    assert counterfactual_error(scaled, scaled, factual=factual).pearson == pytest.approx(1.0, abs=1e-12)


def test_counterfactual_pearson_hand_computed_with_a_zero_change_cell():
    factual = np.array([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]])
    true_cf = np.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    pred = np.array([[1.0, 3.0, 2.0], [3.0, 1.0, 2.0]])  # cell 0 exactly right; cell 1 moved (wrongly)
    err = counterfactual_error(true_cf, pred, factual=factual)
    # Cell 0 is the only cell with a true change, and its predicted change is exactly the true
    # one: correlation 1. Cell 1 has no true change and is left out (its error is in the RMSE).
    assert err.pearson == pytest.approx(1.0, abs=1e-12)
    assert err.per_cell[0] == 0.0 and err.per_cell[1] > 0.5
    # Hand-computed: a predicted change that is the true one reversed correlates -1 (cell 0);
    # the zero-change cell 1 again does not count.
    err = counterfactual_error(true_cf, np.array([[5.0, 0.0, 1.0], [1.0, 3.0, 2.0]]), factual=factual)
    lt = np.log1p(np.array([1.0, 3.0, 2.0]) / 6 * 1e4) - np.log1p(np.array([3.0, 1.0, 2.0]) / 6 * 1e4)
    lp = np.log1p(np.array([5.0, 0.0, 1.0]) / 6 * 1e4) - np.log1p(np.array([3.0, 1.0, 2.0]) / 6 * 1e4)
    assert err.pearson == pytest.approx(float(np.corrcoef(lt, lp)[0, 1]), abs=1e-12)


def test_counterfactual_pearson_still_scores_a_flat_prediction_zero_and_no_change_nan():
    factual = np.array([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]])
    true_cf = np.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    # predicting "no change" where the cell does change: 0 (cell 0); cell 1 does not count
    assert counterfactual_error(true_cf, factual, factual=factual).pearson == 0.0
    # no cell changes at all: there is no correlation to average
    assert math.isnan(counterfactual_error(factual, factual, factual=factual).pearson)


def _adata(counts, groups):
    import anndata as ad

    a = ad.AnnData(X=counts.copy(), obs=pd.DataFrame({"grp": groups}, index=np.arange(len(groups)).astype(str)))
    a.layers["counts"] = counts.copy()
    return a


def test_top_degs_rejects_an_unknown_reference_or_key():
    counts = np.random.default_rng(0).poisson(5, size=(8, 4)).astype(float)
    a = _adata(counts, ["ctrl"] * 4 + ["trt"] * 4)
    with pytest.raises(DataError, match="reference"):  # used to return {} silently
        sc.top_degs(a, "grp", "control", n_genes=2)
    with pytest.raises(DataError, match="groupby"):
        sc.top_degs(a, "group", "ctrl", n_genes=2)
    with pytest.raises(DataError, match="layer"):
        sc.top_degs(a, "grp", "ctrl", n_genes=2, layer="raw")


def test_top_degs_never_picks_a_constant_gene():
    rng = np.random.default_rng(0)
    counts = rng.poisson(5, size=(40, 10)).astype(float)
    counts[:, 3] = 0.0          # never expressed: cannot be differentially expressed
    counts[20:, 5] += 30.0      # the planted DEG
    a = _adata(counts, ["ctrl"] * 20 + ["trt"] * 20)
    degs = sc.top_degs(a, "grp", "ctrl", n_genes=3)[("all", "trt")]
    assert degs[0] == 5 and 3 not in degs and len(degs) == 3


def test_top_degs_rank_a_knocked_down_gene_with_the_induced_ones():
    rng = np.random.default_rng(0)
    counts = rng.poisson(5, size=(40, 8)).astype(float)
    counts[20:, 1] = rng.poisson(0.05, size=20)   # knocked down: the strongest DEG
    counts[20:, 6] += 4.0                         # induced, less strongly
    degs = sc.top_degs(_adata(counts, ["ctrl"] * 20 + ["trt"] * 20), "grp", "ctrl", n_genes=2)[("all", "trt")]
    assert degs.tolist() == [1, 6]  # ranked by the signed score, gene 1 came last of all 8


def test_top_degs_take_a_non_string_reference_and_refuse_log_normalized_data():
    rng = np.random.default_rng(0)
    counts = rng.poisson(5, size=(40, 50)).astype(float)  # many genes: the planted one barely moves the totals
    counts[20:, 2] += 30.0
    a = _adata(counts, [0] * 20 + [1] * 20)  # an integer group column
    assert sc.top_degs(a, "grp", 0, n_genes=1)[("all", "1")].tolist() == [2]  # was {}: 0 never matched "0"
    a.layers["counts"] = np.log1p(counts)
    with pytest.raises(DataError, match="counts"):
        sc.top_degs(a, "grp", 0, n_genes=1)


def test_top_degs_read_counts_in_row_chunks_of_the_compared_cells_and_stay_sparse(monkeypatch):
    from scipy import sparse

    rng = np.random.default_rng(0)
    counts = rng.poisson(5, size=(30, 6)).astype(float)
    counts[10:20, 4] += 30.0
    reads = []

    class Recording:  # a matrix that records each row read (as a backed matrix would serve it)
        shape, dtype = counts.shape, counts.dtype

        def __getitem__(self, rows):
            reads.append(np.atleast_1d(rows).tolist())
            return sparse.csr_matrix(counts[rows])

    out = sc._log_normalized_rows(Recording(), np.arange(10, 30), chunk=8)
    assert sparse.issparse(out) and out.dtype == np.float32
    assert [len(r) for r in reads] == [8, 8, 4] and sum(reads, []) == list(range(10, 30))
    np.testing.assert_allclose(out.toarray(), sc.log_normalize(counts[10:30]), rtol=1e-6)
    # top_degs reads only the reference's and the compared groups' cells: "single" (one cell: no
    # group to compare) is never read
    a = _adata(counts, ["ctrl"] * 10 + ["trt"] * 10 + ["x"] * 9 + ["single"])
    seen = []
    real = sc._log_normalized_rows
    monkeypatch.setattr(sc, "_log_normalized_rows", lambda mat, rows, **k: seen.append(rows.tolist()) or real(mat, rows))
    degs = sc.top_degs(a, "grp", "ctrl", n_genes=1)
    assert degs[("all", "trt")].tolist() == [4] and ("all", "single") not in degs
    assert seen == [list(range(29))]


def test_top_degs_warns_about_a_context_without_reference_cells():
    import anndata as ad

    from medcausal.metrics.singlecell import top_degs

    rng = np.random.default_rng(0)
    c = rng.poisson(5, (80, 10)).astype(np.float32)
    obs = pd.DataFrame({"p": ["ctrl"] * 20 + ["A"] * 60, "ct": ["T"] * 40 + ["B"] * 40},
                       index=[f"c{i}" for i in range(80)])
    with pytest.warns(UserWarning, match="'B', 'A'"):
        degs = top_degs(ad.AnnData(c, obs=obs), "p", "ctrl", n_genes=3, context_key="ct", layer=None)
    assert list(degs) == [("T", "A")]
