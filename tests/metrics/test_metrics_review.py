"""Review of the metrics: known answers on edge cases, and a clear DataError on bad input."""

import numpy as np
import pandas as pd
import pytest

from medcausal.errors import DataError
from medcausal.metrics import images as im
from medcausal.metrics import singlecell as sc
from medcausal.metrics.predictors import AntiCausalPredictor


# -- single cells -------------------------------------------------------------------------
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


# -- images ---------------------------------------------------------------------------------
def test_effectiveness_rejects_nan_empty_and_mismatched_input():
    with pytest.raises(DataError, match="predicted"):
        im.effectiveness([np.nan, 1.0], [1.0, 1.0])
    with pytest.raises(DataError, match="target"):
        im.effectiveness([1.0, 1.0], [np.nan, 1.0])
    with pytest.raises(DataError, match="empty|no rows"):
        im.effectiveness([], [])
    with pytest.raises(DataError, match="predicted"):  # [n, 2] vs [n] used to broadcast
        im.effectiveness([[1.0, 2.0], [3.0, 4.0]], [1.0, 3.0])
    with pytest.raises(DataError, match="target"):  # accuracy 0.5 on labels {1, 2} before
        im.effectiveness([0.1, 0.9, 0.2, 0.8], [1, 2, 1, 2], kind="binary")
    with pytest.raises(DataError, match="predicted"):
        im.effectiveness([[0.1, 0.9], [0.8, 0.2]], [1, 0], kind="binary")
    with pytest.raises(DataError, match="predicted"):
        im.effectiveness(1.0, 1.0)
    # known answers still hold; a one-hot categorical target is read as labels
    assert im.effectiveness([[1.0], [3.0]], [1.0, 2.0]) == {"mae": 0.5}
    assert im.effectiveness([[0.1, 0.9], [0.8, 0.2]], [[0, 1], [0, 1]], kind="categorical") == {"accuracy": 0.5}


def test_true_counterfactual_error_on_tiny_and_empty_images():
    x = np.arange(8.0).reshape(2, 1, 2, 2)
    with pytest.raises(DataError, match="3x3|3 x 3"):  # ZeroDivisionError from skimage before
        im.true_counterfactual_error(x, x)
    with pytest.raises(DataError, match="no images|empty"):
        im.true_counterfactual_error(np.zeros((0, 1, 8, 8)), np.zeros((0, 1, 8, 8)))
    with pytest.raises(DataError, match="no images|empty"):  # nan before
        im.mean_absolute_error(np.zeros((0, 1, 8, 8)), np.zeros((0, 1, 8, 8)))
    with pytest.raises(DataError, match="numeric"):
        im.mean_absolute_error([["a"]], [["b"]])


def test_frechet_distance_rejects_non_finite_features():
    rng = np.random.default_rng(0)
    a = np.r_[rng.random((5, 2)), [[np.nan, 1.0]]]
    with pytest.raises(DataError, match="non-finite"):  # nan before
        im.frechet_distance(a, rng.random((5, 2)))


# -- anti-causal predictor ------------------------------------------------------------------
def test_predictor_rejects_images_too_small_for_its_blocks():
    with pytest.raises(DataError, match="too small"):  # torch RuntimeError at predict() before
        AntiCausalPredictor((1, 8, 8), {"m": "continuous"})
    assert AntiCausalPredictor((1, 16, 16), {"m": "continuous"}).predict(np.zeros((2, 1, 16, 16)))["m"].shape == (2,)


def test_predictor_rejects_empty_and_non_finite_input():
    p = AntiCausalPredictor((1, 16, 16), {"m": "continuous"}, channels=[4])
    with pytest.raises(DataError, match="no images|empty"):
        p.predict(np.zeros((0, 1, 16, 16)))
    with pytest.raises(DataError, match="non-finite"):
        p.predict(np.full((2, 1, 16, 16), np.nan))
    with pytest.raises(DataError, match="'m'"):
        p.fit(np.zeros((8, 1, 16, 16)), {"m": [np.nan] + [1.0] * 7}, max_epochs=1, verbose=False)
    with pytest.raises(DataError, match="'m'"):
        p.fit(np.zeros((8, 1, 16, 16)), {"m": ["a"] * 8}, max_epochs=1, verbose=False)
