"""Known-answer tests for medcausal.metrics.representation.

Tolerances are stated next to each assertion. Exact identities (permutation,
scale, shift; duplicated codes through dci_from_importance) are held to
floating-point precision; quantities estimated from finite samples with
fitted probes get tolerances sized for the sample sizes used here.
"""

from __future__ import annotations

import doctest
import math
import warnings

import numpy as np
import pandas as pd
import pytest

import medcausal.metrics.representation as rep
from medcausal.errors import DataError
from medcausal.metrics.representation import (
    DegenerateColumnWarning,
    dci,
    dci_es,
    dci_from_importance,
    irs,
    leeb_interventional,
    mcc,
    mig,
    report,
    sap,
    within_group_r2,
)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _paired_codes(f: np.ndarray) -> np.ndarray:
    """Codes in which every factor is spread evenly over two codes (and vice versa)."""
    c = np.empty_like(f)
    c[:, 0::2] = f[:, 0::2] + f[:, 1::2]
    c[:, 1::2] = f[:, 0::2] - f[:, 1::2]
    return c


# --------------------------------------------------------------------------- #
# input errors
# --------------------------------------------------------------------------- #

ARRAY_METRICS = [mcc, dci, dci_es, mig, sap, irs, report]


@pytest.mark.parametrize("metric", ARRAY_METRICS, ids=lambda m: m.__name__)
def test_mismatched_rows_raise(metric, rng):
    with pytest.raises(DataError, match=r"factors has 50 rows but codes has 40"):
        metric(rng.normal(size=(50, 2)), rng.normal(size=(40, 2)))


@pytest.mark.parametrize("metric", ARRAY_METRICS, ids=lambda m: m.__name__)
def test_nan_names_array_and_count(metric, rng):
    codes = rng.normal(size=(50, 2))
    codes[[3, 7, 9], 1] = np.nan
    with pytest.raises(DataError, match=r"codes contains 3 NaN"):
        metric(rng.normal(size=(50, 2)), codes)
    factors = rng.normal(size=(50, 2))
    factors[0, 0] = np.nan
    with pytest.raises(DataError, match=r"factors contains 1 NaN"):
        metric(factors, rng.normal(size=(50, 2)))


@pytest.mark.parametrize("metric", ARRAY_METRICS, ids=lambda m: m.__name__)
def test_one_dimensional_input_raises(metric, rng):
    x = rng.normal(size=50)
    with pytest.raises(DataError, match=r"factors must be a 2-D array"):
        metric(x, rng.normal(size=(50, 2)))
    with pytest.raises(DataError, match=r"codes must be a 2-D array"):
        metric(rng.normal(size=(50, 2)), x)


def test_errors_are_value_errors_and_other_bad_arguments(rng):
    z = rng.normal(size=(50, 2))
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match="method"):
        mcc(z, z, method="kendall")
    with pytest.raises(DataError, match="variant"):
        mcc(z, z, variant="medium")
    with pytest.raises(DataError, match="discrete has 3 entries"):
        dci(z, z, discrete=[True, False, True])
    with pytest.raises(DataError, match="model"):
        dci(z, z, model="forest")
    with pytest.raises(DataError, match="capacities"):
        dci_es(z, z, capacities=(8, 4))
    with pytest.raises(DataError, match="infinite"):
        mig(z, np.where(z > 1.5, np.inf, z))
    with pytest.raises(DataError, match="negative"):
        dci_from_importance(-np.eye(2))
    with pytest.raises(DataError, match="all zeros"):
        dci_from_importance(np.zeros((2, 2)))


# --------------------------------------------------------------------------- #
# MCC
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_mcc_identity_and_permutation_scale_shift(method, rng):
    z = rng.normal(size=(500, 4))
    assert mcc(z, z, method=method).score == pytest.approx(1.0, abs=1e-6)  # tol 1e-6
    perm = [2, 0, 3, 1]
    codes = z[:, perm] * np.array([2.0, -0.5, 3.0, 7.0]) + np.array([1.0, -4.0, 0.0, 10.0])
    r = mcc(z, codes, method=method)
    assert r.score == pytest.approx(1.0, abs=1e-6)  # tol 1e-6
    assert set(r.pairs) == {(perm[j], j) for j in range(4)}
    assert r.corr.shape == (4, 4)
    assert r.settings["method"] == method and r.settings["variant"] == "strong"


