"""Metrics for predicted single-cell responses (CPA / FCR / scPerturb conventions).

All expression metrics work on log-normalized expression, ``log1p(counts / total * 1e4)``
(:func:`log_normalize`), per gene. :func:`r2_mean`, :func:`r2_var`, :func:`lfc_r2` and
:func:`e_distance` take it as given (apply :func:`log_normalize` to counts first);
:func:`top_degs`, :func:`counterfactual_error` and :func:`evaluate_condition` take counts
and normalize them:

* :func:`r2_mean`, :func:`r2_var`: R² (``sklearn.metrics.r2_score``, true as reference)
  between the per-gene means (variances) of the true and the predicted population,
  on all genes or a subset such as the top DEGs;
* :func:`lfc_r2`: R² of the log-fold changes against a control population;
* :func:`top_degs`: differentially expressed genes from scanpy's
  ``rank_genes_groups`` against the control, per context;
* :func:`e_distance`: the energy distance (Székely, Euclidean by default; scPerturb's
  E-distance is ``metric="sqeuclidean"``) between two populations,
  :func:`medcausal.metrics.distribution.mmd` for the MMD;
* :func:`counterfactual_error`: per-cell error of predicted against true
  counterfactual counts (a simulator's ground truth);
* :func:`nmi`: normalized mutual information between a k-means clustering of a
  latent block and labels (context or treatment).

:func:`evaluate_condition` computes them all for one predicted condition.
MCC of learned vs true latents is :func:`medcausal.metrics.representation.mcc`.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> true = rng.poisson(5.0, size=(200, 30)).astype(float)
>>> round(r2_mean(log_normalize(true), log_normalize(true)), 6)
1.0
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.spatial.distance import cdist
from sklearn.metrics import normalized_mutual_info_score, r2_score

from ..errors import DataError
from .distribution import mmd

__all__ = ["CounterfactualCountError", "counterfactual_error", "e_distance", "evaluate_condition",
           "lfc_r2", "log_normalize", "nmi", "r2_mean", "r2_var", "top_degs"]


def _dense(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "layers") and hasattr(x, "X"):
        raise DataError(f"{what}: pass an array (e.g. adata.layers['counts']), not an AnnData")
    try:
        arr = np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=float)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be a numeric [cells, genes] array") from None
    if arr.ndim != 2:
        raise DataError(f"{what} must be a 2-D [cells, genes] array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{what} has NaN or infinite values")
    return arr


def log_normalize(counts: Any, target_sum: float = 1e4) -> np.ndarray:
    """``log1p(counts / total_counts * target_sum)`` per cell (scanpy's normalize_total + log1p).

    >>> log_normalize(np.array([[1.0, 3.0]]), target_sum=4.0).round(4).tolist()
    [[0.6931, 1.3863]]
    """
    x = _dense(counts, "counts")
    if (x < 0).any():
        raise DataError("counts must be non-negative (log_normalize takes raw counts)")
    return _normalize_log1p(x, target_sum)


def _normalize_log1p(x, target_sum: float):
    """Each row scaled to ``target_sum`` in total, then ``log1p``: dense or sparse (kept sparse)."""
    total = np.asarray(x.sum(1), dtype=np.float64).ravel()
    scale = target_sum / np.where(total > 0, total, 1.0)
    if not sparse.issparse(x):
        return np.log1p(x * scale[:, None])
    x = sparse.csr_matrix(sparse.diags(scale) @ x)
    x.data = np.log1p(x.data)
    return x


def _pair(true, pred, genes, what="pred", true_what="true"):
    t, p = _dense(true, true_what), _dense(pred, what)
    if t.shape[1] != p.shape[1]:
        raise DataError(f"{true_what} has {t.shape[1]} genes but {what} has {p.shape[1]}")
    if len(t) == 0 or len(p) == 0:
        raise DataError(f"{true_what} and {what} need at least one cell each, got {len(t)} and {len(p)}")
    if genes is not None:
        genes = np.asarray(genes)
        if genes.dtype != bool and not np.issubdtype(genes.dtype, np.integer):
            raise DataError(f"genes must be integer gene indices (or a boolean mask), got dtype {genes.dtype}")
        if genes.dtype != bool and genes.size and not (-t.shape[1] <= genes.min() and genes.max() < t.shape[1]):
            raise DataError(f"genes holds indices outside 0..{t.shape[1] - 1}")
        if genes.dtype == bool and genes.shape != (t.shape[1],):
            raise DataError(f"genes mask has shape {genes.shape} but there are {t.shape[1]} genes")
        t, p = t[:, genes], p[:, genes]
    if t.shape[1] < 2:
        raise DataError("R² needs at least 2 genes")
    return t, p


def r2_mean(true: Any, pred: Any, genes: Sequence[int] | None = None) -> float:
    """R² between per-gene means of the true and predicted populations (true as reference),
    on the values given (log-normalized expression: :func:`log_normalize` counts first).

    >>> t = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 4.0]]); p = t + [0.0, 0.0, 1.0]
    >>> round(r2_mean(t, p), 4)   # means (0, 1, 3) vs (0, 1, 4): 1 - 1 / 4.6667
    0.7857
    """
    t, p = _pair(true, pred, genes)
    return float(r2_score(t.mean(0), p.mean(0)))


def r2_var(true: Any, pred: Any, genes: Sequence[int] | None = None) -> float:
    """R² between per-gene variances of the true and predicted populations (of the values
    given: log-normalized expression).

    >>> t = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 4.0]])
    >>> r2_var(t, t)
    1.0
    """
    t, p = _pair(true, pred, genes)
    if len(t) < 2 or len(p) < 2:
        raise DataError(f"r2_var needs at least 2 cells in true and pred, got {len(t)} and {len(p)}")
    return float(r2_score(t.var(0), p.var(0)))


def lfc_r2(true: Any, pred: Any, control: Any, genes: Sequence[int] | None = None) -> float:
    """R² between true and predicted log-fold changes: the mean difference against ``control``
    of the values given, which must be log-normalized (:func:`log_normalize`) to be log-fold changes.

    >>> c = np.zeros((2, 3)); t = np.array([[1.0, 0.0, -1.0]] * 2)
    >>> lfc_r2(t, t * 0.5, c)   # lfc (1, 0, -1) vs (.5, 0, -.5): 1 - 0.5 / 2
    0.75
    """
    _pair(true, control, None, what="control")  # same genes as true
    t, p = _pair(true, pred, genes)
    c, _ = _pair(control, control, genes, what="control", true_what="control")
    return float(r2_score(t.mean(0) - c.mean(0), p.mean(0) - c.mean(0)))


def e_distance(x: Any, y: Any, metric: str = "euclidean", max_points: int = 2000,
               seed: int = 0) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two samples.

    ``metric="euclidean"`` gives Székely's energy distance (a metric between
    distributions, zero iff they are equal); ``"sqeuclidean"`` the variant scPerturb
    and pertpy report as E-distance. Means run over all pairs (a V-statistic: never
    negative, exactly 0 for identical samples). Each sample is subsampled to
    ``max_points`` rows (fixed seed).

    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(400, 2)), rng.normal(size=(400, 2)) + [3.0, 0.0]
    >>> e = e_distance(a, b, metric="sqeuclidean")   # population value 2 * 3^2 = 18
    >>> e_distance(a, a[::-1]), bool(abs(e - 18) < 1.5)
    (0.0, True)
    """
    if metric not in ("euclidean", "sqeuclidean"):
        raise DataError(f"e_distance: metric must be 'euclidean' or 'sqeuclidean', got {metric!r}")
    X, Y = _dense(x, "x"), _dense(y, "y")
    if X.shape[1] != Y.shape[1]:
        raise DataError(f"e_distance: x has {X.shape[1]} dimensions but y has {Y.shape[1]}")
    if len(X) < 2 or len(Y) < 2:
        raise DataError("e_distance: need at least 2 points in each sample")
    if int(max_points) < 2:
        raise DataError(f"e_distance: max_points must be >= 2, got {max_points}")
    rng = np.random.default_rng(seed)
    if len(X) > max_points:
        X = X[np.sort(rng.choice(len(X), max_points, replace=False))]
    if len(Y) > max_points:
        Y = Y[np.sort(rng.choice(len(Y), max_points, replace=False))]

    value = (2.0 * cdist(X, Y, metric=metric).mean() - cdist(X, X, metric=metric).mean()
             - cdist(Y, Y, metric=metric).mean())
    return float(max(value, 0.0))


