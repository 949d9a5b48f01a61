"""Preprocessing under DP: codecs from public declarations or DP statistics, private ``finalize``.

Constants computed from private data leak it (a maximum *is* a record). Under DP:

- continuous variables: ``public_bounds`` are required; values are clipped to them.
  ``standardize="bounds"`` takes ``loc = (lo + hi) / 2``, ``scale = (hi - lo) / 4`` (no
  budget); ``standardize="dp"`` estimates mean and std with the Gaussian mechanism on
  clipped per-record sums (one full-batch query for all variables, in the accountant);
- categorical variables: the categories must be declared in the graph;
- binary variables, images and expression arrays: no constant is read from the data;
- mechanisms whose ``finalize`` reads the data: a private version is required
  (``additive``: DP mean/std of the residuals; the released noise model is Gaussian), or the
  mechanism declares ``skip_finalize_under_dp`` and works without it (``diffusion``).

>>> import numpy as np
>>> q = GaussianQuery(noise_multiplier=1e-9, record_of_row=np.arange(4), n_records=4)
>>> q.mean(np.array([[3.0, 1.0], [1.0, 1.0], [0.5, 1.0], [-0.5, 1.0]])).round(6).tolist()  # 3.0 clipped to 1
[0.5, 1.0]
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..adapters import tabular
from ..cohort import Cohort
from ..errors import DataError, warn
from ..graph import CausalGraph
from .config import Privacy, PrivacyError, PrivacyWarning


class GaussianQuery:
    """The Gaussian mechanism for the mean of per-record vectors with entries in [-1, 1].

    Rows belonging to one record (unit) are averaged first, so each record contributes one
    vector ``v`` with ``|v_j| <= 1``; the sum over records has L2 sensitivity ``sqrt(k)``
    (add/remove one record) and gets ``N(0, (z sqrt(k))^2)`` noise per coordinate. The number
    of records ``N`` is treated as public (as Opacus does when setting the sample rate).
    """

    def __init__(self, noise_multiplier: float, record_of_row: np.ndarray, n_records: int,
                 generator: torch.Generator | None = None):
        self.noise_multiplier = float(noise_multiplier)
        self.record_of_row = np.asarray(record_of_row)
        self.n_records = int(n_records)
        self.generator = generator
        self.calls = 0

    def mean(self, values) -> np.ndarray:
        """DP mean over records of ``values`` ``[n_rows, k]`` (clipped to [-1, 1])."""
        v = np.clip(np.asarray(values, dtype=np.float64).reshape(len(self.record_of_row), -1), -1.0, 1.0)
        k = v.shape[1]
        sums = np.zeros((self.n_records, k))
        np.add.at(sums, self.record_of_row, v)
        counts = np.bincount(self.record_of_row, minlength=self.n_records)[:, None]
        per_record = sums / np.maximum(counts, 1)
        total = per_record.sum(0)
        std = self.noise_multiplier * math.sqrt(k)
        noise = torch.randn(k, generator=self.generator, dtype=torch.float64).numpy() * std
        self.calls += 1
        return (total + noise) / self.n_records


def _center_half(lo: float, hi: float, vtype) -> tuple[float, float]:
    """Centre and half-width of the public bounds on the model's scale (log for a positive variable)."""
    if vtype.positive:
        lo, hi = math.log(lo), math.log(hi)
    return (lo + hi) / 2, (hi - lo) / 2