def test_mcc_monotone_maps_spearman_one_pearson_below(rng):
    z = rng.normal(size=(1000, 3))
    for codes in (z**3, np.exp(z)):
        assert mcc(z, codes, method="spearman").score == pytest.approx(1.0, abs=1e-6)  # tol 1e-6
        assert mcc(z, codes, method="pearson").score < 0.99  # observed 0.77 / 0.81


def test_mcc_independent_noise_near_zero(rng):
    n = 2000
    r = mcc(rng.normal(size=(n, 3)), rng.normal(size=(n, 5)))
    # |corr| of independent columns ~ 1/sqrt(n) = 0.022; the best matching of 3 of 5 stays < 0.1
    assert r.score < 0.1


def test_mcc_rectangular(rng):
    z = rng.normal(size=(400, 3))
    wide = np.hstack([rng.normal(size=(400, 2)), z[:, [1]], rng.normal(size=(400, 1)), z[:, [0, 2]]])
    r = mcc(z, wide)  # k=3, d=6
    assert r.corr.shape == (3, 6)
    assert r.score == pytest.approx(1.0, abs=1e-6)  # tol 1e-6
    assert sorted(r.pairs) == [(0, 4), (1, 2), (2, 5)]
    # k=3, d=1: one pair, and the two factors without a code count 0, in every variant alike
    # (a code that copies one factor of three recovers a third of them)
    narrow = mcc(z, z[:, [2]])
    assert narrow.pairs == ((2, 0),) and narrow.score == pytest.approx(1 / 3, abs=1e-6)
    assert mcc(z, z[:, [2]], method="spearman").score == pytest.approx(1 / 3, abs=1e-6)
    assert mcc(z, z[:, [2]], variant="weak", alignment="cca").score == pytest.approx(1 / 3, abs=1e-6)
    # affine: factor 2 exactly, factors 0 and 1 by a regression on an independent code (|r| ~ 0.05)
    assert mcc(z, z[:, [2]], variant="weak").score == pytest.approx(1 / 3, abs=0.05)


def test_mcc_weak_variant_undoes_affine_mixing(rng):
    z = rng.normal(size=(800, 3))
    a = np.array([[1.0, 0.8, 0.0], [0.0, 1.0, 0.7], [0.6, 0.0, 1.0]])
    codes = z @ a + 3.0
    assert mcc(z, codes).score < 0.95  # strong: mixed
    weak = mcc(z, codes, variant="weak")
    assert weak.score == pytest.approx(1.0, abs=1e-6)  # tol 1e-6: exact affine map
    assert "affine" in weak.settings["weak_alignment"]


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_mcc_weak_cca_undoes_affine_mixing(method, rng):
    z = rng.normal(size=(800, 3))
    a = np.array([[1.0, 0.8, 0.0], [0.0, 1.0, 0.7], [0.6, 0.0, 1.0]])
    codes = z @ a + 3.0
    r = mcc(z, codes, variant="weak", alignment="cca", method=method)
    assert r.score == pytest.approx(1.0, abs=1e-6)  # tol 1e-6: canonical correlations all 1
    assert "CCA" in r.settings["weak_alignment"] and r.corr.shape == (3, 3)
    oos = mcc(z, codes, variant="weak", alignment="cca", method=method, split=0.3, seed=2)
    assert oos.score == pytest.approx(1.0, abs=1e-6)  # exact map learned on train, exact on test
    # wider code (d=5 > k=3) holding a mixed copy of the factors plus two noise columns
    wide = np.hstack([rng.normal(size=(800, 2)), codes])
    assert mcc(z, wide, variant="weak", alignment="cca", method=method).score == pytest.approx(1.0, abs=1e-6)


def test_mcc_weak_cca_noise_and_bad_alignment(rng):
    n = 2000
    f, c = rng.normal(size=(n, 3)), rng.normal(size=(n, 5))
    # canonical correlations of independent data: the largest is about sqrt(k d / n) = 0.09 in
    # sample; the mean over 3 stays below 0.1; out of sample it shrinks towards 1/sqrt(n_test)
    assert mcc(f, c, variant="weak", alignment="cca").score < 0.1
    assert mcc(f, c, variant="weak", alignment="cca", split=0.5).score < 0.1
    with pytest.raises(DataError, match="alignment must be 'affine' or 'cca'"):
        mcc(f, c, variant="weak", alignment="pca")
    flat = np.column_stack([f[:, 0], np.full(n, 2.0), f[:, 1:]])
    with pytest.warns(DegenerateColumnWarning, match=r"'code 1' is constant"):
        r = mcc(f, flat, variant="weak", alignment="cca")
    assert r.score == pytest.approx(1.0, abs=1e-6)  # the constant code is ignored