@dataclass(frozen=True)
class CounterfactualCountError:
    """Per-cell error of predicted against true counterfactual counts.

    ``rmse``: mean over cells of the per-cell RMSE on log-normalized expression;
    ``per_cell``: those RMSEs; ``mae_counts``: mean absolute count error;
    ``pearson``: mean per-cell Pearson correlation of the predicted and true
    *changes* (counterfactual minus factual, log-normalized) when ``factual`` is given,
    over the cells whose true change varies across genes: a cell the intervention leaves
    unchanged has no correlation to score and is left out (NaN when no cell changes);
    a cell predicted not to change (while it truly does) scores 0.
    ``float(err)`` gives ``rmse``.
    """

    rmse: float
    per_cell: np.ndarray = field(repr=False)
    mae_counts: float
    pearson: float | None = None

    def __float__(self) -> float:
        return float(self.rmse)


def counterfactual_error(true_counts: Any, pred_counts: Any, factual: Any | None = None
                         ) -> CounterfactualCountError:
    """Per-cell counterfactual error against the true counterfactual counts of the same cells.

    >>> t = np.array([[1.0, 3.0], [2.0, 2.0]])
    >>> err = counterfactual_error(t, t)
    >>> err.rmse, err.mae_counts
    (0.0, 0.0)
    """
    t, p = _pair(true_counts, pred_counts, None)
    if len(t) != len(p):
        raise DataError(f"true has {len(t)} cells but pred has {len(p)}: pass the same cells")
    lt, lp = log_normalize(t), log_normalize(p)
    per_cell = np.sqrt(((lt - lp) ** 2).mean(1))
    pearson = None
    if factual is not None:
        f = _dense(factual, "factual")
        if f.shape != t.shape:
            raise DataError(f"factual has shape {f.shape} but true has {t.shape}: pass the same cells and genes")
        f = log_normalize(f)
        dt, dp = lt - f, lp - f
        dt = dt - dt.mean(1, keepdims=True)
        dp = dp - dp.mean(1, keepdims=True)
        # A cell whose true change is the same on every gene (a zero-change cell: its counterfactual
        # is its factual, up to library size) has no correlation to score: it is left out. A
        # predicted change that is flat where the true one is not scores 0.
        scale = 1e-9 * (1.0 + np.abs(lt).max(1) + np.abs(f).max(1))  # float noise of log_normalize
        changed = np.abs(dt).max(1) > scale
        flat_pred = np.abs(dp).max(1) <= scale
        den = np.sqrt((dt ** 2).sum(1) * (dp ** 2).sum(1))
        r = np.where(flat_pred, 0.0, (dt * dp).sum(1) / np.where(flat_pred | (den == 0), 1.0, den))
        pearson = float(r[changed].mean()) if changed.any() else math.nan
    return CounterfactualCountError(rmse=float(per_cell.mean()), per_cell=per_cell,
                                    mae_counts=float(np.abs(t - p).mean()), pearson=pearson)


