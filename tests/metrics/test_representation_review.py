"""Review tests for medcausal.metrics.representation: each one failed before its fix.

Ground truths are analytic or independent (canonical correlations from QR + SVD);
tolerances are stated next to each assertion.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from medcausal.errors import DataError
from medcausal.metrics.representation import mcc, mig, within_group_r2


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


# ----------------------------------------------------------------- review, session 15
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