def test_mcc_out_of_sample(rng):
    z = rng.normal(size=(600, 3))
    r = mcc(z, z[:, [1, 2, 0]], split=0.3, seed=1)
    assert r.score == pytest.approx(1.0, abs=1e-6)  # tol 1e-6
    assert r.settings["n_eval"] == 180 and r.settings["n_train"] == 420
    assert r.settings["split"] == 0.3 and r.settings["seed"] == 1
    with pytest.raises(DataError, match="test fraction"):
        mcc(z, z, split=1.5)


def test_mcc_constant_column_guarded(rng):
    z = rng.normal(size=(300, 2))
    codes = np.column_stack([z[:, 0], np.full(300, 5.0), z[:, 1]])
    with pytest.warns(DegenerateColumnWarning, match=r"'code 1' is constant"):
        r = mcc(z, codes)
    assert np.all(r.corr[:, 1] == 0.0)
    assert r.score == pytest.approx(1.0, abs=1e-6)
    df = pd.DataFrame(codes, columns=["a", "flat", "b"])
    with pytest.warns(DegenerateColumnWarning, match=r"'flat' is constant"):
        mcc(z, df)


# --------------------------------------------------------------------------- #
# DCI
# --------------------------------------------------------------------------- #


def test_dci_from_importance_known_answers():
    assert dci_from_importance(np.eye(5)) == (1.0, 1.0)  # exact
    # each of 10 factors spread evenly over 2 of 10 codes (and each code over 2 factors)
    r = np.zeros((10, 10))
    for j in range(10):
        r[j, j] = r[(j + 1) % 10, j] = 1.0
    d_score, c_score = dci_from_importance(r)
    expected = 1.0 - math.log(2) / math.log(10)
    assert c_score == pytest.approx(expected, abs=1e-9)  # tol 1e-9
    assert d_score == pytest.approx(expected, abs=1e-9)  # tol 1e-9
    # duplicated codes: d=20 codes, every factor on exactly 2 of them (entropy base d=20)
    dup = np.vstack([np.eye(10), np.eye(10)])
    d_score, c_score = dci_from_importance(dup)
    assert d_score == pytest.approx(1.0, abs=1e-12)
    assert c_score == pytest.approx(1.0 - math.log(2) / math.log(20), abs=1e-9)  # tol 1e-9
    # the case: 5 factors, each duplicated in 2 of d=10 codes: C = 1 - log 2 / log 10, D = 1
    d_score, c_score = dci_from_importance(np.vstack([np.eye(5), np.eye(5)]))
    assert c_score == pytest.approx(1.0 - math.log(2) / math.log(10), abs=1e-12)  # tol 1e-12
    assert d_score == pytest.approx(1.0, abs=1e-12)
    # a single factor: D is 1 by definition; spread over 3 codes evenly: C = 0
    assert dci_from_importance(np.ones((3, 1))) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_dci_identity_code_is_perfect(rng):
    f = rng.uniform(size=(400, 4))
    r = dci(f, f[:, [3, 1, 0, 2]])
    assert r.importance.shape == (4, 4)
    assert r.disentanglement > 0.99 and r.completeness > 0.99  # lasso on exact copies
    assert r.informativeness_error < 0.01  # lasso shrinkage alpha=0.02 -> error ~ alpha^2
    assert r.score == r.disentanglement
    assert r.settings["model"] == "lasso" and r.settings["alpha"] == 0.02


def test_dci_noise_code_is_uninformative(rng):
    f = rng.uniform(size=(600, 3))
    r = dci(f, rng.normal(size=(600, 4)))
    assert 0.9 < r.informativeness_error < 1.2  # chance level is 1 (observed 1.02)


def test_dci_paired_codes_on_data(rng):
    f = rng.uniform(-1, 1, size=(800, 10))
    r = dci(f, _paired_codes(f))
    expected = 1.0 - math.log(2) / math.log(10)
    assert r.completeness == pytest.approx(expected, abs=0.02)  # finite-sample lasso; observed 2e-4
    assert r.disentanglement == pytest.approx(expected, abs=0.02)
    assert r.informativeness_error < 0.01


def test_dci_duplicated_codes_on_data_gbt(rng):
    f = rng.uniform(size=(600, 10))
    r = dci(f, np.hstack([f, f]), model="gbt", n_estimators=20, max_depth=2)
    # trees split on either copy at random: importance about 50/50 (observed 0.776 vs 0.769)
    assert r.completeness == pytest.approx(1.0 - math.log(2) / math.log(20), abs=0.03)
    assert r.disentanglement > 0.99
    assert r.importance.shape == (20, 10)