def nmi(latent: Any, labels: Any, n_clusters: int | None = None, seed: int = 0) -> float:
    """NMI between a k-means clustering of ``latent`` and ``labels`` (k = number of labels).

    >>> rng = np.random.default_rng(0)
    >>> z = np.r_[rng.normal(0, 0.1, (50, 2)), rng.normal(5, 0.1, (50, 2))]
    >>> nmi(z, ["a"] * 50 + ["b"] * 50), round(nmi(z, ["a", "b"] * 50), 2)
    (1.0, 0.0)
    """
    from sklearn.cluster import KMeans

    z = _dense(latent, "latent")
    lab = np.asarray(labels).astype(str)
    if len(lab) != len(z):
        raise DataError(f"nmi: {len(lab)} labels for {len(z)} cells")
    k = int(n_clusters or len(np.unique(lab)))
    if k < 2:
        raise DataError("nmi: need at least 2 label values (or n_clusters >= 2)")
    if k > len(z):
        raise DataError(f"nmi: n_clusters={k} exceeds the number of cells ({len(z)})")
    z = (z - z.mean(0)) / np.where(z.std(0) > 0, z.std(0), 1.0)
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
    return float(normalized_mutual_info_score(lab, clusters))


def _log_normalized_rows(mat: Any, rows: np.ndarray, target_sum: float = 1e4, chunk: int = 10_000):
    """``log_normalize`` of ``mat[rows]`` (counts, checked by the caller) as a float32 CSR matrix,
    read ``chunk`` rows at a time (a backed or sparse matrix is never densified whole)."""
    blocks = []
    for start in range(0, len(rows), chunk):
        block = sparse.csr_matrix(mat[rows[start:start + chunk]], dtype=np.float64)
        blocks.append(_normalize_log1p(block, target_sum).astype(np.float32))
    return sparse.vstack(blocks, format="csr") if blocks else sparse.csr_matrix((0, mat.shape[1]), dtype=np.float32)


