r"""Counterfactual image metrics.

- Axiomatic soundness (Monteiro, Ribeiro, Pawlowski, Castro & Glocker, *Measuring
  axiomatic soundness of counterfactual image models*, ICLR 2023):
  :func:`composition` (L1 after 1, 2, ... null interventions), :func:`reversibility`
  (L1 after cycles of do then undo) and :func:`effectiveness` (an anti-causal
  predictor's error on the counterfactual images against the intervened values).
- Against a ground-truth simulator: :func:`true_counterfactual_error` (MAE and SSIM
  against the rendered true counterfactual) and :func:`oracle_effectiveness` (the
  simulator's own measurement functions applied to the counterfactual images).
- Realism: :func:`frechet_distance` between feature sets, and
  :func:`feature_frechet_distance` on the features of an encoder (medcausal's own
  :class:`~medcausal.metrics.predictors.AntiCausalPredictor`, trained on real images:
  no downloaded weights).

Images are arrays or tensors ``[n, C, H, W]`` (a single image ``[C, H, W]`` is also
read as one row). The soundness metrics take the model as callables mapping a batch of
images (or a :class:`~medcausal.Cohort`, with ``image=`` naming the array) to a batch of
the same kind, so they work for one mechanism and for a whole causal model alike.

>>> import numpy as np
>>> x = np.zeros((2, 1, 8, 8))
>>> composition(lambda im: im + 0.25, x, steps=3).l1
[0.25, 0.5, 0.75]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import DataError, warn

__all__ = ["SoundnessCurve", "change_decomposition", "composition", "counterfactual_latent_divergence", "effectiveness", "feature_frechet_distance", "frechet_distance",
           "mean_absolute_error", "oracle_effectiveness", "reversibility", "true_counterfactual_error"]


def _images(x: Any, image: str | None = None, what: str = "images") -> np.ndarray:
    """A float64 array ``[n, C, H, W]`` from an array, a tensor or a Cohort."""
    if image is not None:
        arrays = getattr(x, "arrays", None)
        if arrays is None or image not in arrays:
            have = list(arrays) if arrays is not None else f"a {type(x).__name__}"
            raise DataError(f"{what}: no image array {image!r} (have {have})")
        x = arrays[image]
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be a numeric array [n, C, H, W]") from None
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim < 4:
        raise DataError(f"{what} must be [n, C, H, W] (or [C, H, W]), got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{what} holds no images (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise DataError(f"{what} has {int((~np.isfinite(arr)).sum())} non-finite value(s)")
    return arr


def _same_shape(a: np.ndarray, b: np.ndarray, names=("a", "b")) -> None:
    if a.shape != b.shape:
        raise DataError(f"{names[0]} has shape {a.shape} but {names[1]} has {b.shape}: "
                        "they must hold the same images")


def mean_absolute_error(a: Any, b: Any) -> float:
    """Mean absolute difference per pixel between two image batches.

    >>> import numpy as np
    >>> mean_absolute_error(np.zeros((2, 1, 2, 2)), np.full((2, 1, 2, 2), 0.5))
    0.5
    """
    a, b = _images(a, what="a"), _images(b, what="b")
    _same_shape(a, b)
    return float(np.abs(a - b).mean())


@dataclass
class SoundnessCurve:
    """L1 distance to the original images after each of ``len(l1)`` steps (or cycles).

    ``curve.at(k)`` is the value after ``k`` steps (1-based); ``per_image`` the per-image
    values of the last step.

    >>> c = SoundnessCurve(l1=[0.25, 0.75])
    >>> c.at(2), c.ratio(2)
    (0.75, 3.0)
    """

    l1: list[float]
    per_image: list[float] = field(default_factory=list)

    def at(self, k: int) -> float:
        if not 1 <= k <= len(self.l1):
            raise DataError(f"step {k} out of range 1..{len(self.l1)}")
        return self.l1[k - 1]

    def ratio(self, k: int) -> float:
        """The value after ``k`` steps over the value after 1 step (``nan`` if the latter is 0)."""
        first = self.l1[0]
        return float(self.at(k) / first) if first > 0 else float("nan")


def composition(null_counterfactual: Callable[[Any], Any], images: Any, steps: int = 10,
                image: str | None = None) -> SoundnessCurve:
    """Composition: apply the null intervention (``do`` of each unit's own parents)
    ``steps`` times; L1 to the originals after each application.

    A sound model returns the input unchanged at every step. ``null_counterfactual``
    maps a batch to its counterfactual under the null intervention, e.g. for one
    mechanism ``lambda x: mech.counterfactual(x, pa, pa)``.

    >>> import numpy as np
    >>> composition(lambda im: im, np.ones((3, 1, 4, 4)), steps=2).l1
    [0.0, 0.0]
    """
    if steps < 1:
        raise DataError(f"composition needs steps >= 1, got {steps}")
    x0 = _images(images, image, "images").copy()  # a model that edits its input in place moves no baseline
    state, l1 = images, []
    for _ in range(steps):
        state = null_counterfactual(state)
        xk = _images(state, image, "null_counterfactual output")
        _same_shape(x0, xk, ("images", "null_counterfactual output"))
        diff = np.abs(xk - x0).reshape(len(x0), -1).mean(1)
        l1.append(float(diff.mean()))
    return SoundnessCurve(l1=l1, per_image=diff.tolist())


def reversibility(do: Callable[[Any], Any], undo: Callable[[Any], Any], images: Any, cycles: int = 3,
                  image: str | None = None) -> SoundnessCurve:
    """Reversibility: ``cycles`` times, intervene (``do``) then restore the factual
    parents (``undo``); L1 to the originals after each cycle.

    >>> import numpy as np
    >>> reversibility(lambda im: im + 1.0, lambda im: im - 1.0, np.zeros((2, 1, 4, 4)), cycles=2).l1
    [0.0, 0.0]
    """
    if cycles < 1:
        raise DataError(f"reversibility needs cycles >= 1, got {cycles}")
    x0 = _images(images, image, "images").copy()
    state, l1 = images, []
    for _ in range(cycles):
        state = undo(do(state))
        xk = _images(state, image, "undo output")
        _same_shape(x0, xk, ("images", "undo output"))
        diff = np.abs(xk - x0).reshape(len(x0), -1).mean(1)
        l1.append(float(diff.mean()))
    return SoundnessCurve(l1=l1, per_image=diff.tolist())


def effectiveness(predicted: Any, target: Any, kind: str = "continuous") -> dict[str, float]:
    """How well the counterfactuals show the intervened value, read by a predictor.

    ``predicted``: the anti-causal predictor's output on the counterfactual images
    (a value for continuous; the probability of 1 for binary; class probabilities
    ``[n, k]`` or labels for categorical). ``target``: the intervened values (0/1 for
    binary; labels or one-hot ``[n, k]`` for categorical); NaN or mismatched shapes raise.
    Returns ``{"mae"}`` (continuous), ``{"accuracy", "auc"}`` (binary; ``auc`` is
    ``nan`` when the targets hold one class) or ``{"accuracy"}`` (categorical).

    >>> effectiveness([0.9, 0.2, 0.6], [1, 0, 0], kind="binary")
    {'accuracy': 0.6666666666666666, 'auc': 1.0}
    """
    if kind not in ("continuous", "binary", "categorical"):
        raise DataError(f"effectiveness: kind must be 'continuous', 'binary' or 'categorical', got {kind!r}")

    def array(a, what):
        try:
            arr = np.asarray(a, dtype=np.float64) if kind != "categorical" else np.asarray(a)
        except (TypeError, ValueError):
            raise DataError(f"effectiveness: {what} must be numeric") from None
        if arr.ndim == 0:
            raise DataError(f"effectiveness: {what} must be an array with one row per image, got a scalar")
        if len(arr) == 0:
            raise DataError(f"effectiveness: {what} is empty")
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise DataError(f"effectiveness: {what} has {int((~np.isfinite(arr)).sum())} non-finite value(s)")
        return arr

    p, t = array(predicted, "predicted"), array(target, "target")
    if len(p) != len(t):
        raise DataError(f"predicted has {len(p)} rows but target has {len(t)}")
    if kind == "continuous":
        p2, t2 = p.reshape(len(p), -1), t.reshape(len(t), -1)
        if p2.shape != t2.shape:
            raise DataError(f"effectiveness: predicted has shape {p.shape} but target has {t.shape}")
        return {"mae": float(np.abs(p2 - t2).mean())}
    if kind == "binary":
        if p.size != len(p) or t.size != len(t):
            raise DataError(f"effectiveness: binary predicted (probabilities of 1) and target (0/1) need one "
                            f"value per row, got shapes {p.shape} and {t.shape}")
        t, p = t.reshape(-1), p.reshape(-1)
        if not np.isin(t, [0, 1]).all():
            raise DataError(f"effectiveness: binary target must be 0/1, got values {np.unique(t)[:5].tolist()}")
        out = {"accuracy": float(((p >= 0.5) == (t >= 0.5)).mean())}
        if len(np.unique(t)) < 2:
            out["auc"] = float("nan")
        else:
            from sklearn.metrics import roc_auc_score
            out["auc"] = float(roc_auc_score(t, p))
        return out
    # [n, k] with k > 1: class probabilities (predicted) or one-hot (target) -> class indices;
    # [n] or [n, 1]: labels as given
    probabilities = p.ndim == 2 and p.shape[1] > 1
    if probabilities and p.dtype.kind not in "iuf":
        raise DataError(f"effectiveness: categorical predicted of shape {p.shape} reads as class probabilities "
                        f"and must be numeric")
    labels = p.argmax(1) if probabilities else p.reshape(-1)
    t = t.argmax(1) if t.ndim == 2 and t.shape[1] > 1 else t.reshape(-1)
    if labels.shape != t.shape:
        raise DataError(f"effectiveness: categorical predicted has shape {p.shape} but target has "
                        f"{np.shape(target)}")
    if probabilities:  # labels are argmax positions: the target must be positions too
        k = p.shape[1]
        try:
            index = t.astype(np.float64)
        except (TypeError, ValueError):
            index = np.full(len(t), np.nan)
        if not (np.isfinite(index) & (index == np.round(index)) & (index >= 0) & (index < k)).all():
            raise DataError(f"effectiveness: predicted holds probabilities over {k} classes, so target must be "
                            f"class indices 0..{k - 1} (or one-hot [n, {k}]); got values "
                            f"{list(dict.fromkeys(t.tolist()))[:5]}")
        t = index.astype(np.int64)
    return {"accuracy": float((labels == t).mean())}


def true_counterfactual_error(predicted: Any, true: Any, data_range: float | None = None,
                              image: str | None = None) -> dict[str, float]:
    """MAE and SSIM of predicted counterfactual images against the true ones.

    SSIM is scikit-image's ``structural_similarity`` (Gaussian-free 7x7 windows, the
    channels as ``channel_axis``), averaged over images; ``data_range`` defaults to the
    range of the true images. Returns ``{"mae", "ssim", "mae_sd"}`` (``mae_sd``: the
    standard deviation of the per-image MAE).

    >>> import numpy as np
    >>> x = np.random.default_rng(0).random((2, 1, 16, 16))
    >>> true_counterfactual_error(x, x)
    {'mae': 0.0, 'ssim': 1.0, 'mae_sd': 0.0}
    """
    from skimage.metrics import structural_similarity

    p, t = _images(predicted, image, "predicted"), _images(true, image, "true")
    _same_shape(p, t, ("predicted", "true"))
    if min(t.shape[2:]) < 3:
        raise DataError(f"true_counterfactual_error: SSIM needs images of at least 3x3 pixels, got {t.shape[2:]}")
    if data_range is None:
        data_range = float(t.max() - t.min()) or 1.0
    per_mae = np.abs(p - t).reshape(len(t), -1).mean(1)
    win = min(7, *t.shape[2:])
    win -= 1 - win % 2  # odd
    ssim = [structural_similarity(t[i], p[i], data_range=data_range, channel_axis=0, win_size=win)
            for i in range(len(t))]
    return {"mae": float(per_mae.mean()), "ssim": float(np.mean(ssim)), "mae_sd": float(per_mae.std())}


def change_decomposition(factual: Any, predicted: Any, true: Any, threshold: float = 0.05,
                         image: str | None = None) -> dict[str, float]:
    """Where a counterfactual's error comes from: the change it misses, and the change it invents.

    Pixels split by the *true* change ``|true - factual| > threshold`` (intensity units).
    On the changed pixels, ``missed`` is the mean ``|predicted - true|`` against
    ``true_change``, the mean ``|true - factual|`` there (returning the factual scan scores
    ``missed = true_change``; ``captured = 1 - missed / true_change``). On the other pixels,
    ``spurious`` is the mean ``|predicted - factual|`` (the change the model invents) against
    ``true_elsewhere``, the little the truth changes there, and ``error_elsewhere`` the mean
    ``|predicted - true|``. The true-counterfactual MAE is
    ``changed_fraction * missed + (1 - changed_fraction) * error_elsewhere``.

    >>> import numpy as np
    >>> x = np.zeros((1, 1, 4, 4)); t = x.copy(); t[..., :2, :] = 1.0   # half the pixels change by 1
    >>> p = x + 0.1; p[..., :2, :] = 0.6                                  # 60% of it, plus 0.1 elsewhere
    >>> {k: round(v, 3) for k, v in change_decomposition(x, p, t).items()}
    {'changed_fraction': 0.5, 'true_change': 1.0, 'missed': 0.4, 'captured': 0.6, 'true_elsewhere': 0.0, 'spurious': 0.1, 'error_elsewhere': 0.1}
    """
    f, p, t = (_images(a, image, w) for a, w in ((factual, "factual"), (predicted, "predicted"), (true, "true")))
    _same_shape(f, p, ("factual", "predicted"))
    _same_shape(f, t, ("factual", "true"))
    if not (math.isfinite(threshold) and threshold >= 0):
        raise DataError(f"change_decomposition: threshold must be a finite number >= 0, got {threshold}")
    changed = np.abs(t - f) > threshold
    out = {"changed_fraction": float(changed.mean())}
    mean = lambda a, m: float(a[m].mean()) if m.any() else float("nan")  # noqa: E731
    out["true_change"] = mean(np.abs(t - f), changed)
    out["missed"] = mean(np.abs(p - t), changed)
    out["captured"] = 1.0 - out["missed"] / out["true_change"] if changed.any() else float("nan")
    out["true_elsewhere"] = mean(np.abs(t - f), ~changed)
    out["spurious"] = mean(np.abs(p - f), ~changed)
    out["error_elsewhere"] = mean(np.abs(p - t), ~changed)
    return out


def oracle_effectiveness(measure: Callable[[np.ndarray], Mapping[str, Any]], images: Any,
                         targets: Mapping[str, Any], image: str | None = None,
                         kinds: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Effectiveness read by the simulator's own measurement functions.

    ``measure(images) -> {name: values}`` (e.g. a ground-truth cohort's ``measure``)
    measures image-derived quantities; each named in ``targets`` (the values the
    counterfactuals should show: the true counterfactual's) is scored with
    :func:`effectiveness` (continuous unless ``kinds`` says otherwise).

    >>> import numpy as np
    >>> imgs = np.ones((2, 1, 4, 4)) * np.array([1.0, 3.0])[:, None, None, None]
    >>> oracle_effectiveness(lambda im: {"mean": im.mean((1, 2, 3))}, imgs, {"mean": [1.0, 2.0]})
    {'mean': {'mae': 0.5}}
    """
    x = _images(images, image, "images")
    measured = measure(x)
    kinds = dict(kinds or {})
    out = {}
    for name, target in targets.items():
        if name not in measured:
            raise DataError(f"oracle_effectiveness: measure() returned no {name!r} (it returned {list(measured)})")
        out[name] = effectiveness(measured[name], target, kinds.get(name, "continuous"))
    return out