def test_dci_discrete_factors_and_rectangular(rng):
    g = rng.integers(0, 4, size=(500, 2)).astype(float)
    codes = np.hstack([g, rng.normal(size=(500, 1))])  # d=3, k=2
    for model, kw in (("lasso", {}), ("gbt", {"n_estimators": 15, "max_depth": 2})):
        r = dci(g, codes, model=model, **kw)
        assert r.settings["discrete"] == (True, True)
        assert r.importance.shape == (3, 2)
        assert r.informativeness_error < 0.05
        assert r.disentanglement > 0.9 and r.completeness > 0.9


# --------------------------------------------------------------------------- #
# DCI-ES
# --------------------------------------------------------------------------- #


def test_explicitness_of_known_curves():
    x = np.linspace(0.0, 1.0, 5)
    e, _ = rep._explicitness_from_curve(x, np.zeros(5), 0.0)
    assert e == pytest.approx(1.0, abs=1e-12)  # lowest loss at the lowest capacity
    e, _ = rep._explicitness_from_curve(x, 1.0 - x, 0.0)
    assert e == pytest.approx(0.0, abs=1e-12)  # linear descent = the triangle
    e, _ = rep._explicitness_from_curve(x, np.array([1.0, 1, 1, 1, 0]), 0.0)
    assert e == pytest.approx(-0.75, abs=1e-12)  # 1 - 0.875 / 0.5
    e, curve = rep._explicitness_from_curve(x, np.array([0.5, 0.2, 0.4, 1.3, 0.2]), None)
    assert np.allclose(curve, [0.5, 0.2, 0.2, 0.2, 0.2])  # running minimum
    assert e == pytest.approx(1.0 - (0.5 * 0.3 * 0.25) / (0.5 * 0.8), abs=1e-12)


def test_dci_es_identity_mixed_and_nonlinear(rng):
    f = rng.uniform(-1, 1, size=(500, 3))
    ident = dci_es(f, f)
    assert ident.explicitness > 0.99 and ident.size == 1.0
    rot = dci_es(f, f @ np.linalg.qr(rng.normal(size=(3, 3)))[0])
    assert rot.explicitness > 0.99  # a linear probe suffices: explicit though entangled
    cube = dci_es(f, f**3)
    assert cube.explicitness < ident.explicitness - 0.1  # needs capacity (observed 0.80)
    assert cube.losses.shape == (3, 5) and cube.capacity_axis[0] == 0.0 and cube.capacity_axis[-1] == 1.0
    noise = dci_es(f, rng.normal(size=(500, 3)))
    assert noise.explicitness < -0.8  # no probe beats the baseline (observed -0.98)


def test_dci_es_size_rectangular_and_discrete(rng):
    g = rng.integers(0, 3, size=(400, 2)).astype(float)
    codes = np.hstack([g, rng.normal(size=(400, 2))])
    r = dci_es(g, codes, capacities=(0, 8, 32))
    assert r.size == pytest.approx(0.5)  # k / d = 2 / 4
    assert r.settings["discrete"] == (True, True)
    assert r.explicitness > 0.9


def test_dci_es_mlp_probe_and_curve_minimum(rng):
    f = rng.uniform(-1, 1, size=(300, 1))
    r = dci_es(f, f, probe="mlp", capacities=(2, 16))
    assert r.settings["probe"] == "mlp" and r.explicitness > 0.8
    flat = np.ones((300, 2))  # constant codes: every probe predicts the train mean, loss >= 1
    with pytest.warns(DegenerateColumnWarning, match="explicitness is undefined"):
        r = dci_es(f, flat, lowest_loss=None)  # the curve's own minimum is the baseline: E undefined
    assert np.isnan(r.explicitness) and r.settings["lowest_loss"] == "curve minimum"
    assert dci_es(f, flat).explicitness == pytest.approx(-1.0, abs=1e-12)  # default l* = 0


# --------------------------------------------------------------------------- #
# MIG
# --------------------------------------------------------------------------- #


def test_mig_duplicated_and_constant_codes_are_zero(rng):
    f = rng.uniform(size=(800, 3))
    assert mig(f, np.hstack([f, f])).score == pytest.approx(0.0, abs=1e-12)  # equal MI: exact 0
    assert mig(f, np.ones((800, 4))).score == pytest.approx(0.0, abs=1e-12)
    g = rng.integers(0, 5, size=(800, 2)).astype(float)
    assert mig(g, np.hstack([g, g])).score == pytest.approx(0.0, abs=1e-12)