def top_degs(adata, groupby: str, reference: str, n_genes: int = 20, context_key: str | None = None,
             layer: str | None = "counts", method: str = "t-test") -> dict[tuple[str, str], np.ndarray]:
    """Top ``n_genes`` DEGs (gene indices) of every group against ``reference``, per context.

    Runs ``scanpy.tl.rank_genes_groups`` on log-normalized counts within each value of
    ``context_key`` (all cells when None), ranking genes by the absolute score
    (``rankby_abs``, as CPA and GEARS do), so a knocked-down gene counts as much as an
    induced one. Keys are ``(context, group)`` (context ``"all"`` when None); groups with
    fewer than 2 cells, and every group of a context with fewer than 2 reference cells, are
    skipped with a warning naming them. Genes constant over a group's and the reference's cells
    are never returned (so fewer than ``n_genes`` may come back). The counts are read in
    row chunks of the cells compared, kept sparse (backed data is streamed, not densified).

    >>> import anndata as ad, pandas as pd
    >>> counts = np.tile([[5.0, 5.0, 5.0]], (8, 1)); counts[4:, 1] = 0.0; counts[4:, 2] = 9.0
    >>> counts[::2, 0] += 1.0
    >>> a = ad.AnnData(counts, obs=pd.DataFrame({"p": ["c"] * 4 + ["k"] * 4}, index=list("abcdefgh")))
    >>> top_degs(a, "p", "c", n_genes=2, layer=None)[("all", "k")].tolist()  # gene 1 knocked down
    [1, 2]
    """
    import anndata as ad
    import scanpy as sc

    from ..adapters.singlecell import check_counts

    if layer is not None and layer not in adata.layers:
        raise DataError(f"top_degs: no layer {layer!r} (have {list(adata.layers)}); layer=None uses adata.X")
    for arg, key in (("groupby", groupby), ("context_key", context_key)):
        if key is not None and key not in adata.obs:
            raise DataError(f"top_degs: {arg} {key!r} is not a column of adata.obs (have {list(adata.obs)})")
    mat = adata.X if layer is None else adata.layers[layer]
    check_counts(mat, where="X" if layer is None else f"layers[{layer!r}]")
    contexts = (np.full(adata.n_obs, "all", dtype=object) if context_key is None
                else adata.obs[context_key].astype(str).to_numpy())
    groups = adata.obs[groupby].astype(str).to_numpy()
    reference = str(reference)  # the labels are compared as strings
    if reference not in set(groups):
        raise DataError(f"top_degs: reference {reference!r} is not a value of adata.obs[{groupby!r}] "
                        f"(have {sorted(set(groups))[:10]})")
    out: dict[tuple[str, str], np.ndarray] = {}
    names = pd.Index(np.arange(adata.n_vars).astype(str))
    skipped = []
    for ctx in pd.unique(contexts):
        m = contexts == ctx
        present = [g for g in pd.unique(groups[m]) if g != reference]
        if (groups[m] == reference).sum() < 2:
            skipped += [f"{(ctx, g)} (fewer than 2 {reference!r} cells in the context)" for g in present]
            continue
        keep = [g for g in present if (groups[m] == g).sum() >= 2]
        skipped += [f"{(ctx, g)} (fewer than 2 cells)" for g in present if g not in keep]
        if not keep:
            continue
        rows = np.flatnonzero(m & np.isin(groups, [reference, *keep]))
        x, labels = _log_normalized_rows(mat, rows), groups[rows]
        sub = ad.AnnData(X=x, obs=pd.DataFrame({"g": labels}, index=np.arange(len(rows)).astype(str)),
                         var=pd.DataFrame(index=names))
        sc.tl.rank_genes_groups(sub, "g", groups=keep, reference=reference, method=method,
                                n_genes=adata.n_vars, rankby_abs=True)
        rec = sub.uns["rank_genes_groups"]["names"]
        for g in keep:
            # a gene constant over the group and reference cells cannot be a DEG (scanpy
            # scores it 0): drop it
            both = x[(labels == reference) | (labels == g)]
            varying = (both.max(0).toarray() > both.min(0).toarray()).ravel()
            ranked = np.asarray(rec[g], dtype=int)
            out[(str(ctx), str(g))] = ranked[varying[ranked]][:n_genes]
    if skipped:
        warnings.warn(f"top_degs: no DEGs for {len(skipped)} (context, group) pair(s): {', '.join(skipped[:5])}"
                      f"{' ...' if len(skipped) > 5 else ''}", stacklevel=2)
    return out