def private_codecs(data, graph: CausalGraph, privacy: Privacy, query: GaussianQuery | None,
                   standardize: str | None = None):
    """Codecs without private constants, and the data clipped to the public bounds.

    Returns ``(codecs, data, description)``; ``description`` says per variable where its
    constants came from. ``standardize`` overrides ``privacy.standardize``; ``query`` is
    needed only for ``"dp"``.

    >>> g = CausalGraph({"age": "continuous", "sex": "binary"})
    >>> df = pd.DataFrame({"age": [30.0, 50.0, 120.0], "sex": [0, 1, 1]})
    >>> import warnings; warnings.simplefilter("ignore", PrivacyWarning)
    >>> codecs, clipped, how = private_codecs(df, g, Privacy(epsilon=1.0, public_bounds={"age": (20, 100)},
    ...                                                      standardize="bounds"), None)
    >>> codecs["age"].state["loc"], codecs["age"].state["scale"], clipped["age"].tolist()
    ([60.0], [20.0], [30.0, 50.0, 100.0])
    """
    standardize = standardize or privacy.standardize
    tabular.check_columns(data, graph)
    table = data.table if isinstance(data, Cohort) else data
    problems, desc, codecs = [], {}, {}
    continuous = [n for n, t in graph.variables.items() if t.kind == "continuous"]
    missing = [n for n in continuous if n not in privacy.public_bounds]
    if missing:
        problems.append(f"continuous variable(s) {missing} need public bounds: their mean/std/min/max "
                        "would otherwise be read from the private data; declare them, e.g. "
                        f"Privacy(public_bounds={{{missing[0]!r}: (low, high)}}) or [public_bounds] in "
                        "the profile (coarse public knowledge, e.g. an age range, is enough)")
    undeclared = [n for n, t in graph.variables.items() if t.kind == "categorical" and t.categories is None]
    if undeclared:
        problems.append(f"categorical variable(s) {undeclared} need declared categories: the list of "
                        "values seen in the data leaks rare values; declare them in the graph, e.g. "
                        f"{{{undeclared[0]!r}: {{'type': 'categorical', 'categories': [...]}}}}")
    unknown = sorted(set(privacy.public_bounds) - set(graph.variables))
    if unknown:
        problems.append(f"public_bounds names unknown variable(s) {unknown}; variables: {list(graph.variables)}")
    not_cont = sorted(v for v in privacy.public_bounds if v in graph.variables and v not in continuous)
    if not_cont:
        problems.append(f"public_bounds given for non-continuous variable(s) {not_cont}")
    if problems:
        raise PrivacyError("cannot preprocess under differential privacy: " + "; ".join(problems))

    clipped = table.copy()
    blocks, layout = [], []
    for name, vtype in graph.variables.items():
        if vtype.kind != "continuous":
            codecs[name] = tabular.Codec.fit(name, vtype, data)  # declared / data-free
            state = codecs[name].state
            if vtype.kind == "binary" and ("levels" in state or state.get("dtype") == "category"):
                # the labels a binary column holds are read from the data: not public, so 0/1
                codecs[name] = tabular.Codec(name, vtype, {})
            elif state.get("dtype") == "category":  # the declared categories, not the data's
                state["dtype_categories"] = list(vtype.categories)
            desc[name] = {"categorical": "declared categories", "binary": "no constants"}.get(
                vtype.kind, "no constants (passed through)")
            continue
        lo, hi = privacy.public_bounds[name]
        if vtype.positive and lo <= 0:
            raise PrivacyError(f"public_bounds of {name!r}: [{lo}, {hi}] must lie above 0, as the variable is "
                               "declared positive (its logarithm is modelled)")
        cols = tabular.columns_of(name, vtype)
        x = tabular._numeric(table, cols, name)
        outside = int(((x < lo) | (x > hi)).sum())
        if outside:
            warn(f"{outside} value(s) of {name!r} lie outside its public bounds [{lo}, {hi}] and "
                 "were clipped to them for private training", PrivacyWarning)
        x = np.clip(x, lo, hi)
        for j, c in enumerate(cols):
            clipped[c] = x[:, j]
        mid, half = _center_half(lo, hi, vtype)
        state = {"loc": [mid] * len(cols), "scale": [half / 2] * len(cols),
                 "min": [lo] * len(cols), "max": [hi] * len(cols)}
        codecs[name] = tabular.Codec(name, vtype, state)
        desc[name] = f"public bounds [{lo:g}, {hi:g}]; loc/scale from the bounds"
        if standardize == "dp":
            z = (tabular._model_scale(x, vtype, lambda j: repr(name)) - mid) / half
            blocks += [z, z ** 2]
            layout.append((name, len(cols)))
    if blocks:
        if query is None:
            raise PrivacyError("internal: standardize='dp' needs a Gaussian query")
        m = query.mean(np.concatenate(blocks, axis=1))
        pos = 0
        for name, d in layout:
            m1, m2 = m[pos:pos + d], m[pos + d:pos + 2 * d]
            pos += 2 * d
            lo, hi = privacy.public_bounds[name]
            mid, half = _center_half(lo, hi, graph.variables[name])
            mean = np.clip(mid + half * m1, mid - half, mid + half)
            var = half ** 2 * (m2 - m1 ** 2)
            # a floor of 1% of the half-range keeps a noisy tiny variance from exploding the scale
            std = np.sqrt(np.maximum(var, (0.01 * half) ** 2))
            codecs[name].state.update({"loc": mean.tolist(), "scale": std.tolist()})
            desc[name] = (f"public bounds [{lo:g}, {hi:g}]; mean/std estimated under DP "
                          "(Gaussian mechanism on clipped sums)")
    out = Cohort(clipped, data.arrays, id_column=data.id_column) if isinstance(data, Cohort) else clipped
    return codecs, out, desc