def test_mig_perfect_discrete_code_and_settings(rng):
    g = rng.integers(0, 5, size=(2000, 3)).astype(float)
    r = mig(g, 3.0 * g[:, [2, 0, 1]] - 1.0, n_bins=20)
    assert r.score > 0.98  # plug-in MI bias of independent codes ~ 16/(2n) nats
    assert r.mutual_info.shape == (3, 3)
    assert r.settings["n_bins"] == 20 and "equal-width" in r.settings["binning"]
    assert r.settings["discrete"] == (True, True, True)


def test_mig_constant_factor_skipped(rng):
    f = np.column_stack([rng.uniform(size=300), np.zeros(300)])
    with pytest.warns(DegenerateColumnWarning, match=r"'factor 1' is constant"):
        r = mig(f, f[:, :1])
    assert np.isnan(r.factor_gap[1]) and r.score > 0.9


# --------------------------------------------------------------------------- #
# SAP
# --------------------------------------------------------------------------- #


def test_sap_known_answers(rng):
    f = rng.normal(size=(600, 3))
    assert sap(f, f).score > 0.99  # R^2 1 vs chance ~ 1/n
    assert sap(f, np.hstack([f, f])).score == pytest.approx(0.0, abs=1e-12)  # tied top two
    g = rng.integers(0, 4, size=(600, 2)).astype(float)
    r = sap(g, g)
    # balanced accuracy 1 for the right code vs chance 1/4 for the other: gap about 3/4
    assert r.score == pytest.approx(0.75, abs=0.08)
    assert r.score_matrix.shape == (2, 2)
    assert sap(f, f[:, :1]).factor_gap.shape == (3,)  # d=1 works


# --------------------------------------------------------------------------- #
# IRS
# --------------------------------------------------------------------------- #


def test_irs_disentangled_vs_mixed(rng):
    g = rng.integers(0, 5, size=(1500, 3)).astype(float)
    perfect = irs(g, 2.0 * g[:, [1, 2, 0]] + 3.0)
    assert perfect.score == pytest.approx(1.0, abs=1e-9)  # exact: codes constant within groups
    assert list(perfect.parents) == [1, 2, 0]
    mixed = irs(g, g @ np.linalg.qr(rng.normal(size=(3, 3)))[0])
    assert mixed.score < 0.7  # observed about 0.4
    f = rng.uniform(size=(1500, 3))
    cont = irs(f, f)  # continuous factors binned into 20 bins: within-bin spread ~ 1/20
    assert 0.9 < cont.score <= 1.0


def test_irs_constant_code_gets_no_weight(rng):
    g = rng.integers(0, 3, size=(400, 2)).astype(float)
    codes = np.column_stack([g, np.zeros(400)])
    with pytest.warns(DegenerateColumnWarning, match=r"'code 2' is constant"):
        r = irs(g, codes)
    assert r.code_weights[2] == 0.0 and r.score == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------- #
# Leeb et al. interventional assay
# --------------------------------------------------------------------------- #


def test_leeb_identity_autoencoder(rng):
    q = rng.normal(size=(2000, 3)) * np.array([1.0, 2.0, 0.5])
    r = leeb_interventional(lambda x: x, lambda z: z, q)
    off = r.response_matrix - np.diag(np.diag(r.response_matrix))
    assert np.abs(off).max() < 1e-12  # interventions move only their own latent
    # RMS difference of two independent draws = sqrt(2) * sd; 10% sampling tolerance at n=2000
    assert np.allclose(np.diag(r.response_matrix), np.sqrt(2) * np.array([1.0, 2.0, 0.5]), rtol=0.1)
    assert r.self_response_fraction == pytest.approx(1.0, abs=1e-12)
    assert r.score == r.self_response_fraction and r.causal_disentanglement is None


def test_leeb_coupled_latents_respond(rng):
    a = np.array([[1.0, 0.5], [0.0, 1.0]])
    # the encoder is not the decoder's inverse: latent 0 leaks into the response of latent 1
    r = leeb_interventional(lambda x: x, lambda z: z @ a, rng.normal(size=(500, 2)))
    assert r.response_matrix[0, 1] > 0.3 and r.response_matrix[1, 0] < 1e-12
    assert r.self_response_fraction < 0.9