def evaluate_condition(true_counts: Any, pred_counts: Any, control_counts: Any,
                       degs: Sequence[int] | None = None, true_cf_counts: Any | None = None,
                       factual_counts: Any | None = None, n_pcs: int = 30, seed: int = 0) -> dict:
    """All population metrics of one predicted condition, as a flat dict of floats.

    ``true_counts``: cells truly under the condition; ``pred_counts``: the prediction;
    ``control_counts``: the control cells of the same context; ``degs``: indices of
    the condition's top DEGs; ``true_cf_counts``: the true counterfactual counts of
    the very cells predicted (enables the per-cell error; ``factual_counts`` adds the
    correlation of predicted and true changes). E-distance and MMD are computed on
    the first ``n_pcs`` principal components of the log-normalized true and control
    cells.
    """
    from sklearn.decomposition import PCA

    t, p, c = log_normalize(true_counts), log_normalize(pred_counts), log_normalize(control_counts)
    out = {"r2_mean_all": r2_mean(t, p), "r2_var_all": r2_var(t, p), "lfc_r2_all": lfc_r2(t, p, c)}
    if degs is not None and len(degs) >= 2:
        out.update({"r2_mean_deg": r2_mean(t, p, degs), "r2_var_deg": r2_var(t, p, degs),
                    "lfc_r2_deg": lfc_r2(t, p, c, degs)})
    k = int(min(n_pcs, t.shape[1], len(t) + len(c) - 1))
    pca = PCA(n_components=k, random_state=seed).fit(np.vstack([t, c]))
    zt, zp = pca.transform(t), pca.transform(p)
    out["e_distance"] = e_distance(zt, zp, seed=seed)
    out["mmd"] = float(mmd(zt, zp))
    if true_cf_counts is not None:
        err = counterfactual_error(true_cf_counts, pred_counts, factual=factual_counts)
        out["cf_rmse"] = err.rmse
        out["cf_mae_counts"] = err.mae_counts
        if err.pearson is not None:
            out["cf_delta_pearson"] = err.pearson
    return out
