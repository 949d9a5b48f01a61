r"""A ground-truth perturb-seq simulator: negative-binomial counts from latent programs.

Every cell has a context (``cell_type``, ``donor``), a treatment (``perturbation``:
``"control"``, a single perturbation ``"P3"`` or a combination ``"P1+P5"``, given at a
``dose``), three blocks of latent factors, a small causal graph of gene programs
driven by those factors, a library size and negative-binomial counts. Each cell's
exogenous noise is a fixed function of its id, so :meth:`PerturbSeq.counterfactual`
returns the *true counterfactual counts* of the same cells under any treatment or
context, and the true latent factors are returned alongside.

>>> sim = PerturbSeq(n_genes=50, seed=0)
>>> adata = sim.sample(200, seed=0)
>>> adata.shape, adata.obs_names[0], sorted(adata.obsm)[:2]
((200, 50), 'perturbseq:0:0', ['programs', 'z_context'])
>>> cf = sim.counterfactual(adata, do={"perturbation": "P0+P1"})
>>> bool((cf.obs["perturbation"] == "P0+P1").all()), cf.shape
(True, (200, 50))

Generative process (structural parameters are drawn once from the simulator's
``seed``; the cell noise from the cell id)
---------------------------------------------------------------------------------
Cell ``i`` with cell type ``c``, donor ``d``, treatment set ``S`` (empty for control)
and dose ``δ`` (0 for control):

* context factors      ``z_x  = m_c + m_d + exp(s_c) ⊙ ε_x``                        (``dim_context``)
* treatment factors    ``z_t  = δ Σ_{p∈S} a_p + σ_t ⊙ ε_t`` with
  ``log σ_t = log 0.5 + δ Σ_{p∈S} r_p``                                                (``dim_treatment``)
* interaction factors  ``z_tx = δ Σ_{p∈S} b_{p,c} + σ_tx ⊙ ε_tx`` with
  ``log σ_tx = log 0.5 + q_c + δ Σ_{p∈S} g_{p,c}``                                    (``dim_interaction``):
  the effect of a perturbation on these factors depends on the cell type (a
  treatment × context interaction), and so does their spread (log-scales clipped
  to [log 0.15, log 1.5]). The interaction has low rank: ``b_{p,c} = M_p e_c`` and
  ``g_{p,c} = G_p e_c + g_p`` with cell-type embeddings ``e_c`` of dimension
  ``interaction_rank``, so the effect of a perturbation in a cell type where it was
  never observed is determined by the other pairs (as in matrix completion) and a
  held-out (cell type, perturbation) pair is a well-posed prediction task;
* programs ``h`` (``K = dim_context + dim_treatment + dim_interaction``) on a random
  DAG whose edges run from earlier to later programs (context → treatment →
  interaction programs, and within blocks): ``h_j = z_j + Σ_{i∈pa(j)} A_ij tanh(h_i)``,
  where ``z = [z_x, z_t, z_tx]``. A perturbation acts on the treatment programs it
  targets (the nonzero entries of ``a_p``): as a *soft* intervention (the mean shift
  ``a_p`` of the program's own factor) or, for the perturbations listed in
  ``sim.hard``, as a *hard* one as well: the target programs lose their parents
  (``h_j = z_j``). Combinations act through the union of their members.
* gene log-proportions ``η = b + W a + V tanh(U h + c)`` with program activities
  ``a = 2 tanh(h / 2)`` (sparse loadings ``W``, ``V``; a nonlinear decoder), library
  size ``l = L exp(0.2 ξ)``, gene means ``μ = l softmax(η)``;
* counts ``y_g = F⁻¹_NB(u_g; μ_g, θ_g)``: the negative-binomial quantile function
  (mean ``μ_g``, inverse dispersion ``θ_g``) at a per-cell, per-gene uniform ``u_g``.

Exogenous noise ``ε_x, ε_t, ε_tx ~ N(0, I)``, ``ξ ~ N(0, 1)`` and ``u ~ U(0, 1)^G``
are functions of the cell id ``"perturbseq:<seed>:<row>"`` (a counter-based hash,
the same on every machine), and so is the cell's assignment to a context and a
treatment: ``sample(50, seed=s)`` is the first 50 cells of ``sample(100, seed=s)``.

Counterfactual consistency of the counts: the count noise is the uniform ``u_g``
itself, pushed through the NB quantile function of the counterfactual mean. The
coupling is monotone, so the factual world reproduces the observed counts exactly,
and a gene whose mean rises never loses counts in its counterfactual.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import betainc, ndtr, ndtri

from ..errors import DataError, InterventionError, MedCausalError
from ..graph import CausalGraph, Expression
from ..interventions import parse_do
from .tabular import _HAS_NP_STRINGS, _hash_uniform, _parse_ids

__all__ = ["PerturbSeq", "nb_cdf", "nb_normal_score", "nb_quantile", "nb_quantile_normal", "nb_sf",
           "parse_perturbation"]

_TAG = "perturbseq"
_MAX_SEED = 10**18
_ASSIGN = 8  # counters reserved per cell before the latent noise: assignment + library
_DO_KEYS = ("perturbation", "dose", "cell_type", "donor")


def _number(value: Any, name: str) -> float:
    """``float(value)`` for a finite real number, else a MedCausalError naming ``name``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if isinstance(value, (bool, str, bytes)) or not math.isfinite(out):
        raise MedCausalError(f"PerturbSeq: {name} must be a finite number, got {value!r}")
    return out


