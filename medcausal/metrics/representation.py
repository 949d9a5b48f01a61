"""Metrics for causal representation learning on plain numpy arrays.

Every metric compares the true generative factors ``factors`` (``[n, k]``)
with a learned code ``codes`` (``[n, d]``; ``d`` need not equal ``k``) and
returns a small frozen dataclass holding the score, the matrices behind it and
the settings used, so that a number in a table can always be traced back to
how it was computed.

Factors may be continuous or discrete, declared per column with
``discrete=[True, False, ...]``. By default a column is discrete when it holds
at most 10 distinct values, all of them integers.

=============================  ==============================================
function                       reference
=============================  ==============================================
:func:`mcc`                    mean correlation coefficient (Hyvärinen &
                               Morioka 2016; Khemakhem et al. 2020), strong
                               or weak (after affine regression or CCA)
:func:`dci`                    Eastwood & Williams, ICLR 2018
:func:`dci_from_importance`    D and C of a given importance matrix
:func:`dci_es`                 Eastwood et al., ICLR 2023 (explicitness, size)
:func:`mig`                    Chen et al., NeurIPS 2018
:func:`sap`                    Kumar et al., ICLR 2018
:func:`irs`                    Suter et al., ICML 2019
:func:`leeb_interventional`    Leeb et al., NeurIPS 2022 (latent responses)
:func:`report`                 all of them in one table (Leeb et al. when
                               an encoder and a decoder are given)
:func:`within_group_r2`        a diagnostic: how much of the factors'
                               variation *within* known groups (e.g.
                               experimental conditions) a code carries
=============================  ==============================================

Bad input raises :class:`medcausal.errors.DataError` (a ``ValueError``) whose
message names the array and the problem; degenerate columns (constant codes or
factors) emit :class:`DegenerateColumnWarning` naming the column.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from medcausal.errors import DataError, warn

__all__ = [
    "DegenerateColumnWarning",
    "MCCResult",
    "DCIResult",
    "DCIESResult",
    "MIGResult",
    "SAPResult",
    "IRSResult",
    "LeebResult",
    "WithinGroupR2Result",
    "mcc",
    "dci",
    "dci_from_importance",
    "dci_es",
    "mig",
    "sap",
    "irs",
    "leeb_interventional",
    "report",
    "within_group_r2",
]

#: columns with at most this many distinct integer values are auto-detected as discrete
MAX_DISCRETE_LEVELS = 10


class DegenerateColumnWarning(UserWarning):
    """A factor or code column is constant (or nearly so); its score is set by convention."""


# --------------------------------------------------------------------------- #
# result types
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class MCCResult:
    """Mean correlation coefficient.

    ``corr`` is the absolute correlation matrix ``[k, d]`` the score was read
    from (the test split when ``split`` was given), ``pairs`` the matched
    ``(factor, code)`` index pairs (learned on the train split when ``split``
    was given), ``matched`` the correlation of each pair.
    """

    score: float
    corr: np.ndarray
    pairs: tuple[tuple[int, int], ...]
    matched: np.ndarray
    settings: dict[str, Any]


@dataclass(frozen=True, eq=False)
class WithinGroupR2Result:
    """Cross-validated R² of each factor's within-group deviation from the code's.

    ``per_factor`` holds one R² per factor column; ``score`` is their mean.
    """

    score: float
    per_factor: np.ndarray
    settings: dict[str, Any]


@dataclass(frozen=True, eq=False)
class DCIResult:
    """Disentanglement, completeness and informativeness (as an error).

    ``importance`` is ``R`` with shape ``[d, k]`` (codes x factors).
    ``informativeness_error`` is a normalised test error: 0 is perfect
    prediction of the factors from the code, about 1 is chance level.
    ``score`` is the disentanglement ``D``.
    """

    disentanglement: float
    completeness: float
    informativeness_error: float
    importance: np.ndarray
    code_disentanglement: np.ndarray
    code_weights: np.ndarray
    factor_completeness: np.ndarray
    factor_error: np.ndarray
    settings: dict[str, Any]

    @property
    def score(self) -> float:
        """The headline number: disentanglement ``D``."""
        return self.disentanglement


@dataclass(frozen=True, eq=False)
class DCIESResult:
    """Explicitness (E) and size (S) of DCI-ES.

    ``losses`` is ``[k, m]``: the test loss of each probe (rows: factors,
    columns: increasing capacity); ``curves`` the loss-capacity curves
    actually integrated (running minimum, clipped at the baseline loss 1);
    ``capacity`` the number of trainable parameters of each single-output
    probe and ``capacity_axis`` its normalised log, in ``[0, 1]``.
    ``score`` is the explicitness ``E``.
    """

    explicitness: float
    size: float
    factor_explicitness: np.ndarray
    losses: np.ndarray
    curves: np.ndarray
    capacity: np.ndarray
    capacity_axis: np.ndarray
    settings: dict[str, Any]

    @property
    def score(self) -> float:
        """The headline number: explicitness ``E``."""
        return self.explicitness


@dataclass(frozen=True, eq=False)
class MIGResult:
    """Mutual information gap.

    ``mutual_info`` is ``[d, k]`` in nats; ``factor_entropy`` ``[k]`` in nats;
    ``factor_gap`` the normalised gap of each factor (NaN for a constant factor).
    """

    score: float
    mutual_info: np.ndarray
    factor_entropy: np.ndarray
    factor_gap: np.ndarray
    settings: dict[str, Any]


@dataclass(frozen=True, eq=False)
class SAPResult:
    """Separated attribute predictability.

    ``score_matrix`` is ``[d, k]``: R^2 (continuous factor) or balanced
    accuracy (discrete factor) of predicting each factor from each single code.
    """

    score: float
    score_matrix: np.ndarray
    factor_gap: np.ndarray
    settings: dict[str, Any]


@dataclass(frozen=True, eq=False)
class IRSResult:
    """Interventional robustness score.

    ``irs_matrix`` is ``[d, k]``: robustness of code ``j`` when factor ``i``
    is held fixed and all other factors vary; ``code_irs`` its row maximum,
    ``parents`` the factor attaining it, ``code_weights`` the normaliser of each
    code (its overall spread), used to weight the average.
    """

    score: float
    irs_matrix: np.ndarray
    code_irs: np.ndarray
    parents: np.ndarray
    code_weights: np.ndarray
    settings: dict[str, Any]


@dataclass(frozen=True, eq=False)
class LeebResult:
    """Latent-response assay of an autoencoder.

    ``response_matrix`` is ``[d, d]``: entry ``[j, i]`` is the RMS change of
    response dimension ``i`` when latent ``j`` is intervened upon.
    ``self_response_fraction`` is ``trace(M) / sum(M)``.
    ``conditioned_response`` (``[k, d]``) and ``causal_disentanglement`` are
    set when factor traversals were given. ``score`` is the causal
    disentanglement score when available, else the self-response fraction
    (``settings["score"]`` says which).
    """

    score: float
    response_matrix: np.ndarray
    self_response_fraction: float
    conditioned_response: np.ndarray | None
    causal_disentanglement: float | None
    settings: dict[str, Any]


# --------------------------------------------------------------------------- #
# input checking
# --------------------------------------------------------------------------- #


def _as_2d(x: Any, name: str, what: str) -> tuple[np.ndarray, list[str]]:
    """Return a float ``[n, p]`` array and column names, or raise DataError."""
    if isinstance(x, pd.DataFrame):
        names = [str(c) for c in x.columns]
        try:  # pandas' missing values (pd.NA of nullable dtypes) become NaN, reported below
            values: Any = x.to_numpy(dtype=float, na_value=np.nan)
        except (TypeError, ValueError):
            values = x.to_numpy()
    else:
        names = []
        values = x
    if np.iscomplexobj(values):
        raise DataError(f"{name} must be real; it holds complex numbers")
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be numeric; could not convert it to floats ({exc})") from None
    if arr.ndim != 2:
        raise DataError(
            f"{name} must be a 2-D array [n, {what}]; got shape {arr.shape}. "
            f"Pass a single column as {name}[:, None]."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{name} is empty (shape {arr.shape})")
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        rows, cols = np.nonzero(np.isnan(arr))
        raise DataError(
            f"{name} contains {n_nan} NaN value(s) (first at row {rows[0]}, column {cols[0]}); "
            "drop or impute them first"
        )
    n_inf = int(np.isinf(arr).sum())
    if n_inf:
        raise DataError(f"{name} contains {n_inf} infinite value(s)")
    if not names:
        prefix = "factor" if name == "factors" else "code"
        names = [f"{prefix} {i}" for i in range(arr.shape[1])]
    return arr, names


def _check_pair(factors: Any, codes: Any, min_n: int = 4):
    f, fnames = _as_2d(factors, "factors", "k")
    c, cnames = _as_2d(codes, "codes", "d")
    if f.shape[0] != c.shape[0]:
        raise DataError(
            f"factors has {f.shape[0]} rows but codes has {c.shape[0]}; "
            "rows must be the same samples, aligned"
        )
    if f.shape[0] < min_n:
        raise DataError(f"need at least {min_n} samples; got {f.shape[0]}")
    return f, fnames, c, cnames


def _resolve_discrete(f: np.ndarray, discrete: Sequence[bool] | None) -> tuple[bool, ...]:
    k = f.shape[1]
    if discrete is None:
        out = []
        for j in range(k):
            col = f[:, j]
            out.append(
                bool(np.all(np.mod(col, 1.0) == 0.0)) and np.unique(col).size <= MAX_DISCRETE_LEVELS
            )
        return tuple(out)
    try:
        flags = tuple(bool(b) for b in discrete)
    except TypeError:
        raise DataError(f"discrete must hold one True/False per factor column ({k}); got {discrete!r}") from None
    if len(flags) != k:
        raise DataError(f"discrete has {len(flags)} entries but factors has {k} columns")
    return flags


def _split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < float(test_size) < 1.0:
        raise DataError(f"test fraction must lie in (0, 1); got {test_size}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * float(test_size)))
    n_test = min(max(n_test, 2), n - 2)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu = train.mean(axis=0)
    sd = train.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return [(a - mu) / sd for a in (train, *others)]


def _warn_constant(kind: str, name: str, what: str) -> None:
    warn(
        f"{kind} column {name!r} is constant; {what}", DegenerateColumnWarning
    )


def _bin_equal_width(col: np.ndarray, n_bins: int) -> np.ndarray:
    """Integer labels of equal-width bins over the column's observed [min, max]."""
    lo, hi = float(col.min()), float(col.max())
    if hi <= lo:
        return np.zeros(col.shape[0], dtype=int)
    edges = np.linspace(lo, hi, n_bins + 1)
    return np.digitize(col, edges[1:-1], right=False)