def _traversals(rng, mix: np.ndarray, k: int = 3, n_batches: int = 5):
    """Batches of observations x = g @ mix in which only factor f varies."""
    out = []
    for f in range(k):
        batches = []
        for _ in range(n_batches):
            g = np.repeat(rng.integers(0, 5, size=(1, k)).astype(float), 5, axis=0)
            g[:, f] = np.arange(5)
            batches.append(g @ mix)
        out.append(batches)
    return out


def test_leeb_causal_disentanglement_score(rng):
    mix = np.array([[1.0, 0.3, 0.0], [0.2, 1.0, 0.1], [0.0, 0.4, 1.0]])
    inv = np.linalg.inv(mix)
    codes = rng.integers(0, 5, size=(300, 3)).astype(float)
    trav = _traversals(rng, mix)
    good = leeb_interventional(lambda x: x @ inv, lambda z: z @ mix, codes, traversals=trav)
    assert good.conditioned_response.shape == (3, 3)
    assert good.causal_disentanglement == pytest.approx(1.0, abs=1e-9)  # each latent moves with one factor
    assert good.score == good.causal_disentanglement
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    bad = leeb_interventional(
        lambda x: x @ inv @ rot, lambda z: z @ rot.T @ mix, codes @ rot, traversals=trav
    )
    assert bad.causal_disentanglement < 0.8  # rotated latents each follow several factors


def test_leeb_converts_outputs_and_checks_shapes(rng):
    class Dist:  # a distribution-like object exposing .mean as a property
        def __init__(self, m):
            self._m = m

        @property
        def mean(self):
            return self._m

    q = rng.normal(size=(100, 2))
    r = leeb_interventional(lambda x: Dist(x), lambda z: z, q, n_samples=50)
    assert r.settings["n_samples"] == 50 and r.self_response_fraction == pytest.approx(1.0)
    with pytest.raises(DataError, match="expected"):
        leeb_interventional(lambda x: x[:, :1], lambda z: z, q)
    with pytest.raises(DataError, match="2-D"):
        leeb_interventional(lambda x: x, lambda z: z, q[:, 0])


# --------------------------------------------------------------------------- #
# report and docstrings
# --------------------------------------------------------------------------- #


def test_report_table(rng):
    f = rng.uniform(size=(300, 2))
    codes = np.hstack([f, rng.normal(size=(300, 1))])  # d=3 != k=2
    df = report(f, codes, seed=0)
    assert list(df.columns) == ["metric", "score", "settings"]
    metrics = [
        "mcc", "mcc_spearman", "mcc_weak", "mcc_weak_cca", "mcc_spearman_oos", "dci_disentanglement",
        "dci_completeness", "dci_informativeness_error", "dci_es_explicitness", "dci_es_size", "mig",
        "sap", "irs",
    ]
    assert list(df["metric"]) == metrics
    scores = dict(zip(df["metric"], df["score"]))
    for m in ("mcc", "mcc_spearman", "mcc_weak", "mcc_weak_cca", "mcc_spearman_oos"):
        assert scores[m] == pytest.approx(1.0, abs=1e-6), m  # codes hold exact copies: tol 1e-6
    assert scores["dci_es_size"] == pytest.approx(2 / 3)
    assert all(isinstance(s, dict) for s in df["settings"])
    settings = dict(zip(df["metric"], df["settings"]))
    assert settings["mcc_spearman_oos"]["split"] == 0.3 and settings["mcc_weak_cca"]["variant"] == "weak"

    # with an encoder and a decoder the Leeb et al. assay is added: an identity autoencoder gives 1
    with_leeb = report(f, codes, encoder=lambda x: x, decoder=lambda z: z)
    assert list(with_leeb["metric"]) == metrics + ["leeb_self_response_fraction"]
    assert with_leeb["score"].iloc[-1] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(DataError, match="both encoder and decoder"):
        report(f, codes, encoder=lambda x: x)