# -- private finalize -----------------------------------------------------------------

RESIDUAL_BOUND = 4.0  # |residual| clipped at 4 standardized units for the DP residual moments


def _additive_finalize(mech, value: torch.Tensor, parents: torch.Tensor, query: GaussianQuery) -> str:
    """``additive``: the residual distribution from DP moments (Gaussian), not data quantiles."""
    with torch.no_grad():
        r = (value - mech.f(parents)).double().cpu().numpy() / RESIDUAL_BOUND
        m = query.mean(np.concatenate([r, r ** 2], axis=1))
        d = r.shape[1]
        m1, m2 = m[:d], m[d:]
        mean = RESIDUAL_BOUND * m1
        # clamped to [0.05, 2] standardized units: a tiny noisy variance would make log_prob spiky
        std = np.clip(np.sqrt(np.maximum(RESIDUAL_BOUND ** 2 * (m2 - m1 ** 2), 0.0)), 0.05, 2.0)
        n_q = mech.residual_quantiles.shape[0]
        probs = (torch.arange(n_q, dtype=torch.float64) + 0.5) / n_q
        z = torch.distributions.Normal(0.0, 1.0).icdf(probs)[:, None]
        q = torch.as_tensor(mean)[None] + torch.as_tensor(std)[None] * z
        mech.residual_quantiles.copy_(q.to(mech.residual_quantiles))
        n = query.n_records
        mech.bandwidth.copy_(torch.as_tensor(1.06 * std * n ** (-1 / 5)).to(mech.bandwidth))
    return ("residual noise: Gaussian with DP mean/std of residuals clipped at "
            f"{RESIDUAL_BOUND:g} standardized units (the empirical residual quantiles would leak)")


PRIVATE_FINALIZERS = {"additive": _additive_finalize}


def needs_private_finalize(cls) -> bool:
    """Whether a mechanism class reads the data in ``finalize`` (overrides the base no-op) and
    needs it under DP: not when the class that defines that ``finalize`` also declares
    ``skip_finalize_under_dp = True`` (it works without it; under DP it is not run). A subclass
    that overrides ``finalize`` again does not inherit the skip.

    >>> from medcausal.mechanisms import registry
    >>> [needs_private_finalize(registry.get(m)) for m in ("flow", "additive", "diffusion")]
    [False, True, False]
    """
    from ..mechanisms.base import Mechanism

    owner = next((k for k in cls.__mro__ if "finalize" in vars(k)), Mechanism)
    return owner is not Mechanism and not vars(owner).get("skip_finalize_under_dp", False)


def private_finalizer(cls):
    """The private finalize of a mechanism class: its own ``finalize_private`` or a built-in one.

    ``finalize_private(value, parents, query)`` may call ``query.mean(per_row_vectors)``
    once (entries in [-1, 1]; one full-batch Gaussian query, accounted); returns a string
    saying what it released. ``None``: no finalize runs under DP (the class reads no data in
    ``finalize``, or declares ``skip_finalize_under_dp``). Raises :class:`PrivacyError` when
    the class reads data and has no private version.

    >>> from medcausal.mechanisms import registry
    >>> private_finalizer(registry.get("flow")) is None, private_finalizer(registry.get("additive")).__name__
    (True, '_additive_finalize')
    """
    if not needs_private_finalize(cls):
        return None
    own = getattr(cls, "finalize_private", None)
    if own is not None:
        return lambda mech, value, parents, query: own(mech, value, parents, query)
    if cls.name in PRIVATE_FINALIZERS:
        return PRIVATE_FINALIZERS[cls.name]
    raise PrivacyError(f"mechanism {cls.name!r} computes constants from the training data in finalize() "
                       "and has no private version (finalize_private); it cannot be trained under "
                       "differential privacy: choose another mechanism for this variable")


def table_of(data) -> pd.DataFrame:
    """The table of a DataFrame or Cohort.

    >>> table_of(pd.DataFrame({"x": [1]})).shape
    (1, 1)
    """
    if isinstance(data, Cohort):
        return data.table
    if isinstance(data, pd.DataFrame):
        return data
    raise DataError(f"expected a pandas DataFrame or a medcausal Cohort, got {type(data).__name__}")