def _labels(col: np.ndarray) -> np.ndarray:
    return np.unique(col, return_inverse=True)[1]


# --------------------------------------------------------------------------- #
# MCC
# --------------------------------------------------------------------------- #


def _abs_corr(
    a: np.ndarray, b: np.ndarray, a_names: list[str], b_names: list[str], method: str,
    a_kind: str = "factors", b_kind: str = "codes",
) -> np.ndarray:
    """Absolute correlation matrix ``[a_cols, b_cols]``; constant columns give 0."""
    const_a = np.ptp(a, axis=0) == 0
    const_b = np.ptp(b, axis=0) == 0
    for i in np.nonzero(const_a)[0]:
        _warn_constant(a_kind, a_names[i], "its correlations are set to 0")
    for i in np.nonzero(const_b)[0]:
        _warn_constant(b_kind, b_names[i], "its correlations are set to 0")
    if method == "spearman":
        a = rankdata(a, axis=0)
        b = rankdata(b, axis=0)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    # correlation is scale free: rescale by the largest deviation so the sums of
    # squares below neither overflow (huge values) nor underflow (tiny ones)
    a_max, b_max = np.abs(a).max(axis=0), np.abs(b).max(axis=0)
    a = a / np.where(a_max > 0, a_max, 1.0)
    b = b / np.where(b_max > 0, b_max, 1.0)
    na = np.sqrt((a * a).sum(axis=0))
    nb = np.sqrt((b * b).sum(axis=0))
    na_safe = np.where(const_a | (na == 0), np.inf, na)
    nb_safe = np.where(const_b | (nb == 0), np.inf, nb)
    corr = (a.T @ b) / np.outer(na_safe, nb_safe)
    return np.clip(np.abs(corr), 0.0, 1.0)


def _inv_sqrt_psd(cov: np.ndarray, rel_tol: float = 1e-10) -> np.ndarray:
    """``cov^{-1/2}`` on the range of a PSD matrix (null directions map to 0)."""
    w, v = np.linalg.eigh(cov)
    keep = w > rel_tol * max(float(w.max()), 1e-300)
    inv = np.zeros_like(w)
    inv[keep] = 1.0 / np.sqrt(w[keep])
    return (v * inv) @ v.T