def test_docstring_examples_run():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(rep, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- #
# within-group R² (a diagnostic)
# --------------------------------------------------------------------------- #


def test_within_group_r2_matches_the_variance_share(rng):
    # f = group effect + e1 + e2, code = e1 (plus a group shift): within groups the code
    # explains var(e1) / (var(e1) + var(e2)) = 1 / (1 + 0.5^2) = 0.8 of f; a code of the
    # groups alone explains nothing, however well it matches f across groups (MCC ~0.9).
    n, g = 6000, np.repeat(np.arange(6), 1000)
    e1, e2 = rng.normal(size=n), 0.5 * rng.normal(size=n)
    f = (3.0 * g + e1 + e2)[:, None]
    shifted = within_group_r2(f, (e1 - 2.0 * g)[:, None], g)
    assert abs(shifted.score - 0.8) < 0.02  # tolerance: ~4 sd of the estimate at n = 6000
    group_code = (3.0 * g)[:, None].astype(float)
    assert mcc(f, group_code).score > 0.9
    assert abs(within_group_r2(f, group_code, g).score) < 0.01
    # several factors, several codes: one R² per factor, mixing undone by the probe
    f2 = np.column_stack([e1, e2]) + g[:, None]
    mixed = np.column_stack([e1 + e2, e1 - e2])
    res = within_group_r2(f2, mixed, g)
    assert res.per_factor.shape == (2,) and np.all(res.per_factor > 0.99)
    assert res.settings["n_groups"] == 6


def test_within_group_r2_bad_input_names_the_argument(rng):
    f = rng.normal(size=(40, 2))
    with pytest.raises(DataError, match="groups must hold one label per row"):
        within_group_r2(f, f, np.zeros(39))
    with pytest.raises(DataError, match="folds must be >= 2"):
        within_group_r2(f, f, np.zeros(40), folds=1)
    with pytest.raises(DataError, match="but codes has 39"):
        within_group_r2(f, f[:39], np.zeros(40))
    # one row per group: nothing is held out with a group member to centre on (not "constant")
    with pytest.warns(DegenerateColumnWarning, match="no held-out row has a member of its group") as record:
        res = within_group_r2(np.arange(40.0)[:, None], f, np.arange(40))
    assert res.score == 0.0 and res.settings["n_scored"] == 0
    assert not any("constant" in str(w.message) for w in record)
    # a factor fixed by the group: it does not vary within groups
    groups = np.repeat(np.arange(8), 5)
    with pytest.warns(DegenerateColumnWarning, match="'factor 0' does not vary within groups"):
        res = within_group_r2(groups[:, None].astype(float), f, groups)
    assert res.score == 0.0 and res.settings["n_scored"] == 40


# --------------------------------------------------------------------------- #
# edge cases: units, extreme magnitudes, small splits and groups, bad input
# --------------------------------------------------------------------------- #

def _canonical_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Canonical correlations: singular values of Q_a^T Q_b (orthonormal bases of the centred data)."""
    qa, _ = np.linalg.qr(a - a.mean(axis=0))
    qb, _ = np.linalg.qr(b - b.mean(axis=0))
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def test_mcc_weak_cca_does_not_depend_on_units():
    # age in years (sd 10) next to a factor in small units (sd 1e-6): CCA is unit free, but
    # the whitening's relative eigenvalue cut dropped the small-scale factor and code
    rng = np.random.default_rng(0)
    n = 2000
    age = 50.0 + 10.0 * rng.normal(size=n)
    x = 1e-6 * rng.normal(size=n)
    f = np.column_stack([age, x])
    codes = np.column_stack([x + 1e-7 * rng.normal(size=n), rng.normal(size=n)])
    truth = _canonical_correlations(f, codes)  # about (0.995, 0.008)
    r = mcc(f, codes, variant="weak", alignment="cca")
    assert r.corr.shape == (2, 2)
    assert r.score == pytest.approx(truth.mean(), abs=1e-6)  # Pearson in sample: mean canonical corr
    rescaled = mcc(f * np.array([1e-3, 1e6]), codes * np.array([1e6, 1.0]), variant="weak", alignment="cca")
    assert rescaled.score == pytest.approx(r.score, abs=1e-6)


@pytest.mark.parametrize("scale", [1e200, 1e-170])
def test_mcc_pearson_is_scale_free_at_extreme_magnitudes(scale):
    # sums of squares overflowed (1e200) or underflowed (1e-170) and the score came out 0.0
    z = np.random.default_rng(1).normal(size=(200, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        r = mcc(z * scale, z[:, [2, 0, 1]])
    assert r.score == pytest.approx(1.0, abs=1e-9)


def test_mcc_split_with_two_scored_rows_raises():
    # |corr| of two points is always 1: pure noise scored 1.0 out of sample
    rng = np.random.default_rng(2)
    f, c = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    with pytest.raises(DataError, match="at least 3"):
        mcc(f, c, split=0.3, seed=1)
    assert mcc(rng.normal(size=(40, 3)), rng.normal(size=(40, 3)), split=0.3).score < 0.9


def test_within_group_r2_pure_noise_code_does_not_score_above_zero():
    # groups of two, high-dimensional noise code: centring on means over all rows made a
    # held-out row's deviation the negative of its partner's training target, so a probe
    # that memorised its training rows scored R^2 ~0.5 on a code independent of the factor
    scores = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        g = np.repeat(np.arange(100), 2)
        fac, code = rng.normal(size=(200, 1)), rng.normal(size=(200, 300))
        scores.append(within_group_r2(fac, code, g, seed=seed).score)
    assert np.mean(scores) < 0.1  # honest out-of-fold R^2 of an independent code has mean <= 0


def test_within_group_r2_small_groups_keep_the_variance_share():
    # f = 3 g + e1 + e2 with groups of three; the code e1 carries 1 / (1 + 0.5^2) = 0.8 of
    # the within-group variance
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(1000), 3)
    e1, e2 = rng.normal(size=g.size), 0.5 * rng.normal(size=g.size)
    res = within_group_r2((3.0 * g + e1 + e2)[:, None], (e1 - 2.0 * g)[:, None], g)
    assert abs(res.score - 0.8) < 0.03  # ~4 sd of the estimate at n = 3000
    assert res.settings["n_scored"] > 2500


def test_within_group_r2_bad_group_labels_raise_data_error():
    z = np.random.default_rng(4).normal(size=(60, 2))
    with pytest.raises(DataError, match="missing label"):
        within_group_r2(z, z, np.array([np.nan, 1.0, 2.0] * 20))  # NaN was silently one group
    with pytest.raises(DataError, match="groups"):
        within_group_r2(z, z, pd.Series([1, "a", 2.5] * 20, dtype=object))  # raw TypeError from np.unique


def test_input_validation_gives_data_errors():
    z = np.random.default_rng(5).normal(size=(50, 2))
    with pytest.raises(DataError, match="complex"):
        mcc(z + 1j, z)  # the imaginary part was silently dropped
    df = pd.DataFrame(z, columns=["a", "b"]).astype("Float64")
    df.iloc[3, 0] = pd.NA
    with pytest.raises(DataError, match=r"NaN value\(s\) \(first at row 3, column 0\)"):
        mcc(df, z)  # was reported as 'must be numeric'
    with pytest.raises(DataError, match="discrete must hold"):
        mig(z, z, discrete=True)  # raw TypeError


def test_cca_weak_mcc_scores_a_factor_the_code_lost_as_zero():
    z = np.random.default_rng(0).normal(size=(2000, 3))
    lost = np.column_stack([z[:, 0], z[:, 0], z[:, 1]])  # rank 2: factor 2 is not in the code
    r = mcc(z, lost, variant="weak", alignment="cca")
    assert r.score == pytest.approx(2 / 3, abs=0.01)  # two canonical correlations 1, one 0
    assert mcc(z, z @ np.random.default_rng(1).normal(size=(3, 3)), variant="weak", alignment="cca").score \
        == pytest.approx(1.0, abs=1e-9)
    a = z[:, :1]  # duplicated factors are one direction: a code holding it is perfect
    assert mcc(np.hstack([a, a]), z[:, :2], variant="weak", alignment="cca").score == pytest.approx(1.0, abs=1e-9)


def test_a_class_absent_from_the_train_split_does_not_count_against_a_perfect_code():
    from medcausal.metrics.representation import DegenerateColumnWarning, _split_indices, dci, dci_es, sap

    f = (np.arange(200) % 2).astype(float)[:, None]
    _, test = _split_indices(200, 0.3, 0)  # the split all three draw with seed 0
    f[test[0], 0] = 2  # one row of a rare class, in the test split only
    with pytest.warns(DegenerateColumnWarning, match="absent from the train split"):
        err = dci(f, f.copy(), discrete=[True]).informativeness_error
    assert err == pytest.approx(0.0, abs=1e-12)
    with pytest.warns(DegenerateColumnWarning, match="absent from the train split"):
        assert dci_es(f, f.copy(), discrete=[True]).explicitness == pytest.approx(1.0, abs=1e-9)
    with pytest.warns(DegenerateColumnWarning, match="absent from the train split"):
        assert sap(f, f.copy(), discrete=[True]).score == pytest.approx(1.0, abs=1e-12)


def test_leeb_interventional_needs_two_samples():
    from medcausal.metrics.representation import leeb_interventional

    z = np.random.default_rng(0).normal(size=(50, 2))
    for bad in (1, 0, -3, 2.5):
        with pytest.raises(DataError, match="n_samples"):
            leeb_interventional(lambda x: x, lambda v: v, z, n_samples=bad)
