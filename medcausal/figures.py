"""Figures: a grid of factual scans, their counterfactuals, and the difference maps.

Drawn with matplotlib's Agg canvas (no display, no pyplot state) and written
atomically as PNG.

>>> import tempfile, numpy as np
>>> x = np.random.default_rng(0).random((2, 1, 16, 16)).astype(np.float32)
>>> path = counterfactual_grid(x, {"do(age=80)": x * 0.9, "do(sex=1)": x[:, :, ::-1]},
...                            tempfile.mkdtemp() + "/grid.png")
>>> path.suffix, path.stat().st_size > 1000
('.png', True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .cohort import Cohort
from .errors import DataError
from .io import atomic_write

__all__ = ["counterfactual_grid"]


def _scans(data: Any, name: str, what: str) -> np.ndarray:
    arr = data.arrays.get(name) if isinstance(data, Cohort) else data
    if arr is None:
        raise DataError(f"{what}: the cohort has no array {name!r}")
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3:                       # [n, H, W]
        arr = arr[:, None]
    if arr.ndim not in (4, 5):
        raise DataError(f"{what}: scans must be [n, C, H, W] or [n, C, D, H, W], got shape {arr.shape}")
    if arr.ndim == 5:                       # a volume: its middle axial slice
        arr = arr[:, :, arr.shape[2] // 2]
    return arr.mean(1)                      # channels -> one grey image


def counterfactual_grid(factual: Cohort | np.ndarray,
                        counterfactuals: Mapping[str, Cohort | np.ndarray] | Sequence[tuple],
                        path: str | Path, *, patients: Sequence[int] | None = None, name: str = "mri",
                        labels: Sequence[str] | None = None, diff_limit: float | None = None,
                        title: str | None = None, dpi: int = 100) -> Path:
    """Draw factual scans, counterfactual scans and ``counterfactual - factual`` maps; save a PNG.

    ``counterfactuals`` maps a label (e.g. ``"do(age=80)"``) to the counterfactual
    scans of the same patients (a Cohort or an array ``[n, C, H, W]``; volumes
    show their middle axial slice). Each patient gets two rows: the scans, then
    the difference maps (red brighter, blue darker, symmetric limits
    ``diff_limit``, by default the largest absolute difference shown).
    ``patients`` picks rows (default: up to the first 4); ``labels`` names them.
    Returns the path.

    >>> import tempfile
    >>> from medcausal.synthetic.brain import BrainMRI
    >>> sim = BrainMRI(shape=(32, 32)); c = sim.sample(2, seed=0)
    >>> cfs = {"age + 20": sim.counterfactual(c, do={"age": lambda a: a + 20}),
    ...        "scanner B": sim.counterfactual(c, do={"scanner": "B"})}
    >>> counterfactual_grid(c, cfs, tempfile.mkdtemp() + "/cf.png").name
    'cf.png'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    items = list(counterfactuals.items()) if isinstance(counterfactuals, Mapping) else list(counterfactuals)
    if not items:
        raise DataError("counterfactual_grid needs at least one counterfactual")
    fact = _scans(factual, name, "factual")
    cfs = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError(f"counterfactuals must map label -> scans, got {item!r}")
        label, data = item
        arr = _scans(data, name, f"counterfactual {label!r}")
        if arr.shape != fact.shape:
            raise DataError(f"counterfactual {label!r} has scans of shape {arr.shape[1:]} for "
                            f"{arr.shape[0]} patients; the factual has {fact.shape[1:]} for {fact.shape[0]}")
        cfs.append((str(label), arr))
    n = fact.shape[0]
    rows = list(range(min(n, 4))) if patients is None else [int(i) for i in patients]
    bad = [i for i in rows if not -n <= i < n]
    if bad or not rows:
        raise DataError(f"patients {bad or rows} out of range for {n} scans")
    if labels is not None and len(labels) != len(rows):
        raise DataError(f"{len(labels)} labels for {len(rows)} patients")
    if labels is None and isinstance(factual, Cohort):
        labels = [str(factual.ids[i]) for i in rows]
    for what, arr in [("factual", fact), *((f"counterfactual {label!r}", a) for label, a in cfs)]:
        bad = [i for i in rows if not np.isfinite(arr[i]).all()]
        if bad:  # one NaN would make the colour limits NaN and blank every panel
            raise DataError(f"{what} has non-finite pixels (NaN or inf) in the scans of patient(s) {bad}")
    diffs = [arr[rows] - fact[rows] for _, arr in cfs]
    lim = float(diff_limit) if diff_limit else max(float(np.abs(d).max()) for d in diffs) or 1.0
    vmin = min(float(fact[rows].min()), *(float(a[rows].min()) for _, a in cfs))
    vmax = max(float(fact[rows].max()), *(float(a[rows].max()) for _, a in cfs))
    ncol, nrow = 1 + len(cfs), 2 * len(rows)
    fig = Figure(figsize=(1.9 * ncol + 1.0, 1.9 * nrow + (0.4 if title else 0.1)), dpi=dpi,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    diff_im = None
    for r, i in enumerate(rows):
        top, bottom = axes[2 * r], axes[2 * r + 1]
        top[0].imshow(fact[i], cmap="gray", vmin=vmin, vmax=vmax)
        top[0].set_title("factual" if r == 0 else "", fontsize=9)
        top[0].set_ylabel(labels[r] if labels is not None else f"patient {i}", fontsize=8)
        bottom[0].text(0.5, 0.5, "counterfactual\n- factual", ha="center", va="center", fontsize=8,
                       transform=bottom[0].transAxes)
        for c, (label, arr) in enumerate(cfs, start=1):
            top[c].imshow(arr[i], cmap="gray", vmin=vmin, vmax=vmax)
            if r == 0:
                top[c].set_title(label, fontsize=9)
            diff_im = bottom[c].imshow(arr[i] - fact[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        for ax in (*top, *bottom):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
    if diff_im is not None:
        fig.colorbar(diff_im, ax=axes[:, -1].tolist(), shrink=0.6, label="counterfactual - factual")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