def frechet_distance(a: Any, b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[n, d]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` (the FID formula).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> f = rng.normal(size=(500, 3))
    >>> round(frechet_distance(f, f), 6), round(frechet_distance(f, f + [2.0, 0, 0]), 6)
    (0.0, 4.0)
    """
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DataError(f"frechet_distance needs two [n, d] feature sets of equal d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise DataError("frechet_distance needs at least 2 rows in each feature set")
    for what, f in (("a", a), ("b", b)):
        if not np.isfinite(f).all():
            raise DataError(f"frechet_distance: feature set {what} has {int((~np.isfinite(f)).sum())} "
                            "non-finite value(s)")
    if min(len(a), len(b)) <= a.shape[1]:
        warn(f"frechet_distance: {min(len(a), len(b))} rows for {a.shape[1]} features: the covariances are "
             "rank-deficient and the distance is mostly the estimator's bias (two samples of one Gaussian "
             "score far above 0); compare only at equal sizes, beside a real-vs-real floor")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(len(s_a))
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = np.real(covmean)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))
    return max(value, 0.0)


def feature_frechet_distance(real: Any, generated: Any, encoder: Callable[[np.ndarray], Any],
                             image: str | None = None) -> float:
    """Fréchet distance between ``encoder`` features of real and generated images.

    ``encoder(images) -> [n, d]`` features; medcausal uses the penultimate layer of an
    :class:`~medcausal.metrics.predictors.AntiCausalPredictor` trained on the real
    training images (``predictor.features``), so no downloaded weights are involved.

    >>> import numpy as np
    >>> enc = lambda im: im.reshape(len(im), -1)[:, :2]
    >>> x = np.random.default_rng(0).random((100, 1, 2, 2))
    >>> round(feature_frechet_distance(x, x, enc), 6)
    0.0
    """
    fa = np.asarray(encoder(_images(real, image, "real")), dtype=np.float64)
    fb = np.asarray(encoder(_images(generated, image, "generated")), dtype=np.float64)
    return frechet_distance(fa, fb)


def counterfactual_latent_divergence(factual: Any, counterfactual: Any, factual_class: Any,
                                     counterfactual_class: Any, reference: Any, reference_class: Any,
                                     encoder: Callable[[np.ndarray], Any] | None = None,
                                     per_unit: bool = False) -> float | np.ndarray:
    r"""Counterfactual latent divergence (CLD) of Sanchez & Tsaftaris (Diff-SCM, CLeaR 2022).

    One number for the trade-off between minimality and effectiveness, measured in a
    latent space (``encoder(images) -> [n, d]`` features; with ``encoder=None`` the
    inputs already are features ``[n, d]``). For unit ``i`` with factual ``x_i``
    (class ``y_i``) and counterfactual ``x*_i`` (target class ``y*_i``), let
    ``d_i = |E(x*_i) - E(x_i)|`` (Euclidean) and, over the ``reference`` rows ``r``
    (held-out real images with their classes),
    ``S_i = {|E(x*_i) - E(r)| : class(r) = y_i}`` and
    ``S*_i = {|E(x*_i) - E(r)| : class(r) = y*_i}``. Then

        CLD_i = log( exp P(S_i <= d_i) + exp P(S*_i >= d_i) ),

    a smooth maximum (LogSumExp) of two empirical probabilities: ``P(S_i <= d_i)`` is
    small when the factual is among the factual-class images nearest to the
    counterfactual (*minimality*), ``P(S*_i >= d_i)`` is small when the counterfactual
    is nearer to images of its target class than to its own factual (*effectiveness*).
    Lower is better; it lies in ``[log 2, 1 + log 2]``. Returns the mean over units (or
    the ``[n]`` values with ``per_unit=True``). Classes are any labels compared by
    equality (bin a continuous parent first). A reference row identical to the factual
    counts in ``S_i`` like any other.

    >>> import numpy as np
    >>> ref = np.array([[0.], [1.], [2.], [3.], [6.], [6.5], [7.], [7.2]])
    >>> cls = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> ideal = counterfactual_latent_divergence([[4.]], [[6.5]], [0], [1], ref, cls)
    >>> round(ideal, 6) == round(float(np.log(2)), 6)   # both probabilities 0: the minimum
    True
    """
    def feats(a, what):
        if encoder is not None:
            a = encoder(_images(a, what=what))
        arr = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a, dtype=np.float64)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise DataError(f"counterfactual_latent_divergence: {what} features must be [n, d], got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise DataError(f"counterfactual_latent_divergence: {what} features have non-finite values")
        return arr

    f, cf, ref = feats(factual, "factual"), feats(counterfactual, "counterfactual"), feats(reference, "reference")
    y, y_cf, y_ref = (np.asarray(v, dtype=object).reshape(-1) for v in (factual_class, counterfactual_class,
                                                                         reference_class))
    n = len(f)
    for name, arr in (("counterfactual", cf), ("factual_class", y), ("counterfactual_class", y_cf)):
        if len(arr) != n:
            raise DataError(f"counterfactual_latent_divergence: {name} has {len(arr)} rows but factual has {n}")
    if len(y_ref) != len(ref):
        raise DataError(f"counterfactual_latent_divergence: reference_class has {len(y_ref)} rows but "
                        f"reference has {len(ref)}")
    if f.shape[1] != cf.shape[1] or f.shape[1] != ref.shape[1]:
        raise DataError(f"counterfactual_latent_divergence: feature widths differ (factual {f.shape[1]}, "
                        f"counterfactual {cf.shape[1]}, reference {ref.shape[1]})")
    if n == 0:
        raise DataError("counterfactual_latent_divergence: no units")
    missing = sorted({str(c) for c in np.concatenate([y, y_cf]) if not np.any(y_ref == c)})
    if missing:
        raise DataError(f"counterfactual_latent_divergence: no reference rows of class(es) {missing}")
    d = np.linalg.norm(cf - f, axis=1)                                   # [n]
    dist = np.linalg.norm(cf[:, None, :] - ref[None, :, :], axis=2)       # [n, m]
    same_f = y[:, None] == y_ref[None, :]
    same_cf = y_cf[:, None] == y_ref[None, :]
    p_min = ((dist <= d[:, None]) & same_f).sum(1) / same_f.sum(1)
    p_eff = ((dist >= d[:, None]) & same_cf).sum(1) / same_cf.sum(1)
    values = np.logaddexp(p_min, p_eff)
    return values if per_unit else float(values.mean())