def _cca_variates(f: np.ndarray, c: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical variates ``(f @ A, c @ B)`` of all rows, directions learned on ``train``.

    ``A`` and ``B`` whiten factors and codes (train covariance) and rotate them
    by the singular vectors of the whitened cross-covariance, so variate ``i``
    of the factors and of the codes have the ``i``-th canonical correlation
    on the train rows. ``min(k, d)`` variates (fewer if a side is rank deficient;
    :func:`mcc` then scores the missing ones as 0).
    """
    mf, mc = f[train].mean(axis=0), c[train].mean(axis=0)
    # unit train variance first: canonical variates do not depend on the columns' units,
    # but the relative eigenvalue cut of _inv_sqrt_psd would drop a small-scale column
    sf, sc = f[train].std(axis=0), c[train].std(axis=0)
    sf, sc = np.where(sf > 0, sf, 1.0), np.where(sc > 0, sc, 1.0)
    f, c = (f - mf) / sf, (c - mc) / sc
    fc, cc = f[train], c[train]
    m = train.size
    wf = _inv_sqrt_psd(fc.T @ fc / m)
    wc = _inv_sqrt_psd(cc.T @ cc / m)
    u, _, vt = np.linalg.svd(wf @ (fc.T @ cc / m) @ wc)
    r = min(np.linalg.matrix_rank(wf), np.linalg.matrix_rank(wc))
    r = max(r, 1)
    a = wf @ u[:, :r]
    b = wc @ vt.T[:, :r]
    return f @ a, c @ b


def mcc(
    factors: Any,
    codes: Any,
    *,
    method: str = "pearson",
    variant: str = "strong",
    alignment: str = "affine",
    split: float | None = None,
    seed: int = 0,
) -> MCCResult:
    """Mean correlation coefficient between factors and their best-matched codes.

    The absolute correlation matrix ``|corr(factor_i, code_j)|`` (``k x d``,
    Pearson or Spearman) is matched one-to-one with the Hungarian algorithm
    (:func:`scipy.optimize.linear_sum_assignment`, rectangular allowed, so
    ``min(k, d)`` pairs), and the score is the mean over the ``k`` factors of
    their matched correlation, a factor left without a code (``d < k``)
    counting 0. ``variant="strong"`` uses the codes as they are (identity up
    to permutation and elementwise rescaling). ``variant="weak"`` scores
    identity up to an affine map, with one of two alignments:
    ``alignment="affine"`` (default) maps the codes to the factors by an
    affine least-squares regression ``factors ~ codes @ A + b`` and scores the
    regressed codes; ``alignment="cca"`` projects both factors and codes on
    their ``min(k, d)`` canonical directions (canonical correlation analysis,
    as in Khemakhem et al.'s evaluation code) and scores the canonical
    variates of the codes against those of the factors (for Pearson, in
    sample, the score is the mean canonical correlation; directions a narrower or
    rank-deficient code cannot reach count as 0, over ``k'``, the factors' rank).
    With ``split`` (a
    test fraction) the matching and the alignment are learned on a random
    train split and the score is read on the held-out split (out-of-sample
    MCC).

    Example:
        >>> import numpy as np
        >>> from medcausal.metrics.representation import mcc
        >>> z = np.random.default_rng(0).normal(size=(500, 3))
        >>> r = mcc(z, 2.0 * z[:, [2, 0, 1]] + 1.0)
        >>> round(r.score, 6), r.pairs
        (1.0, ((0, 1), (1, 2), (2, 0)))
    """
    if method not in ("pearson", "spearman"):
        raise DataError(f"method must be 'pearson' or 'spearman'; got {method!r}")
    if variant not in ("strong", "weak"):
        raise DataError(f"variant must be 'strong' or 'weak'; got {variant!r}")
    if alignment not in ("affine", "cca"):
        raise DataError(f"alignment must be 'affine' or 'cca'; got {alignment!r}")
    f, fnames, c, cnames = _check_pair(factors, codes)
    n = f.shape[0]
    if split is None:
        train = test = np.arange(n)
    else:
        train, test = _split_indices(n, split, seed)
        if min(train.size, test.size) < 3:  # |corr| of two points is always 1
            raise DataError(
                f"split={split} of {n} samples leaves {train.size} train and {test.size} test rows; "
                "out-of-sample MCC needs at least 3 of each"
            )

    y, ynames, ykind = f, fnames, "factors"
    z, znames, zkind = c, cnames, "codes"
    if variant == "weak" and alignment == "affine":
        design = np.hstack([c, np.ones((n, 1))])
        coef, *_ = np.linalg.lstsq(design[train], f[train], rcond=None)
        z = design @ coef
        znames = [f"affine estimate of {nm}" for nm in fnames]
        zkind = "aligned codes"
    elif variant == "weak":
        for i in np.nonzero(np.ptp(f[train], axis=0) == 0)[0]:
            _warn_constant("factors", fnames[i], "it is left out of the canonical directions")
        for i in np.nonzero(np.ptp(c[train], axis=0) == 0)[0]:
            _warn_constant("codes", cnames[i], "it is left out of the canonical directions")
        y, z = _cca_variates(f, c, train)
        ynames = [f"canonical variate {i} of factors" for i in range(y.shape[1])]
        znames = [f"canonical variate {i} of codes" for i in range(z.shape[1])]
        ykind, zkind = "canonical factors", "canonical codes"

    with warnings.catch_warnings():
        if variant == "weak" and alignment == "cca":  # constant inputs were reported above
            warnings.simplefilter("ignore", DegenerateColumnWarning)
        corr_train = _abs_corr(y[train], z[train], ynames, znames, method, a_kind=ykind, b_kind=zkind)
        rows, cols = linear_sum_assignment(corr_train, maximize=True)
        if split is None:
            corr_eval = corr_train
        else:
            corr_eval = _abs_corr(y[test], z[test], ynames, znames, method, a_kind=ykind, b_kind=zkind)
    matched = corr_eval[rows, cols]
    # Every factor is scored: one left without a code (fewer codes than factors, or a code of
    # lower rank with fewer canonical directions) counts as correlation 0, not as absent, so
    # the variants agree and a code that copies two of four factors scores 0.5, not 1.
    scored = f.shape[1]
    if variant == "weak" and alignment == "cca":  # the factors' own directions
        fs = f[train] - f[train].mean(axis=0)
        fs = fs / np.where(fs.std(axis=0) > 0, fs.std(axis=0), 1.0)
        scored = int(np.linalg.matrix_rank(fs))
    matched = np.concatenate([matched, np.zeros(max(0, scored - matched.size))])
    settings = {
        "method": method,
        "variant": variant,
        "split": split,
        "seed": seed if split is not None else None,
        "n_train": int(train.size),
        "n_eval": int(test.size),
        "matching": "Hungarian (scipy.optimize.linear_sum_assignment) on |corr|"
        + (" of the train split" if split is not None else ""),
        "weak_alignment": None if variant == "strong" else (
            "affine least-squares regression of factors on codes" if alignment == "affine"
            else "CCA: both projected on their min(k, d) canonical directions"
        ),
    }
    return MCCResult(
        score=float(matched.mean()),
        corr=corr_eval,
        pairs=tuple((int(i), int(j)) for i, j in zip(rows, cols)),
        matched=matched,
        settings=settings,
    )


def within_group_r2(factors: Any, codes: Any, groups: Any, *, folds: int = 3, seed: int = 0
                    ) -> WithinGroupR2Result:
    """How much of the factors' variation *within* each group the code carries.

    Both arrays are centred on their group means (``groups``: one label per row, e.g.
    the experimental condition), then each factor's deviation is predicted from the
    code's deviations by a ridge regression (scikit-learn's ``RidgeCV`` on standardized
    codes), out of fold (``folds``-fold, shuffled with ``seed``), and scored by R². The
    group means are estimated on the training folds only, so a held-out row's value
    never enters the training targets (centring on all rows would let a probe that
    memorises its training rows score above 0 on a code of pure noise); a held-out
    row whose group has no member in the training folds is not scored. A
    code that only labels the groups scores 0, whatever its MCC: the diagnostic tells
    a representation of the units apart from a representation of their conditions.
    Not a published metric; a linear probe, so a nonlinear encoding scores lower.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> g = np.repeat(np.arange(4), 250)
    >>> f = g[:, None] + rng.normal(size=(1000, 1))
    >>> round(within_group_r2(f, f - g[:, None], g).score, 3)   # the units themselves
    1.0
    >>> abs(within_group_r2(f, g[:, None] * 1.0, g).score) < 0.01  # a code of the groups
    True
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f, fnames, c, _ = _check_pair(factors, codes, min_n=2 * max(int(folds), 2))
    labels = np.asarray(groups)
    if labels.ndim != 1 or len(labels) != len(f):
        raise DataError(f"groups must hold one label per row ({len(f)}); got shape {labels.shape}")
    if int(folds) < 2:
        raise DataError(f"folds must be >= 2; got {folds}")
    missing = np.asarray(pd.isna(labels), dtype=bool)
    if missing.any():
        raise DataError(
            f"groups contains {int(missing.sum())} missing label(s) (first at row "
            f"{int(np.argmax(missing))}); drop those rows or give them a label"
        )
    try:
        _, group = np.unique(labels, return_inverse=True)
    except TypeError as exc:
        raise DataError(f"groups must hold labels of one comparable type; got mixed labels ({exc})") from None
    group = group.reshape(-1)
    n_groups = int(group.max()) + 1

    def group_means(a, rows):
        """Per-group means of ``a`` over ``rows`` and the number of rows of each group."""
        sums = np.zeros((n_groups, a.shape[1]))
        np.add.at(sums, group[rows], a[rows])
        count = np.bincount(group[rows], minlength=n_groups)
        return sums / np.maximum(count, 1)[:, None], count

    pred, fw = np.zeros_like(f), np.zeros_like(f)
    scored = np.zeros(len(f), dtype=bool)
    for train, test in KFold(int(folds), shuffle=True, random_state=seed).split(c):
        mf, count = group_means(f, train)
        mc, _ = group_means(c, train)
        test = test[count[group[test]] > 0]
        probe = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        probe.fit(c[train] - mc[group[train]], f[train] - mf[group[train]])
        if test.size:
            pred[test] = probe.predict(c[test] - mc[group[test]]).reshape(test.size, -1)
            fw[test] = f[test] - mf[group[test]]
            scored[test] = True
    f_all, _ = group_means(f, np.arange(len(f)))
    sst_all = ((f - f_all[group]) ** 2).sum(0)
    sst = (fw[scored] ** 2).sum(0)
    r2 = np.zeros(f.shape[1])
    if not scored.any():
        warn(f"within_group_r2: no held-out row has a member of its group in the training folds ({len(f)} "
             f"rows in {n_groups} groups: too few rows per group for {int(folds)} folds); the score is set to 0",
             DegenerateColumnWarning)
    for j in range(f.shape[1] if scored.any() else 0):
        if sst_all[j] <= 1e-12 * max(1.0, float((f[:, j] ** 2).sum())) or sst[j] <= 0:
            warn(f"factor column {fnames[j]!r} does not vary within groups (on the held-out rows); its "
                 f"within-group R² is set to 0", DegenerateColumnWarning)
        else:
            r2[j] = 1.0 - float(((pred[scored, j] - fw[scored, j]) ** 2).sum()) / float(sst[j])
    settings = {"probe": "ridge (RidgeCV, alphas 1e-3..1e3) on standardized within-group code deviations",
                "centring": "group means of the training folds",
                "folds": int(folds), "seed": int(seed), "n_groups": n_groups,
                "n_scored": int(scored.sum())}
    return WithinGroupR2Result(score=float(r2.mean()), per_factor=r2, settings=settings)


# --------------------------------------------------------------------------- #
# DCI
# --------------------------------------------------------------------------- #


def _dci_parts(r: np.ndarray):
    """Per-code D, code weights, per-factor C for an importance matrix ``[d, k]``."""
    d, k = r.shape
    total = r.sum()
    row_sum = r.sum(axis=1)
    col_sum = r.sum(axis=0)

    code_d = np.zeros(d)
    for i in range(d):
        if row_sum[i] <= 0:
            continue
        if k == 1:
            code_d[i] = 1.0
            continue
        p = r[i] / row_sum[i]
        p = p[p > 0]
        code_d[i] = 1.0 + float((p * np.log(p)).sum()) / math.log(k)
    weights = row_sum / total

    fac_c = np.zeros(k)
    for j in range(k):
        if col_sum[j] <= 0:
            continue  # factor captured by no code: completeness 0 by convention
        if d == 1:
            fac_c[j] = 1.0
            continue
        p = r[:, j] / col_sum[j]
        p = p[p > 0]
        fac_c[j] = 1.0 + float((p * np.log(p)).sum()) / math.log(d)
    return code_d, weights, fac_c


def dci_from_importance(importance: Any) -> tuple[float, float]:
    """Disentanglement and completeness of an importance matrix ``R`` (``d`` codes x ``k`` factors).

    ``D = sum_i rho_i (1 - H_k(P_i.))`` with ``P_ij = R_ij / sum_j R_ij`` and
    ``rho_i = sum_j R_ij / sum R``; ``C = mean_j (1 - H_d(P~_.j))`` with
    ``P~_ij = R_ij / sum_i R_ij`` (Eastwood & Williams 2018). Entropies use
    base ``k`` and ``d`` respectively; a factor no code explains has C 0.

    Example:
        >>> import numpy as np
        >>> from medcausal.metrics.representation import dci_from_importance
        >>> dci_from_importance(np.eye(4))
        (1.0, 1.0)
    """
    r, _ = _as_2d(importance, "importance", "k")
    if np.any(r < 0):
        raise DataError(f"importance has {int((r < 0).sum())} negative entries; it must be >= 0")
    if r.sum() <= 0:
        raise DataError("importance is all zeros; D and C are undefined")
    code_d, weights, fac_c = _dci_parts(r)
    return float((weights * code_d).sum()), float(fac_c.mean())


def _logreg_uses_l1_ratio() -> bool:
    """scikit-learn >= 1.8 deprecates ``penalty``; L1 is then ``l1_ratio=1``."""
    import inspect

    from sklearn.linear_model import LogisticRegression

    return inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated"


def _l1_logistic(c_reg: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    common = dict(C=c_reg, solver="saga", max_iter=2000, tol=1e-3, random_state=seed)
    if _logreg_uses_l1_ratio():
        return LogisticRegression(l1_ratio=1.0, **common)
    return LogisticRegression(penalty="l1", **common)


def _seen_classes(y_train: np.ndarray, y_test: np.ndarray, name: str) -> np.ndarray:
    """Mask of the test rows whose class the train split has. A probe cannot predict a class it
    never saw, so those rows would score a perfect code as wrong: they are left out (warned)."""
    keep = np.isin(y_test, np.unique(y_train))
    if not keep.all():
        warn(f"factor {name!r}: {int((~keep).sum())} test row(s) of class(es) "
             f"{sorted(np.unique(y_test[~keep]).tolist())[:5]} absent from the train split are left out "
             "of its score", DegenerateColumnWarning)
    return keep


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    if y_true.size == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # predicted classes absent from the test split
        return float(balanced_accuracy_score(y_true, y_pred))


def _classification_error(y_train: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, name: str) -> float:
    """``(1 - balanced accuracy) / (1 - 1/K)`` on the test rows of the ``K`` train classes:
    0 perfect, about 1 at chance."""
    keep = _seen_classes(y_train, y_true, name)
    bal = _balanced_accuracy(y_true[keep], y_pred[keep])
    return float((1.0 - bal) / (1.0 - 1.0 / np.unique(y_train).size))


def _regression_error(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """``mean squared error / variance`` on the test split (``1 - R^2``)."""
    var = float(np.var(y_true))
    if var <= 0:
        return float("nan")
    return float(np.mean((y_true - y_pred) ** 2) / var)


def dci(
    factors: Any,
    codes: Any,
    *,
    model: str = "lasso",
    discrete: Sequence[bool] | None = None,
    test_size: float = 0.3,
    seed: int = 0,
    alpha: float = 0.02,
    n_estimators: int = 50,
    max_depth: int = 3,
) -> DCIResult:
    """Disentanglement, completeness, informativeness (Eastwood & Williams, ICLR 2018).

    For every factor a predictor is fitted from the (train-standardised)
    codes on a train split: ``model="lasso"`` uses :class:`~sklearn.linear_model.Lasso`
    (penalty ``alpha``) on a standardised continuous factor and an L1 logistic
    regression (``C = 1 / (alpha * n_train)``, the same penalty scale) on a
    discrete one, with importance ``|coef|`` (summed over classes);
    ``model="gbt"`` uses scikit-learn gradient boosting (regressor or
    classifier) with importance ``feature_importances_``. The importance
    matrix ``R`` (``d x k``) gives D and C as in :func:`dci_from_importance`.
    ``informativeness_error`` is the mean over factors of a normalised
    test-split error: ``MSE / Var`` (= ``1 - R^2``) for continuous factors and
    ``(1 - balanced accuracy) / (1 - 1/K)`` for discrete ones; 0 is perfect,
    about 1 is no information.

    Example:
        >>> import numpy as np
        >>> from medcausal.metrics.representation import dci
        >>> z = np.random.default_rng(0).uniform(size=(400, 3))
        >>> r = dci(z, z[:, [1, 2, 0]])
        >>> r.disentanglement > 0.99, r.completeness > 0.99, r.informativeness_error < 0.01
        (True, True, True)
    """
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor
    from sklearn.linear_model import Lasso

    if model not in ("lasso", "gbt"):
        raise DataError(f"model must be 'lasso' or 'gbt'; got {model!r}")
    f, fnames, c, _ = _check_pair(factors, codes, min_n=8)
    disc = _resolve_discrete(f, discrete)
    train, test = _split_indices(f.shape[0], test_size, seed)
    x_tr, x_te = _standardize(c[train], c[test])
    d, k = c.shape[1], f.shape[1]

    imp = np.zeros((d, k))
    err = np.full(k, np.nan)
    for j in range(k):
        y_tr, y_te = f[train, j], f[test, j]
        if disc[j]:
            classes = np.unique(y_tr)
            if classes.size < 2:
                _warn_constant("factors", fnames[j], "it gets no importance and no error")
                continue
            if model == "lasso":
                est = _l1_logistic(1.0 / (alpha * train.size), seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # saga ConvergenceWarning on easy problems
                    est.fit(x_tr, y_tr)
                imp[:, j] = np.abs(est.coef_).sum(axis=0)
            else:
                est = GradientBoostingClassifier(
                    n_estimators=n_estimators, max_depth=max_depth, random_state=seed
                ).fit(x_tr, y_tr)
                imp[:, j] = est.feature_importances_
            err[j] = _classification_error(y_tr, y_te, est.predict(x_te), fnames[j])
        else:
            sd = float(y_tr.std())
            if sd <= 0:
                _warn_constant("factors", fnames[j], "it gets no importance and no error")
                continue
            mu = float(y_tr.mean())
            ys_tr, ys_te = (y_tr - mu) / sd, (y_te - mu) / sd
            if model == "lasso":
                est = Lasso(alpha=alpha, max_iter=10_000).fit(x_tr, ys_tr)
                imp[:, j] = np.abs(est.coef_)
            else:
                est = GradientBoostingRegressor(
                    n_estimators=n_estimators, max_depth=max_depth, random_state=seed
                ).fit(x_tr, ys_tr)
                imp[:, j] = est.feature_importances_
            err[j] = _regression_error(ys_te, est.predict(x_te))

    if imp.sum() <= 0:
        warn(
            "no code has any importance for any factor; D and C are set to 0",
            DegenerateColumnWarning
        )
        code_d, weights, fac_c = np.zeros(d), np.zeros(d), np.zeros(k)
    else:
        code_d, weights, fac_c = _dci_parts(imp)
    settings = {
        "model": model,
        "discrete": disc,
        "test_size": test_size,
        "seed": seed,
        "n_train": int(train.size),
        "n_test": int(test.size),
        "importance": "|coef| on standardised codes" if model == "lasso" else "feature_importances_",
        "error": "continuous: MSE/Var on test; discrete: (1 - balanced acc)/(1 - 1/K) on test",
    }
    if model == "lasso":
        settings["alpha"] = alpha
    else:
        settings.update(n_estimators=n_estimators, max_depth=max_depth)
    return DCIResult(
        disentanglement=float((weights * code_d).sum()),
        completeness=float(fac_c.mean()),
        informativeness_error=float(np.nanmean(err)) if np.any(~np.isnan(err)) else float("nan"),
        importance=imp,
        code_disentanglement=code_d,
        code_weights=weights,
        factor_completeness=fac_c,
        factor_error=err,
        settings=settings,
    )


# --------------------------------------------------------------------------- #
# DCI-ES: explicitness and size
# --------------------------------------------------------------------------- #

_DEFAULT_CAPACITIES = {"rff": (0, 4, 16, 64, 256), "mlp": (2, 8, 32, 128)}


def _explicitness_from_curve(x: np.ndarray, losses: np.ndarray, lowest: float | None):
    """E = 1 - AULCC / Z on a normalised capacity axis ``x`` in [0, 1].

    Returns (E, curve). ``curve`` is the running minimum of the losses clipped
    at the baseline loss 1; ``AULCC`` the trapezoid area between the curve and
    the lowest loss; ``Z`` the triangle between the baseline loss at the lowest
    capacity and the lowest loss at the highest capacity: ``(1 - lowest) / 2``.
    """
    curve = np.minimum.accumulate(np.minimum(losses, 1.0))
    ell_star = float(curve.min()) if lowest is None else float(lowest)
    ell_star = min(ell_star, float(curve.min()))
    height = 1.0 - ell_star
    if height <= 1e-3:  # no probe beats the baseline: explicitness undefined
        return float("nan"), curve
    gap = curve - ell_star
    area = float(np.sum(0.5 * (gap[1:] + gap[:-1]) * np.diff(x)))
    return 1.0 - area / (0.5 * height), curve


def dci_es(
    factors: Any,
    codes: Any,
    *,
    discrete: Sequence[bool] | None = None,
    probe: str = "rff",
    capacities: Sequence[int] | None = None,
    test_size: float = 0.3,
    seed: int = 0,
    lowest_loss: float | None = 0.0,
) -> DCIESResult:
    """Explicitness (E) and size (S) of DCI-ES (Eastwood et al., ICLR 2023).

    **Explicitness** measures how much probe capacity is needed to read each
    factor out of the code. A family of probes of increasing capacity is fitted
    per factor on a train split and scored on the test split with a loss whose
    trivial-predictor baseline is 1: ``1 - R^2`` for continuous factors,
    ``(1 - balanced accuracy) / (1 - 1/K)`` for discrete ones. Probe families:

    * ``probe="rff"`` (default): a linear model (ridge / logistic regression)
      on the standardised codes plus the first ``m`` random Fourier features
      of an RBF kernel (:class:`sklearn.kernel_approximation.RBFSampler`,
      ``gamma = 1/d``), ``m`` in ``capacities`` (default ``0, 4, 16, 64, 256``;
      ``m = 0`` is the plain linear probe). The family is nested.
    * ``probe="mlp"``: one-hidden-layer scikit-learn MLPs of width in
      ``capacities`` (default ``2, 8, 32, 128``).

    Capacity is the number of trainable parameters of a single-output probe,
    on a log axis rescaled to ``[0, 1]`` (as the paper's MLP curves). The
    loss-capacity curve is the running minimum of the test losses (best probe
    up to that capacity), clipped at the baseline 1. With ``l*`` the lowest
    loss, ``AULCC`` the area between curve and ``l*``, and ``Z = (1 - l*) / 2``
    the area of the triangle from the baseline at the lowest capacity to
    ``l*`` at the highest, ``E_j = 1 - AULCC / Z``; ``E`` in ``[-1, 1]`` is 1
    when the smallest probe already attains ``l*``, 0 for a linear descent and
    -1 when no probe beats the baseline. ``lowest_loss`` sets ``l*``: the
    default 0.0 is the loss of a perfect read-out (factors that are a function
    of the data), common to all representations so their E are comparable and
    stable; ``lowest_loss=None`` uses each curve's own minimum instead (as the
    authors' evaluation script does), which ignores how informative the code
    is and leaves E undefined (NaN, with a warning) when no probe beats the
    baseline by 0.001. ``E`` averages the defined per-factor values.

    **Size** is ``S = k / d``, the number of factors over the number of code
    dimensions: 1 for a code exactly as large as the factors, smaller for
    larger codes (above 1 when the code has fewer dimensions than factors).

    Example:
        >>> import numpy as np
        >>> from medcausal.metrics.representation import dci_es
        >>> z = np.random.default_rng(0).uniform(-1, 1, size=(400, 2))
        >>> r = dci_es(z, z @ np.array([[1.0, 0.5], [-0.5, 1.0]]))
        >>> r.explicitness > 0.95, r.size
        (True, 1.0)
    """
    from sklearn.kernel_approximation import RBFSampler
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    if probe not in _DEFAULT_CAPACITIES:
        raise DataError(f"probe must be 'rff' or 'mlp'; got {probe!r}")
    caps = tuple(int(m) for m in (capacities if capacities is not None else _DEFAULT_CAPACITIES[probe]))
    if len(caps) < 2 or any(b <= a for a, b in zip(caps, caps[1:])):
        raise DataError(f"capacities must be at least two strictly increasing values; got {caps}")
    if (probe == "rff" and caps[0] < 0) or (probe == "mlp" and caps[0] < 1):
        raise DataError(f"capacities out of range for probe {probe!r}: {caps}")
    if lowest_loss is not None and not 0.0 <= float(lowest_loss) < 1.0:
        raise DataError(f"lowest_loss must lie in [0, 1) (the baseline loss is 1); got {lowest_loss}")
    f, fnames, c, _ = _check_pair(factors, codes, min_n=8)
    disc = _resolve_discrete(f, discrete)
    train, test = _split_indices(f.shape[0], test_size, seed)
    x_tr, x_te = _standardize(c[train], c[test])
    d, k = c.shape[1], f.shape[1]

    if probe == "rff":
        n_params = np.array([d + m + 1 for m in caps], dtype=float)
        m_max = caps[-1]
        if m_max > 0:
            sampler = RBFSampler(gamma=1.0 / d, n_components=m_max, random_state=seed).fit(x_tr)
            # RBFSampler scales features by sqrt(2 / m_max); rescale to unit variance
            rff_tr = sampler.transform(x_tr) * math.sqrt(m_max)
            rff_te = sampler.transform(x_te) * math.sqrt(m_max)
        else:  # pragma: no cover - caps strictly increasing from >= 0 means m_max > 0
            rff_tr = np.zeros((x_tr.shape[0], 0))
            rff_te = np.zeros((x_te.shape[0], 0))
    else:
        n_params = np.array([d * w + w + w + 1 for w in caps], dtype=float)
    logp = np.log(n_params)
    axis = (logp - logp[0]) / (logp[-1] - logp[0])

    losses = np.full((k, len(caps)), np.nan)
    curves = np.full((k, len(caps)), np.nan)
    e_per = np.full(k, np.nan)
    for j in range(k):
        y_tr, y_te = f[train, j], f[test, j]
        if disc[j]:
            n_cls = np.unique(y_tr).size
            if n_cls < 2:
                _warn_constant("factors", fnames[j], "its explicitness is undefined (NaN)")
                continue
        else:
            sd = float(y_tr.std())
            if sd <= 0:
                _warn_constant("factors", fnames[j], "its explicitness is undefined (NaN)")
                continue
            mu = float(y_tr.mean())
            y_tr, y_te = (y_tr - mu) / sd, (y_te - mu) / sd
        for t, m in enumerate(caps):
            if probe == "rff":
                xt = np.hstack([x_tr, rff_tr[:, :m]])
                xe = np.hstack([x_te, rff_te[:, :m]])
                est = (LogisticRegression(C=10.0, max_iter=2000) if disc[j] else Ridge(alpha=1.0))
            else:
                xt, xe = x_tr, x_te
                cls = MLPClassifier if disc[j] else MLPRegressor
                est = cls(hidden_layer_sizes=(m,), max_iter=1000, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning of small probes
                est.fit(xt, y_tr)
            pred = est.predict(xe)
            losses[j, t] = (
                _classification_error(y_tr, y_te, pred, fnames[j]) if disc[j] else _regression_error(y_te, pred)
            )
        e_per[j], curves[j] = _explicitness_from_curve(axis, losses[j], lowest_loss)
        if np.isnan(e_per[j]):
            warn(
                f"factors column {fnames[j]!r}: no probe beats the baseline loss by 0.001; "
                "its explicitness is undefined (NaN)",
                DegenerateColumnWarning
            )
    defined = ~np.isnan(e_per)
    settings = {
        "probe": probe,
        "capacities": caps,
        "capacity_measure": "trainable parameters of a single-output probe, log axis rescaled to [0, 1]",
        "loss": "continuous: 1 - R^2; discrete: (1 - balanced acc)/(1 - 1/K); baseline 1",
        "lowest_loss": "curve minimum" if lowest_loss is None else float(lowest_loss),
        "normaliser": "triangle (1 - lowest loss) / 2",
        "discrete": disc,
        "test_size": test_size,
        "seed": seed,
        "size": "k / d",
    }
    return DCIESResult(
        explicitness=float(e_per[defined].mean()) if defined.any() else float("nan"),
        size=float(k) / float(d),
        factor_explicitness=e_per,
        losses=losses,
        curves=curves,
        capacity=n_params,
        capacity_axis=axis,
        settings=settings,
    )


# --------------------------------------------------------------------------- #
# MIG
# --------------------------------------------------------------------------- #


def mig(
    factors: Any,
    codes: Any,
    *,
    discrete: Sequence[bool] | None = None,
    n_bins: int = 20,
) -> MIGResult:
    """Mutual information gap (Chen et al., NeurIPS 2018).

    Each code column is discretised into ``n_bins`` equal-width bins over its
    observed ``[min, max]``; continuous factors are binned the same way and
    discrete factors used as labels. ``I(code_i; factor_j)`` is
    :func:`sklearn.metrics.mutual_info_score` (nats); for each factor the gap
    between its two most informative codes is divided by the factor's entropy
    ``H(factor_j)``, and MIG is the mean gap. A constant factor (zero entropy)
    is skipped with a warning; with a single code the second MI is 0.

    The binned (plug-in) estimate falls short of 1 for a perfect code in small
    samples: codes equal to 3 Gaussian factors score 0.79 at 200 rows, 0.90 at
    500 and 0.99 at 5000; compare codes at the same ``n``.

    Example:
        >>> import numpy as np
        >>> from medcausal.metrics.representation import mig
        >>> z = np.random.default_rng(0).uniform(size=(1000, 2))
        >>> round(mig(z, np.hstack([z, z])).score, 6)   # duplicated codes: no gap
        0.0
    """
    from sklearn.metrics import mutual_info_score

    if int(n_bins) < 2:
        raise DataError(f"n_bins must be >= 2; got {n_bins}")
    f, fnames, c, cnames = _check_pair(factors, codes)
    disc = _resolve_discrete(f, discrete)
    d, k = c.shape[1], f.shape[1]
    cb = [_bin_equal_width(c[:, i], n_bins) for i in range(d)]
    fb = [_labels(f[:, j]) if disc[j] else _bin_equal_width(f[:, j], n_bins) for j in range(k)]
    mi = np.array([[mutual_info_score(fb[j], cb[i]) for j in range(k)] for i in range(d)])
    ent = np.array([mutual_info_score(fb[j], fb[j]) for j in range(k)])
    gap = np.full(k, np.nan)
    for j in range(k):
        if ent[j] <= 0:
            _warn_constant("factors", fnames[j], "it has zero entropy and is left out of MIG")
            continue
        top = np.sort(mi[:, j])[::-1]
        second = top[1] if d > 1 else 0.0
        gap[j] = (top[0] - second) / ent[j]
    settings = {
        "n_bins": int(n_bins),
        "binning": "equal-width bins over each column's observed [min, max] (codes and continuous factors)",
        "discrete": disc,
        "mutual_info": "sklearn.metrics.mutual_info_score, nats",
        "normalisation": "factor entropy",
    }
    score = float(np.nanmean(gap)) if np.any(~np.isnan(gap)) else float("nan")
    return MIGResult(score=score, mutual_info=mi, factor_entropy=ent, factor_gap=gap, settings=settings)


# --------------------------------------------------------------------------- #
# SAP
# --------------------------------------------------------------------------- #


def sap(
    factors: Any,
    codes: Any,
    *,
    discrete: Sequence[bool] | None = None,
    test_size: float = 0.3,
    seed: int = 0,
) -> SAPResult:
    """Separated attribute predictability (Kumar et al., ICLR 2018).

    Score matrix ``S`` (``d x k``): for a continuous factor, the R^2 of the
    one-variable linear regression of the factor on code ``i`` (the squared
    Pearson correlation, on all samples); for a discrete factor, the balanced
    accuracy on a test split of a threshold classifier on code ``i`` alone (a
    decision tree with ``K`` leaves, i.e. ``K - 1`` thresholds, fitted on the
    train split). SAP is the mean over factors of the gap between the two
    largest entries of the factor's column. As in the paper, the two kinds sit on
    different scales: an uninformative code scores 0 for a continuous factor but
    ``1/K`` (chance) for a discrete one, so a perfect code's gap is near 1 for a
    continuous factor and near ``1 - 1/K`` for a ``K``-class one; compare SAP
    scores across codes of the same factors, not across factor sets.

    Example:
        >>> import numpy as np
        >>> from medcausal.metrics.representation import sap
        >>> z = np.random.default_rng(0).normal(size=(500, 3))
        >>> sap(z, z).score > 0.95
        True
    """
    from sklearn.tree import DecisionTreeClassifier

    f, fnames, c, cnames = _check_pair(factors, codes, min_n=8)
    disc = _resolve_discrete(f, discrete)
    d, k = c.shape[1], f.shape[1]
    s = np.zeros((d, k))
    cont = [j for j in range(k) if not disc[j]]
    if cont:
        s[:, cont] = _abs_corr(f[:, cont], c, [fnames[j] for j in cont], cnames, "pearson").T ** 2
    if any(disc):
        train, test = _split_indices(f.shape[0], test_size, seed)
        for j in (j for j in range(k) if disc[j]):
            y_tr, y_te = f[train, j], f[test, j]
            n_cls = np.unique(y_tr).size
            if n_cls < 2:
                _warn_constant("factors", fnames[j], "its SAP scores are 0")
                continue
            keep = _seen_classes(y_tr, y_te, fnames[j])
            for i in range(d):
                tree = DecisionTreeClassifier(max_leaf_nodes=max(n_cls, 2), random_state=seed)
                tree.fit(c[train, i : i + 1], y_tr)
                s[i, j] = _balanced_accuracy(y_te[keep], tree.predict(c[test[keep], i : i + 1]))
    top = np.sort(s, axis=0)[::-1]
    gap = top[0] - (top[1] if d > 1 else 0.0)
    settings = {
        "discrete": disc,
        "continuous_score": "R^2 of 1-D linear regression (squared Pearson correlation), all samples",
        "discrete_score": "balanced accuracy of a K-leaf decision tree on one code, test split",
        "test_size": test_size if any(disc) else None,
        "seed": seed if any(disc) else None,
    }
    return SAPResult(score=float(gap.mean()), score_matrix=s, factor_gap=gap, settings=settings)


# --------------------------------------------------------------------------- #
# IRS
# --------------------------------------------------------------------------- #


def irs(
    factors: Any,
    codes: Any,
    *,
    discrete: Sequence[bool] | None = None,
    n_bins: int = 20,
    quantile: float = 0.99,
    min_group: int = 2,
) -> IRSResult:
    """Interventional robustness score (Suter et al., ICML 2019), estimated from data.

    The paper's ``IRS(L | I) = 1 - EMPIDA(L | I, J) / EMPIDA_max(L)``: how far
    a code ``z_L`` moves when the nuisance factors ``J`` change while the
    factors ``I`` it should encode are held fixed, relative to how far it moves
    at most. The empirical estimator used here (one code ``L = {j}``, one
    factor ``I = {i}``, all other factors as ``J``):

    1. Factors are grouped by value: discrete factors as they are, continuous
       factors in ``n_bins`` equal-width bins. Within a group ``g_i`` the
       factor ``i`` is (approximately) fixed and the others vary as observed.
    2. ``PIDA`` within a group is the ``quantile`` (default 0.99, a robust
       supremum) of ``|z_j - E[z_j | g_i]|``; ``EMPIDA(j | i)`` averages it over
       groups weighted by their frequency (groups with fewer than
       ``min_group`` samples are skipped).
    3. ``EMPIDA_max(j)`` is the same quantile of ``|z_j - E[z_j]|`` (no factor
       fixed). ``IRS[j, i] = 1 - EMPIDA(j | i) / EMPIDA_max(j)``, clipped to
       ``[0, 1]``.
    4. Each code's score is its best factor (``parents``); the overall IRS is
       their average weighted by ``EMPIDA_max(j)``, so constant codes count 0.

    The estimator is biased upward in small samples: a high quantile over a small
    group is smaller than over all rows, so a code independent of every factor
    still scores above 0 (3 uniform factors, Gaussian noise codes: 0.35 at 200
    rows, 0.11 at 1000, 0.025 at 5000). Compare codes at the same ``n``, against
    such a noise code.

    Example:
        >>> import numpy as np
        >>> from medcausal.metrics.representation import irs
        >>> g = np.random.default_rng(0).integers(0, 5, size=(1000, 3)).astype(float)
        >>> round(irs(g, 2 * g + 1).score, 6)
        1.0
    """
    if not 0.0 < float(quantile) <= 1.0:
        raise DataError(f"quantile must lie in (0, 1]; got {quantile}")
    if int(n_bins) < 2:
        raise DataError(f"n_bins must be >= 2; got {n_bins}")
    f, fnames, c, cnames = _check_pair(factors, codes)
    disc = _resolve_discrete(f, discrete)
    d, k = c.shape[1], f.shape[1]
    q = 100.0 * float(quantile)

    dev_max = np.percentile(np.abs(c - c.mean(axis=0)), q, axis=0)
    dev = np.zeros((d, k))
    for i in range(k):
        labels = _labels(f[:, i]) if disc[i] else _bin_equal_width(f[:, i], n_bins)
        total_w = 0.0
        for g in np.unique(labels):
            members = labels == g
            size = int(members.sum())
            if size < min_group:
                continue
            zg = c[members]
            dev[:, i] += size * np.percentile(np.abs(zg - zg.mean(axis=0)), q, axis=0)
            total_w += size
        if total_w > 0:
            dev[:, i] /= total_w
        else:
            dev[:, i] = dev_max  # no usable group: no robustness evidence
    safe = np.where(dev_max > 0, dev_max, np.inf)
    m = np.clip(1.0 - dev / safe[:, None], 0.0, 1.0)
    for j in np.nonzero(dev_max <= 0)[0]:
        _warn_constant("codes", cnames[j], "it gets IRS 0 and weight 0")
        m[j] = 0.0
    code_irs = m.max(axis=1)
    parents = m.argmax(axis=1)
    if dev_max.sum() > 0:
        score = float(np.average(code_irs, weights=dev_max))
    else:
        score = 0.0
    settings = {
        "discrete": disc,
        "n_bins": int(n_bins),
        "binning": "continuous factors: equal-width bins over observed [min, max]",
        "quantile": float(quantile),
        "min_group": int(min_group),
        "estimator": "1 - E_g[quantile |z - E[z|g]|] / quantile |z - E[z]|, weighted by code spread",
    }
    return IRSResult(
        score=score, irs_matrix=m, code_irs=code_irs, parents=parents, code_weights=dev_max,
        settings=settings,
    )


# --------------------------------------------------------------------------- #
# Leeb et al. latent responses
# --------------------------------------------------------------------------- #


def _to_numpy(out: Any, what: str) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        mean = getattr(out, "mean", None)
        if mean is not None and not callable(mean):  # a distribution: use its mean
            out = mean
        if hasattr(out, "detach"):
            out = out.detach().cpu().numpy()
    arr = np.asarray(out, dtype=float)
    if arr.ndim != 2:
        raise DataError(f"{what} must return a 2-D array [batch, d]; got shape {arr.shape}")
    if np.isnan(arr).any():
        raise DataError(f"{what} returned {int(np.isnan(arr).sum())} NaN value(s)")
    return arr


def _derangement(m: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point (each sample takes another's value)."""
    perm = rng.permutation(m)
    out = np.empty(m, dtype=int)
    out[perm] = np.roll(perm, 1)
    return out


def leeb_interventional(
    encoder: Callable[[np.ndarray], Any],
    decoder: Callable[[np.ndarray], Any],
    codes: Any,
    *,
    traversals: Sequence[Sequence[Any]] | None = None,
    n_samples: int | None = None,
    seed: int = 0,
) -> LeebResult:
    """Latent-response interventional assay of an autoencoder (Leeb et al., NeurIPS 2022).

    The *response* of a latent vector is ``r(z) = encoder(decoder(z))``.
    Intervening on latent ``j`` replaces ``z_j`` by the ``z_j`` of another
    sample of ``codes`` (a draw from its aggregate-posterior marginal; a
    random derangement, so no sample keeps its own value). The **response
    matrix** ``M[j, i]`` is the root-mean-square change of response
    dimension ``i`` under the intervention on ``j``:
    ``sqrt(mean_n (r(z~)_i - r(z)_i)^2)``. Off-diagonal mass means the decoder
    and encoder tie latents together; ``self_response_fraction = trace(M) /
    sum(M)`` is 1 when each intervention only moves its own latent.

    The paper's **causal disentanglement score** needs factor traversals:
    ``traversals[f]`` is a sequence of observation batches (each ``[m, ...]``,
    ``m >= 2``) in which only true factor ``f`` varies. Each batch is encoded,
    interventions are drawn from the batch's own codes, and the diagonal of
    its response matrix is averaged over batches to give the conditioned
    response ``C[f, j]`` (``k x d``); the score is
    ``sum_j max_f C[f, j] / sum C``: 1 when every latent responds only to
    variation of a single factor.

    ``encoder`` maps an observation batch to ``[m, d]``; ``decoder`` maps
    ``[m, d]`` to an observation batch. Both take and return numpy arrays
    (torch tensors and distributions with a ``.mean`` are converted); wrap a
    torch model as ``lambda x: model.encode(torch.as_tensor(x)).detach().numpy()``.

    Example:
        >>> import numpy as np
        >>> from medcausal.metrics.representation import leeb_interventional
        >>> q = np.random.default_rng(0).normal(size=(200, 3))
        >>> r = leeb_interventional(lambda x: x, lambda z: z, q)   # identity autoencoder
        >>> round(r.self_response_fraction, 6)
        1.0
    """
    z, _ = _as_2d(codes, "codes", "d")
    if z.shape[0] < 2:
        raise DataError("codes needs at least 2 samples to draw interventions from")
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer))
                                  or n_samples < 2):
        raise DataError(f"n_samples must be an integer >= 2 (rows to draw interventions from), got {n_samples!r}")
    rng = np.random.default_rng(seed)
    if n_samples is not None and int(n_samples) < z.shape[0]:
        z = z[np.sort(rng.choice(z.shape[0], size=int(n_samples), replace=False))]
    d = z.shape[1]

    def response(v: np.ndarray) -> np.ndarray:
        out = _to_numpy(encoder(decoder(v)), "encoder(decoder(z))")
        if out.shape != v.shape:
            raise DataError(f"encoder(decoder(z)) returned shape {out.shape}; expected {v.shape}")
        return out

    base = response(z)
    mat = np.zeros((d, d))
    for j in range(d):
        z_int = z.copy()
        z_int[:, j] = z[_derangement(z.shape[0], rng), j]
        mat[j] = np.sqrt(np.mean((response(z_int) - base) ** 2, axis=0))
    total = float(mat.sum())
    self_frac = float(np.trace(mat) / total) if total > 0 else float("nan")

    cond = None
    cds = None
    if traversals is not None:
        if len(traversals) == 0:
            raise DataError("traversals is empty; give one sequence of batches per factor")
        cond = np.zeros((len(traversals), d))
        for fi, batches in enumerate(traversals):
            diags = []
            for b, batch in enumerate(batches):
                q = _to_numpy(encoder(batch), f"encoder (traversals[{fi}][{b}])")
                if q.shape[1] != d:
                    raise DataError(
                        f"encoder returned {q.shape[1]} latents for traversals[{fi}][{b}]; codes has {d}"
                    )
                if q.shape[0] < 2:
                    raise DataError(f"traversals[{fi}][{b}] has {q.shape[0]} sample(s); need >= 2")
                r0 = response(q)
                diag = np.zeros(d)
                for j in range(d):
                    q_int = q.copy()
                    q_int[:, j] = q[_derangement(q.shape[0], rng), j]
                    diag[j] = np.sqrt(np.mean((response(q_int)[:, j] - r0[:, j]) ** 2))
                diags.append(diag)
            if not diags:
                raise DataError(f"traversals[{fi}] holds no batches")
            cond[fi] = np.mean(diags, axis=0)
        csum = float(cond.sum())
        cds = float(cond.max(axis=0).sum() / csum) if csum > 0 else float("nan")

    settings = {
        "n_samples": int(z.shape[0]),
        "seed": seed,
        "intervention": "z_j replaced by z_j of another sample (random derangement)",
        "response": "encoder(decoder(z))",
        "distance": "root-mean-square change per response dimension",
        "score": "causal_disentanglement" if cds is not None else "self_response_fraction",
    }
    return LeebResult(
        score=cds if cds is not None else self_frac,
        response_matrix=mat,
        self_response_fraction=self_frac,
        conditioned_response=cond,
        causal_disentanglement=cds,
        settings=settings,
    )


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #


def report(
    factors: Any,
    codes: Any,
    discrete: Sequence[bool] | None = None,
    seed: int = 0,
    *,
    encoder: Callable[[np.ndarray], Any] | None = None,
    decoder: Callable[[np.ndarray], Any] | None = None,
) -> pd.DataFrame:
    """All metrics in one table with columns ``metric``, ``score``, ``settings``.

    Rows: ``mcc`` (Pearson, strong, in sample), ``mcc_spearman``,
    ``mcc_weak`` (Pearson after the affine alignment), ``mcc_weak_cca``
    (Pearson after CCA), ``mcc_spearman_oos`` (Spearman, matched on 70 % of
    the rows, scored on the other 30 %), ``dci_disentanglement``,
    ``dci_completeness``, ``dci_informativeness_error`` (lasso DCI),
    ``dci_es_explicitness``, ``dci_es_size`` (RFF probes), ``mig``, ``sap``,
    ``irs``; each with the settings of the call that produced it. When both
    ``encoder`` and ``decoder`` are given (callables as in
    :func:`leeb_interventional`, taking and returning arrays), a last row
    ``leeb_self_response_fraction`` is added (the latent-response assay on
    ``codes``). Defaults of each metric are used; ``seed`` is passed to every
    randomised one.

    Example:
        >>> import numpy as np
        >>> from medcausal.metrics.representation import report
        >>> z = np.random.default_rng(0).uniform(size=(300, 2))
        >>> list(report(z, z)["metric"])[:3]
        ['mcc', 'mcc_spearman', 'mcc_weak']
    """
    f, _, c, _ = _check_pair(factors, codes, min_n=10)  # the out-of-sample MCC scores >= 3 rows
    disc = _resolve_discrete(f, discrete)
    if (encoder is None) != (decoder is None):
        raise DataError("give both encoder and decoder (for the Leeb et al. assay) or neither")
    rows: list[tuple[str, float, dict[str, Any]]] = []
    r_mcc = mcc(f, c)
    rows.append(("mcc", r_mcc.score, r_mcc.settings))
    r_mccs = mcc(f, c, method="spearman")
    rows.append(("mcc_spearman", r_mccs.score, r_mccs.settings))
    r_weak = mcc(f, c, variant="weak")
    rows.append(("mcc_weak", r_weak.score, r_weak.settings))
    with warnings.catch_warnings():  # constant columns were already reported by the rows above
        warnings.simplefilter("ignore", DegenerateColumnWarning)
        r_cca = mcc(f, c, variant="weak", alignment="cca")
        r_oos = mcc(f, c, method="spearman", split=0.3, seed=seed)
    rows.append(("mcc_weak_cca", r_cca.score, r_cca.settings))
    rows.append(("mcc_spearman_oos", r_oos.score, r_oos.settings))
    r_dci = dci(f, c, discrete=disc, seed=seed)
    rows.append(("dci_disentanglement", r_dci.disentanglement, r_dci.settings))
    rows.append(("dci_completeness", r_dci.completeness, r_dci.settings))
    rows.append(("dci_informativeness_error", r_dci.informativeness_error, r_dci.settings))
    r_es = dci_es(f, c, discrete=disc, seed=seed)
    rows.append(("dci_es_explicitness", r_es.explicitness, r_es.settings))
    rows.append(("dci_es_size", r_es.size, r_es.settings))
    r_mig = mig(f, c, discrete=disc)
    rows.append(("mig", r_mig.score, r_mig.settings))
    r_sap = sap(f, c, discrete=disc, seed=seed)
    rows.append(("sap", r_sap.score, r_sap.settings))
    r_irs = irs(f, c, discrete=disc)
    rows.append(("irs", r_irs.score, r_irs.settings))
    if encoder is not None:
        r_leeb = leeb_interventional(encoder, decoder, c, n_samples=1000, seed=seed)
        rows.append(("leeb_self_response_fraction", r_leeb.self_response_fraction, r_leeb.settings))
    return pd.DataFrame(
        {"metric": [r[0] for r in rows], "score": [float(r[1]) for r in rows], "settings": [r[2] for r in rows]}
    )