def nb_cdf(k: np.ndarray, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Negative-binomial CDF ``P(Y <= k)`` for mean ``mean`` and inverse dispersion ``theta``.

    ``P(Y <= k) = I_p(θ, k + 1)`` with ``p = θ / (θ + μ)`` (the regularized incomplete beta).

    >>> from scipy import stats
    >>> bool(np.isclose(nb_cdf(3, 2.0, 5.0), stats.nbinom.cdf(3, 5.0, 5.0 / 7.0)))
    True
    """
    k, mean, theta = np.broadcast_arrays(np.asarray(k, float), np.asarray(mean, float),
                                         np.asarray(theta, float))
    out = np.where(k < 0, 0.0, 1.0)
    ok = k >= 0
    out[ok] = betainc(theta[ok], np.floor(k[ok]) + 1.0, theta[ok] / (theta[ok] + mean[ok]))
    return out


def _check_nb(where: str, mean: np.ndarray, theta: np.ndarray) -> None:
    bad = ~(np.isfinite(mean) & np.isfinite(theta)) | (mean < 0) | (theta <= 0)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} entries have a non-finite or negative mean "
                         "or a non-positive theta")


def nb_quantile(u: np.ndarray, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Negative-binomial quantile function: the smallest ``k`` with ``P(Y <= k) >= u``.

    The same numbers as ``scipy.stats.nbinom.ppf(u, θ, θ / (θ + μ))``, many times
    faster on count matrices: the CDF is accumulated with the pmf recurrence
    ``f(k + 1) = f(k) (k + θ) / (k + 1) · μ / (θ + μ)`` until it reaches ``u`` (work
    proportional to the counts themselves). Entries still unresolved after 256 steps
    (large means, or heavy tails when θ is small) and entries whose ``f(0)`` underflows
    are found by exponential search and bisection on the exact CDF (:func:`nb_cdf`).

    >>> from scipy import stats
    >>> u = np.array([0.01, 0.5, 0.99]); mu = np.array([0.3, 20.0, 150.0])
    >>> nb_quantile(u, mu, 4.0).tolist() == stats.nbinom.ppf(u, 4.0, 4.0 / (4.0 + mu)).tolist()
    True
    """
    u, mean, theta = np.broadcast_arrays(np.asarray(u, float), np.asarray(mean, float),
                                         np.asarray(theta, float))
    shape = u.shape
    u, mean, theta = u.ravel(), mean.ravel(), theta.ravel()
    _check_nb("nb_quantile", mean, theta)
    bad = ~np.isfinite(u) | (u < 0) | (u > 1)  # u > 1 has no quantile: the search would not end
    if bad.any():
        raise ValueError(f"nb_quantile: {int(bad.sum())} entries have u outside [0, 1]")
    k = np.full(u.shape, -1.0)
    q = mean / (theta + mean)  # failure probability per trial
    log_f0 = -theta * np.log1p(mean / theta)  # log P(Y = 0), without cancellation for huge theta
    act = np.flatnonzero(log_f0 > -600.0)
    f = np.exp(log_f0[act])
    cum = f.copy()
    uu, qq, tt = u[act], q[act], theta[act]
    kk = 0.0
    while act.size and kk < 256:
        res = np.full(act.size, -1.0)
        for _ in range(8):  # a few full-array steps between compactions: most counts are small
            hit = (cum >= uu) & (res < 0)
            res[hit] = kk
            f *= (kk + tt) / (kk + 1.0) * qq
            kk += 1.0
            cum += f
        res[(res < 0) & (cum >= uu)] = kk
        k[act] = res
        go = res < 0
        act, f, cum, uu, qq, tt = act[go], f[go], cum[go], uu[go], qq[go], tt[go]
    rest = np.flatnonzero(k < 0)
    if rest.size:  # exponential search then bisection on the exact CDF
        m, th, ub = mean[rest], theta[rest], u[rest]
        lo = np.full(rest.size, -1.0)  # F(lo) < u
        hi = np.maximum(np.floor(m), 1.0)
        below = nb_cdf(hi, m, th) < ub
        while below.any():
            lo[below] = hi[below]
            hi[below] *= 2.0
            below[below] = nb_cdf(hi[below], m[below], th[below]) < ub[below]
        gap = hi - lo > 1.0
        while gap.any():
            mid = np.floor((lo[gap] + hi[gap]) / 2.0)
            up = nb_cdf(mid, m[gap], th[gap]) >= ub[gap]
            idx = np.flatnonzero(gap)
            hi[idx[up]] = mid[up]
            lo[idx[~up]] = mid[~up]
            gap = hi - lo > 1.0
        k[rest] = hi
    return k.reshape(shape)


def nb_sf(k: np.ndarray, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Negative-binomial survival function ``P(Y > k) = I_{μ/(θ+μ)}(k + 1, θ)``, precise in the upper tail.

    >>> from scipy import stats
    >>> bool(np.isclose(nb_sf(40, 2.0, 5.0), stats.nbinom.sf(40, 5.0, 5.0 / 7.0), rtol=1e-10))
    True
    """
    k, mean, theta = np.broadcast_arrays(np.asarray(k, float), np.asarray(mean, float),
                                         np.asarray(theta, float))
    out = np.ones(k.shape)
    ok = k >= 0
    out[ok] = betainc(np.floor(k[ok]) + 1.0, theta[ok], mean[ok] / (theta[ok] + mean[ok]))
    return out


def nb_normal_score(y: np.ndarray, mean: np.ndarray, theta: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The normal score ``z = Φ⁻¹(u)`` of ``u = F(y - 1) + v (F(y) - F(y - 1))``, ``v`` in (0, 1).

    A randomized probability-integral transform of a count: ``nb_quantile_normal(z)``
    gives ``y`` back. Computed from the CDF in the lower half and from the survival
    function in the upper half, so counts far in either tail keep their place (a
    plain uniform cannot resolve ``F(y - 1) > 1 - 1e-16``).

    >>> z = nb_normal_score(np.array([0.0, 3.0, 400.0]), 2.0, 5.0, np.full(3, 0.5))
    >>> nb_quantile_normal(z, 2.0, 5.0).tolist()
    [0.0, 3.0, 400.0]
    """
    y, mean, theta, v = np.broadcast_arrays(np.asarray(y, float), np.asarray(mean, float),
                                            np.asarray(theta, float), np.asarray(v, float))
    f_lo, f_hi = nb_cdf(y - 1.0, mean, theta), nb_cdf(y, mean, theta)
    upper = f_lo >= 0.5
    z = np.empty(y.shape)
    lo, hi = f_lo[~upper], f_hi[~upper]
    z[~upper] = ndtri(lo + _inside(v[~upper], hi - lo, hi) * (hi - lo))
    if upper.any():
        s_hi = nb_sf(y[upper] - 1.0, mean[upper], theta[upper])
        s_lo = nb_sf(y[upper], mean[upper], theta[upper])
        z[upper] = -ndtri(s_lo + (1.0 - _inside(v[upper], s_hi - s_lo, s_hi)) * (s_hi - s_lo))
    return np.clip(z, -37.0, 37.0)


def _inside(v: np.ndarray, width: np.ndarray, top: np.ndarray) -> np.ndarray:
    """``v`` kept far enough from 0 and 1 that ``edge + v * width`` survives the round trip
    through the normal score (``ndtri``/``ndtr``, CDF/survival) strictly inside an interval
    of ``width`` ending at ``top``, so the count comes back exactly: a margin of 1e-8 of
    ``top`` (measured: 1e-10 still lost 33 of 20000 random counts, 1e-8 none); for
    intervals wider than 1e-5 of ``top`` it moves ``v`` by less than 1e-3."""
    margin = np.minimum(0.5, 1e-8 * top / np.maximum(width, 1e-300))
    return np.clip(v, margin, 1.0 - margin)


def nb_quantile_normal(z: np.ndarray, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The NB quantile at ``Φ(z)``: the smallest ``k`` with ``P(Y <= k) >= Φ(z)``.

    Far in the upper tail (``P(Y > k)`` below 1e-8) the search runs on the survival
    function, where float64 still resolves the probabilities.

    >>> from scipy import stats
    >>> z = np.array([-1.0, 0.0, 2.0, 7.0])
    >>> nb_quantile_normal(z, 3.0, 2.0).tolist() == stats.nbinom.ppf(stats.norm.cdf(z), 2.0, 0.4).tolist()
    True
    """
    z, mean, theta = np.broadcast_arrays(np.asarray(z, float), np.asarray(mean, float),
                                         np.asarray(theta, float))
    _check_nb("nb_quantile_normal", mean, theta)  # before the tail search, which would not end on them
    if np.isnan(z).any():
        raise ValueError(f"nb_quantile_normal: {int(np.isnan(z).sum())} normal scores are NaN")
    s = ndtr(-z)
    tail = s < 1e-8
    k = np.empty(z.shape)
    body = ~tail
    k[body] = nb_quantile(np.where(z[body] <= 0, ndtr(z[body]), 1.0 - s[body]), mean[body], theta[body])
    if tail.any():  # smallest k with P(Y > k) <= s: exponential search, then bisection
        m, th, st = mean[tail], theta[tail], s[tail]
        lo = np.full(m.shape, -1.0)
        hi = np.maximum(np.floor(m), 1.0)
        above = nb_sf(hi, m, th) > st
        while above.any():
            lo[above] = hi[above]
            hi[above] *= 2.0
            above[above] = nb_sf(hi[above], m[above], th[above]) > st[above]
        gap = hi - lo > 1.0
        while gap.any():
            idx = np.flatnonzero(gap)
            mid = np.floor((lo[idx] + hi[idx]) / 2.0)
            ok = nb_sf(mid, m[idx], th[idx]) <= st[idx]
            hi[idx[ok]] = mid[ok]
            lo[idx[~ok]] = mid[~ok]
            gap = hi - lo > 1.0
        k[tail] = hi
    return k


def parse_perturbation(label: Any, control: str = "control", sep: str = "+") -> tuple[str, ...]:
    """The single perturbations in a label: ``()`` for the control, sorted members otherwise.

    >>> parse_perturbation("P3+P1"), parse_perturbation("control"), parse_perturbation("P2")
    (('P1', 'P3'), (), ('P2',))
    """
    text = str(label).strip()
    if text == control:
        return ()
    parts = [p.strip() for p in text.split(sep)]
    if any(not p for p in parts):
        raise DataError(f"perturbation {label!r} has an empty member; write combinations as "
                        f"'A{sep}B'")
    if control in parts:
        raise DataError(f"perturbation {label!r} combines the control {control!r} with a "
                        "perturbation; the control is written alone")
    if len(set(parts)) != len(parts):
        raise DataError(f"perturbation {label!r} names a member twice")
    return tuple(sorted(parts))


class PerturbSeq:
    """Simulated perturb-seq experiment with known latent factors and counterfactuals.

    Parameters set the experiment's design: ``n_cell_types`` × ``n_donors`` contexts,
    ``n_perturbations`` single perturbations ``P0, P1, ...`` and ``combinations``
    (a number of random pairs, or explicit labels such as ``["P0+P1"]``), the latent
    dimensions, the fraction of perturbations that are hard interventions,
    ``dose_levels`` for treated cells, ``library_size`` (mean counts per cell) and
    ``dispersion`` (median NB inverse dispersion θ). ``seed`` fixes the structural
    parameters; ``sample(seed=...)`` the cells.

    >>> sim = PerturbSeq(n_genes=30, n_perturbations=4, combinations=["P0+P1"], seed=1)
    >>> sim.conditions
    ['control', 'P0', 'P1', 'P2', 'P3', 'P0+P1']
    >>> sim.graph.parents("expression")
    ('cell_type', 'donor', 'perturbation', 'dose')
    """

    def __init__(self, n_genes: int = 1000, n_cell_types: int = 3, n_donors: int = 2,
                 n_perturbations: int = 8, combinations: int | Sequence[str] = 8,
                 dim_context: int = 4, dim_treatment: int = 4, dim_interaction: int = 4,
                 interaction_rank: int = 2, hard_fraction: float = 0.25, dose_levels: Sequence[float] = (0.5, 1.0),
                 control_fraction: float = 0.2, library_size: float = 2000.0,
                 dispersion: float = 5.0, seed: int = 0):
        for name, v, lo in (("n_genes", n_genes, 1), ("n_cell_types", n_cell_types, 1),
                            ("n_donors", n_donors, 1), ("n_perturbations", n_perturbations, 1),
                            ("dim_context", dim_context, 1), ("dim_treatment", dim_treatment, 1),
                            ("dim_interaction", dim_interaction, 1), ("interaction_rank", interaction_rank, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise MedCausalError(f"PerturbSeq: {name} must be an integer >= {lo}, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
            raise MedCausalError(f"PerturbSeq: seed must be an integer in [0, 10**18), got {seed!r}")
        hard_fraction, control_fraction, library_size, dispersion = (
            _number(v, name) for v, name in ((hard_fraction, "hard_fraction"),
                                             (control_fraction, "control_fraction"),
                                             (library_size, "library_size"), (dispersion, "dispersion")))
        if not 0.0 <= hard_fraction <= 1.0:
            raise MedCausalError(f"PerturbSeq: hard_fraction must lie in [0, 1], got {hard_fraction}")
        if not 0.0 <= control_fraction < 1.0:
            raise MedCausalError(f"PerturbSeq: control_fraction must lie in [0, 1), got {control_fraction}")
        if isinstance(dose_levels, (str, bytes)) or np.ndim(dose_levels) != 1:
            raise MedCausalError(f"PerturbSeq: dose_levels must be a list of positive numbers, got {dose_levels!r}")
        doses = [_number(d, "dose_levels") for d in dose_levels]
        if not doses or any(d <= 0 for d in doses):
            raise MedCausalError(f"PerturbSeq: dose_levels must be positive numbers, got {dose_levels}")
        for name, v in (("library_size", library_size), ("dispersion", dispersion)):
            if not v > 0:
                raise MedCausalError(f"PerturbSeq: {name} must be positive, got {v}")
        self.n_genes, self.seed = int(n_genes), int(seed)
        self.dims = {"context": int(dim_context), "treatment": int(dim_treatment),
                     "interaction": int(dim_interaction)}
        self.cell_types = [f"CT{i}" for i in range(int(n_cell_types))]
        self.donors = [f"D{i}" for i in range(int(n_donors))]
        self.perturbations = [f"P{i}" for i in range(int(n_perturbations))]
        self.control = "control"
        self.dose_levels = doses
        self.control_fraction = float(control_fraction)
        self.library_size, self.dispersion = float(library_size), float(dispersion)
        self.hard_fraction = float(hard_fraction)
        self.interaction_rank = int(interaction_rank)
        rng = np.random.default_rng(self.seed)
        self.combinations = self._combinations(combinations, rng)
        self.conditions = [self.control] + self.perturbations + self.combinations
        self._draw_parameters(rng)
        self._config = {"n_genes": self.n_genes, "n_cell_types": len(self.cell_types),
                        "n_donors": len(self.donors), "n_perturbations": len(self.perturbations),
                        "combinations": list(self.combinations), "dim_context": self.dims["context"],
                        "dim_treatment": self.dims["treatment"],
                        "dim_interaction": self.dims["interaction"],
                        "interaction_rank": self.interaction_rank, "hard_fraction": self.hard_fraction,
                        "dose_levels": self.dose_levels, "control_fraction": self.control_fraction,
                        "library_size": self.library_size, "dispersion": self.dispersion,
                        "seed": self.seed}
        self.fingerprint = hashlib.sha256(json.dumps(self._config, sort_keys=True).encode()
                                          ).hexdigest()[:16]

    # ------------------------------------------------------------------ structure
    def _combinations(self, combinations, rng) -> list[str]:
        singles = self.perturbations
        if isinstance(combinations, (int, np.integer)) and not isinstance(combinations, bool):
            pairs = [(a, b) for i, a in enumerate(singles) for b in singles[i + 1:]]
            k = min(int(combinations), len(pairs))
            if k < 0:
                raise MedCausalError(f"PerturbSeq: combinations must be >= 0, got {combinations}")
            pick = np.sort(rng.choice(len(pairs), size=k, replace=False)) if k else []
            return [f"{pairs[i][0]}+{pairs[i][1]}" for i in pick]
        if isinstance(combinations, str):  # one label, not its characters
            combinations = [combinations]
        out = []
        for label in combinations:
            members = parse_perturbation(label, self.control)
            unknown = [m for m in members if m not in singles]
            if unknown or len(members) < 2:
                raise MedCausalError(f"PerturbSeq: combination {label!r} must join >= 2 of the "
                                     f"single perturbations {singles}; unknown: {unknown}")
            canon = "+".join(members)
            if canon in out:
                raise MedCausalError(f"PerturbSeq: combination {label!r} is listed twice (as {canon!r})")
            out.append(canon)
        return out

    def _draw_parameters(self, rng: np.random.Generator) -> None:
        C, D, P = len(self.cell_types), len(self.donors), len(self.perturbations)
        kx, kt, ktx = self.dims["context"], self.dims["treatment"], self.dims["interaction"]
        K, G = kx + kt + ktx, self.n_genes

        def signed(size, lo, hi):
            return rng.choice([-1.0, 1.0], size=size) * rng.uniform(lo, hi, size=size)

        # context: cell-type and donor means, cell-type-specific spread
        self._m_ct = rng.normal(0.0, 1.5, (C, kx))
        self._m_donor = rng.normal(0.0, 0.75, (D, kx))
        self._s_ct = np.log(0.45) + rng.normal(0.0, 0.25, (C, kx))
        # treatment: each perturbation shifts one or two treatment factors
        self._a = np.zeros((P, kt))
        for p in range(P):
            dims = rng.choice(kt, size=min(kt, 1 + int(rng.random() < 0.5)), replace=False)
            self._a[p, dims] = signed(len(dims), 1.5, 3.0)
        self._r = rng.normal(0.0, 0.3, (P, kt))
        self._log_sigma_t = np.log(0.5)
        # interaction: a low-rank treatment x cell-type effect, b_{p,c} = M_p e_c (likewise g_{p,c})
        r = self.interaction_rank
        self._e = rng.normal(0.0, 1.0, (C, r))  # cell-type interaction embeddings
        self._M = np.zeros((P, ktx, r))
        for p in range(P):
            dims = rng.choice(ktx, size=min(ktx, 1 + int(rng.random() < 0.5)), replace=False)
            self._M[p, dims] = rng.normal(0.0, 1.2, (len(dims), r))
        self._G = rng.normal(0.0, 0.4, (P, ktx, r))
        self._g0 = rng.normal(0.0, 0.4, (P, ktx))
        self._b = np.einsum("pkr,cr->pck", self._M, self._e)
        self._g = np.einsum("pkr,cr->pck", self._G, self._e) + self._g0[:, None, :]
        self._q = rng.normal(0.0, 0.4, (C, ktx))
        self._log_sigma_tx = np.log(0.5)
        # hard interventions: a fraction of the perturbations also cut their targets' parents
        n_hard = int(round(self.hard_fraction * P))
        hard = np.sort(rng.choice(P, size=n_hard, replace=False)) if n_hard else np.zeros(0, int)
        self.hard = [self.perturbations[i] for i in hard]
        self._targets = [kx + np.flatnonzero(self._a[p]) for p in range(P)]
        # programs: a random DAG in block order, edges from earlier to later programs
        A = np.zeros((K, K))
        for j in range(1, K):
            for i in range(j):
                if rng.random() < 0.3:
                    A[i, j] = signed(1, 0.5, 1.0)[0]
        self.program_graph = A
        # decoder to gene log-proportions
        H = 16
        self._b_gene = rng.normal(0.0, 0.8, G)
        self._W = rng.normal(0.0, 0.5, (G, K)) * (rng.random((G, K)) < 0.15)
        self._U = rng.normal(0.0, 1.0 / np.sqrt(K), (H, K))
        self._c = rng.normal(0.0, 0.5, H)
        self._V = rng.normal(0.0, 0.3, (G, H)) * (rng.random((G, H)) < 0.2)
        self.theta = np.exp(np.log(self.dispersion) + rng.normal(0.0, 0.5, G))
        self._stride = _ASSIGN + K + G

    @property
    def graph(self) -> CausalGraph:
        """The observed-variable graph: context and treatment → expression."""
        cats = {"cell_type": {"type": "categorical", "categories": self.cell_types}
                if len(self.cell_types) > 1 else "categorical",
                "donor": {"type": "categorical", "categories": self.donors}
                if len(self.donors) > 1 else "categorical",
                "perturbation": {"type": "categorical", "categories": self.conditions}}
        variables = {**cats, "dose": "continuous", "expression": Expression(self.n_genes)}
        return CausalGraph(variables, edges=[(v, "expression") for v in
                                             ("cell_type", "donor", "perturbation", "dose")])

    def __repr__(self) -> str:
        return (f"PerturbSeq(n_genes={self.n_genes}, contexts={len(self.cell_types)}x{len(self.donors)}, "
                f"perturbations={len(self.perturbations)}+{len(self.combinations)} combinations, "
                f"library_size={self.library_size:g}, seed={self.seed})")

    # ------------------------------------------------------------------ noise
    def _uniforms(self, seeds: np.ndarray, rows: np.ndarray, offset: int, d: int) -> np.ndarray:
        counters = (rows.astype(np.uint64)[:, None] * np.uint64(self._stride)
                    + np.uint64(offset) + np.arange(d, dtype=np.uint64)[None, :])
        return _hash_uniform(seeds.astype(np.uint64)[:, None], counters)

    def _ids_of(self, index) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(index, dtype=object)
        seeds, rows, bad = _parse_ids(ids, _TAG)
        if bad.any():
            first = ids[np.flatnonzero(bad)[0]]
            raise DataError(f"cell {first!r} was not produced by {self!r} ({int(bad.sum())} of "
                            f"{len(ids)} cells are foreign); its cells are named "
                            f"'{_TAG}:<seed>:<row>' in obs_names: keep them when subsetting")
        return seeds, rows

    def noise(self, adata) -> dict[str, np.ndarray]:
        """The exogenous noise of the given cells (recomputed from their ids).

        Keys ``"context"``, ``"treatment"``, ``"interaction"`` (standard normal, one
        column per factor), ``"library"`` (standard normal ``[n]``) and ``"counts"``
        (uniforms ``[n, n_genes]``).

        >>> sim = PerturbSeq(n_genes=10, seed=0)
        >>> a = sim.sample(5, seed=3)
        >>> e = sim.noise(a[[4, 1]])
        >>> bool(np.allclose(e["context"], sim.noise(a)["context"][[4, 1]]))
        True
        """
        index = adata.obs_names if hasattr(adata, "obs_names") else pd.Index(list(adata))
        seeds, rows = self._ids_of(index)
        kx, kt, ktx = self.dims["context"], self.dims["treatment"], self.dims["interaction"]
        eps = ndtri(self._uniforms(seeds, rows, _ASSIGN, kx + kt + ktx))
        lib = ndtri(self._uniforms(seeds, rows, 4, 1))[:, 0]
        counts = self._uniforms(seeds, rows, _ASSIGN + kx + kt + ktx, self.n_genes)
        return {"context": eps[:, :kx], "treatment": eps[:, kx:kx + kt],
                "interaction": eps[:, kx + kt:], "library": lib, "counts": counts}

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, seed: int = 0, conditions: Sequence[str] | None = None,
               exclude: Iterable[tuple[str, str]] = ()):
        """Draw ``n`` cells as an AnnData (counts in ``X`` and ``layers["counts"]``).

        ``conditions`` restricts the treatments drawn (default: ``self.conditions``);
        ``exclude`` lists ``(cell_type, perturbation)`` pairs never drawn. A treated
        cell gets the control with probability ``control_fraction`` (when the control
        is among the conditions), else one of the other conditions uniformly, and a
        dose drawn uniformly from ``dose_levels``.

        ``.obs``: ``cell_type``, ``donor``, ``perturbation``, ``dose``;
        ``.obsm``: the true factors ``z_context``, ``z_treatment``, ``z_interaction``
        and ``programs``; ``.uns["perturbseq"]``: the simulator's configuration.

        >>> sim = PerturbSeq(n_genes=20, seed=0)
        >>> a = sim.sample(300, seed=0, conditions=["control", "P1"], exclude=[("CT0", "P1")])
        >>> sorted(a.obs["perturbation"].unique()), bool((a.obs.query("cell_type == 'CT0'")
        ...     ["perturbation"] == "control").all())
        (['P1', 'control'], True)
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise MedCausalError(f"sample: n must be an integer >= 0, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
            raise MedCausalError(f"sample: seed must be an integer in [0, 10**18), got {seed!r}")
        n, seed = int(n), int(seed)
        if isinstance(conditions, str):  # one label, not its characters
            conditions = [conditions]
        conds = list(dict.fromkeys(self._check_label(c, "sample(conditions=...)") for c in
                                   (self.conditions if conditions is None else conditions)))
        if not conds:
            raise MedCausalError("sample: conditions is empty")
        pairs = list(exclude)
        for pair in pairs:
            if isinstance(pair, str) or np.ndim(pair) != 1 or len(pair) != 2:
                raise MedCausalError(f"sample: exclude must list (cell_type, perturbation) pairs, "
                                     f"got {pair!r}")
        excluded = {(str(c), self._check_label(p, "sample(exclude=...)")) for c, p in pairs}
        for c, _ in excluded:
            if c not in self.cell_types:
                raise MedCausalError(f"sample: exclude names unknown cell type {c!r}; "
                                     f"known: {self.cell_types}")
        seeds = np.full(n, seed, dtype=np.uint64)
        rows = np.arange(n, dtype=np.uint64)
        u = self._uniforms(seeds, rows, 0, 4)
        ct = np.minimum((u[:, 0] * len(self.cell_types)).astype(int), len(self.cell_types) - 1)
        donor = np.minimum((u[:, 1] * len(self.donors)).astype(int), len(self.donors) - 1)
        labels = np.empty(n, dtype=object)
        for c, name in enumerate(self.cell_types):
            allowed = [x for x in conds if (name, x) not in excluded]
            if not allowed:
                raise MedCausalError(f"sample: every condition is excluded for cell type {name!r}")
            treated = [x for x in allowed if x != self.control]
            has_ctrl = self.control in allowed
            m = ct == c
            uc = u[m, 2]
            if has_ctrl and treated:
                p_ctrl = self.control_fraction
                k = np.minimum(((uc - p_ctrl) / (1 - p_ctrl) * len(treated)).astype(int), len(treated) - 1)
                labels[m] = np.where(uc < p_ctrl, self.control,
                                     np.asarray(treated, dtype=object)[np.maximum(k, 0)])
            else:
                pool = treated or [self.control]
                k = np.minimum((uc * len(pool)).astype(int), len(pool) - 1)
                labels[m] = np.asarray(pool, dtype=object)[k]
        dose_idx = np.minimum((u[:, 3] * len(self.dose_levels)).astype(int), len(self.dose_levels) - 1)
        dose = np.where(labels == self.control, 0.0, np.asarray(self.dose_levels)[dose_idx])
        obs = pd.DataFrame({"cell_type": pd.Categorical(np.asarray(self.cell_types)[ct],
                                                        categories=self.cell_types),
                            "donor": pd.Categorical(np.asarray(self.donors)[donor],
                                                    categories=self.donors),
                            "perturbation": pd.Categorical(labels, categories=conds),
                            "dose": dose}, index=self._make_ids(seed, n))
        return self._simulate(obs, provenance={"kind": "sample", "seed": seed})

    def counterfactual(self, adata, do: Mapping[str, Any] | None):
        """The true counterfactual of the given cells under ``do``: same cells, same noise.

        ``do`` sets any of ``perturbation`` (a label or per-cell labels), ``dose``,
        ``cell_type`` and ``donor``. When the perturbation changes and no dose is
        given, treated cells keep their dose and control cells get the largest dose
        level; a control has dose 0. Returns a new AnnData with the counterfactual
        counts, obs, true factors and ``.uns["medcausal"]`` provenance. ``do=None`` or ``{}``
        is the null intervention (the cells as they are), as for the other simulators.

        >>> sim = PerturbSeq(n_genes=20, seed=0)
        >>> a = sim.sample(50, seed=0)
        >>> same = sim.counterfactual(a, do={"perturbation": a.obs["perturbation"].to_numpy()})
        >>> bool((same.layers["counts"] != a.layers["counts"]).nnz == 0)
        True
        """
        obs = self._check_adata(adata)
        do = {} if do is None else do
        if not isinstance(do, Mapping):
            raise InterventionError("counterfactual: do= must be a dict, e.g. {'perturbation': 'P0+P1'}")
        unknown = [k for k in do if k not in _DO_KEYS]
        if unknown:
            raise InterventionError(f"counterfactual: cannot intervene on {unknown}; "
                                    f"intervenable: {list(_DO_KEYS)}")
        n = len(obs)
        do = {k: iv.spec for k, iv in parse_do(do, _DO_KEYS, index=obs.index).items()}  # a Series by cell name
        new = obs.copy()
        for key in ("cell_type", "donor", "perturbation"):
            if key not in do:
                continue
            vals = self._per_cell(do[key], n, key)
            known = {"cell_type": self.cell_types, "donor": self.donors}.get(key)
            if known is not None:
                bad = sorted({v for v in vals if v not in known})
                if bad:
                    raise InterventionError(f"do({key}=...): unknown value(s) {bad}; known: {known}")
                new[key] = pd.Categorical(vals, categories=known)
            else:
                canon = [self._check_label(v, "do(perturbation=...)") for v in vals]
                cats = list(dict.fromkeys(list(obs["perturbation"].astype(str).unique()) + canon))
                new[key] = pd.Categorical(canon, categories=cats)
        pert = new["perturbation"].astype(str).to_numpy()
        is_ctrl = pert == self.control
        if "dose" in do:
            per_cell = self._per_cell(do["dose"], n, "dose")  # its own errors name the problem
            try:
                d = np.asarray(per_cell, dtype=float)
            except (TypeError, ValueError):
                raise InterventionError(f"do(dose=...): doses must be numbers, got {do['dose']!r}") from None
            if not np.all(np.isfinite(d)) or (d[~is_ctrl] <= 0).any():
                raise InterventionError("do(dose=...): doses of treated cells must be positive numbers")
            dose = d
        else:
            dose = obs["dose"].to_numpy(dtype=float).copy()
            dose[(dose <= 0) & ~is_ctrl] = max(self.dose_levels)
        new["dose"] = np.where(is_ctrl, 0.0, dose)
        new["factual_perturbation"] = obs["perturbation"].astype(str).to_numpy()
        spec = {k: (v if np.ndim(v) == 0 else f"<{n} per-cell values>") for k, v in do.items()}
        return self._simulate(new, provenance={"kind": "true counterfactual", "do": json.dumps(
            {k: (v.item() if isinstance(v, np.generic) else v) for k, v in spec.items()})})

    def expected_counts(self, adata, do: Mapping[str, Any] | None = None) -> np.ndarray:
        """The NB means ``μ`` (true expected counts) of the given cells, ``[n, n_genes]``.

        >>> sim = PerturbSeq(n_genes=20, seed=0)
        >>> sim.expected_counts(sim.sample(4, seed=0)).shape
        (4, 20)
        """
        if do:
            adata = self.counterfactual(adata, do)
        obs = self._check_adata(adata)
        return self._forward(obs)["mean"]

    # ------------------------------------------------------------------ the model
    def _forward(self, obs: pd.DataFrame) -> dict[str, np.ndarray]:
        n = len(obs)
        noise = self.noise(obs.index)
        ct = pd.Categorical(obs["cell_type"].astype(str), categories=self.cell_types).codes
        donor = pd.Categorical(obs["donor"].astype(str), categories=self.donors).codes
        dose = obs["dose"].to_numpy(dtype=float)
        members = np.zeros((n, len(self.perturbations)))  # multi-hot treatment
        col = {p: i for i, p in enumerate(self.perturbations)}
        labels = obs["perturbation"].astype(str).to_numpy()
        for lab in np.unique(labels):
            idx = [col[m] for m in parse_perturbation(lab, self.control)]
            members[np.ix_(labels == lab, idx)] = 1.0
        t = members * dose[:, None]
        z_x = self._m_ct[ct] + self._m_donor[donor] + np.exp(self._s_ct[ct]) * noise["context"]
        log_s_t = np.clip(self._log_sigma_t + t @ self._r, np.log(0.15), np.log(1.5))
        z_t = t @ self._a + np.exp(log_s_t) * noise["treatment"]
        b_c = self._b[:, ct, :].transpose(1, 0, 2)  # [n, P, ktx]
        g_c = self._g[:, ct, :].transpose(1, 0, 2)
        mu_tx = np.einsum("np,npk->nk", t, b_c)
        log_s_tx = np.clip(self._log_sigma_tx + self._q[ct] + np.einsum("np,npk->nk", t, g_c),
                           np.log(0.15), np.log(1.5))
        z_tx = mu_tx + np.exp(log_s_tx) * noise["interaction"]
        z = np.concatenate([z_x, z_t, z_tx], axis=1)
        cut = np.zeros_like(z, dtype=bool)  # programs that lost their parents (hard interventions)
        for p in self.hard:
            j = col[p]
            cut[np.ix_(members[:, j] > 0, self._targets[j])] = True
        h = np.zeros_like(z)
        A = self.program_graph
        for j in range(z.shape[1]):
            h[:, j] = z[:, j] + np.where(cut[:, j], 0.0, np.tanh(h[:, :j]) @ A[:j, j])
        act = 2.0 * np.tanh(h / 2.0)  # program activity saturates: no gene takes over a cell
        eta = self._b_gene + act @ self._W.T + np.tanh(h @ self._U.T + self._c) @ self._V.T
        eta -= eta.max(axis=1, keepdims=True)
        prop = np.exp(eta)
        prop /= prop.sum(axis=1, keepdims=True)
        lib = self.library_size * np.exp(0.2 * noise["library"])
        mean = lib[:, None] * prop
        return {"z_context": z_x, "z_treatment": z_t, "z_interaction": z_tx, "programs": h,
                "mean": mean, "uniform": noise["counts"]}

    def _simulate(self, obs: pd.DataFrame, provenance: dict):
        import anndata as ad

        out = self._forward(obs)
        theta = self.theta[None, :]
        counts = nb_quantile(out["uniform"], out["mean"], np.broadcast_to(theta, out["mean"].shape))
        X = sparse.csr_matrix(counts.astype(np.float32))
        adata = ad.AnnData(X=X, obs=obs.copy(),
                           var=pd.DataFrame({"theta": self.theta},
                                            index=pd.Index([f"g{j:04d}" for j in range(self.n_genes)])))
        adata.layers["counts"] = X.copy()
        for key in ("z_context", "z_treatment", "z_interaction", "programs"):
            adata.obsm[key] = out[key].astype(np.float32)
        adata.uns["perturbseq"] = {**self._config, "fingerprint": self.fingerprint,
                                   "control": self.control, "hard": list(self.hard)}
        adata.uns["medcausal"] = {"source": "medcausal.synthetic.PerturbSeq", **provenance}
        return adata

    # ------------------------------------------------------------------ helpers
    def _check_label(self, label: Any, where: str) -> str:
        try:
            members = parse_perturbation(label, self.control)
        except DataError as e:
            raise InterventionError(f"{where}: {e}") from None
        unknown = [m for m in members if m not in self.perturbations]
        if unknown:
            raise InterventionError(f"{where}: perturbation {label!r} names unknown member(s) "
                                    f"{unknown}; known single perturbations: {self.perturbations}")
        return "+".join(members) or self.control

    @staticmethod
    def _per_cell(value: Any, n: int, key: str) -> list:
        if callable(value):
            raise InterventionError(f"do({key}=...): give a value or per-cell values, not a callable")
        if np.ndim(value) == 0:
            return [value.item() if isinstance(value, np.generic) else value] * n
        vals = list(np.asarray(value, dtype=object).reshape(-1))
        if len(vals) != n:
            raise InterventionError(f"do({key}=...) has {len(vals)} values for {n} cells")
        return vals

    def _check_adata(self, adata) -> pd.DataFrame:
        if not hasattr(adata, "obs") or not hasattr(adata, "obs_names"):
            raise DataError(f"expected an AnnData from {self!r}.sample, got {type(adata).__name__}")
        fp = adata.uns.get("perturbseq", {}).get("fingerprint") if hasattr(adata, "uns") else None
        if fp is not None and fp != self.fingerprint:
            raise DataError(f"these cells come from another PerturbSeq configuration (fingerprint "
                            f"{fp!r}, this simulator {self.fingerprint!r})")
        obs = adata.obs
        missing = [k for k in ("cell_type", "donor", "perturbation", "dose") if k not in obs.columns]
        if missing:
            raise DataError(f"obs lacks column(s) {missing} written by PerturbSeq.sample; "
                            f"columns: {list(obs.columns)}")
        self._ids_of(obs.index)
        for key, known in (("cell_type", self.cell_types), ("donor", self.donors)):
            bad = sorted(set(obs[key].astype(str)) - set(known))
            if bad:
                raise DataError(f"obs[{key!r}] has unknown value(s) {bad}; known: {known}")
        for lab in obs["perturbation"].astype(str).unique():
            try:
                self._check_label(lab, "obs['perturbation']")
            except InterventionError as e:
                raise DataError(str(e)) from None
        try:
            dose = obs["dose"].to_numpy(dtype=float)
        except (TypeError, ValueError):
            raise DataError(f"obs['dose'] must be numeric, got dtype {obs['dose'].dtype}") from None
        bad = ~np.isfinite(dose) | (dose < 0)
        if bad.any():
            raise DataError(f"obs['dose'] must be finite and >= 0; {int(bad.sum())} cell(s) are not, "
                            f"e.g. {obs.index[np.flatnonzero(bad)[0]]!r} with {dose[bad][0]}")
        return obs

    @staticmethod
    def _make_ids(seed: int, n: int) -> pd.Index:
        prefix = f"{_TAG}:{seed}:"
        if _HAS_NP_STRINGS:
            ids = np.strings.add(prefix, np.arange(n).astype(str)).astype(object)
        else:  # numpy < 2.2
            ids = [f"{prefix}{i}" for i in range(n)]
        return pd.Index(ids)
