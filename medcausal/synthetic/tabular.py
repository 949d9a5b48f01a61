r"""Benchmark tabular structural causal models with exact counterfactuals.

The SCM family of Chao, Blöbaum & Kasiviswanathan, *Modeling Causal Mechanisms
with Diffusion Models for Interventional and Counterfactual Queries* (DCM,
TMLR 2024): ``chain``, ``triangle``, ``diamond``, ``y`` and the 30-variable
``ladder``, each in an additive and a non-additive variant. Every exogenous
noise is ``u_i ~ N(0, 1)``, independent; all variables are continuous scalars
named ``x1, x2, ...``.

>>> sim = scm("chain", additive=True)
>>> df = sim.sample(4, seed=0)
>>> list(df.columns), df.index.name
(['x1', 'x2', 'x3'], 'unit')
>>> cf = sim.counterfactual(df, do={"x1": 1.0})
>>> bool((cf["x1"] == 1.0).all()) and bool((cf.index == df.index).all())
True

Notation: ``s(z) = 1 / (1 + exp(-z))`` (logistic), ``silu(z) = z s(z)``.

Additive variants (the DCM paper's "nonlinear" equations, ``x = f(pa) + c u``)
------------------------------------------------------------------------------
chain    (x1 -> x2 -> x3)
    x1 = u1
    x2 = (exp(x1 / 2) + u2 / 4) / 0.65
    x3 = ((x2 - 5)^3 / 15 + u3) / 2.13
triangle (x1 -> x2, x1 -> x3, x2 -> x3)
    x1 = u1
    x2 = (2 x1^2 + u2) / 3
    x3 = (20 / (1 + exp(x1 - x2^2)) + u3) / 2.41
diamond  (x1 -> x2, x1 -> x3, x2 -> x3, x2 -> x4, x3 -> x4)
    x1 = u1
    x2 = (x1^2 + u2 / 2) / 1.5
    x3 = (x2^2 - 2 s(x1) + u3 / 2) / 1.27
    x4 = (x3 / (|x2 + x3| + 0.5) + u4 / 5) / 0.54
y        (x1 -> x3, x2 -> x3, x3 -> x4)
    x1 = u1,  x2 = u2
    x3 = (-x2^2 + 4 s(x1 + x2) + u3 / 2) / 1.83
    x4 = (20 / (1 + exp(x3^2 / 2 - x3)) + u4) / 3.26

Non-additive variants (designed here; strictly increasing in the own noise)
---------------------------------------------------------------------------
The DCM paper's non-additive equations are not monotone in the noise (they
use ``|u|`` and ``(u + x)^2``), so no method can recover their counterfactuals
from data. These variants keep the same graphs and the same spirit
(nonlinear, O(1)-O(10) values) but every equation is a heteroscedastic
location-scale model ``m(pa) + sigma(pa) u`` with ``sigma > 0`` or a
post-nonlinear model ``g(m(pa) + c u)`` with ``g`` strictly increasing, so
the noise is identifiable and a conditional flow can abduct it exactly.

chain
    x1 = u1
    x2 = exp((x1 + u2) / 2)
    x3 = 2 tanh(x2 - 1.5) + (0.2 + 2 s(x2 - 1.5)) u3
triangle
    x1 = u1
    x2 = 0.6 x1^2 + (0.3 + s(2 x1)) u2
    x3 = 1.5 asinh(3 (x2 - x1) + 2 u3)
diamond
    x1 = u1
    x2 = z + z^3 / 4,  z = x1 + u2 / 2
    x3 = 3 tanh(x2 / 2) - 2 s(x1) + (0.2 + 2 s(x1 - x2)) u3
    x4 = (x3 + u4) (0.5 + s(x2))
y
    x1 = u1,  x2 = u2
    x3 = 4 s(x1 + x2) - x2^2 / 2 + (0.2 + 2 s(x1 - x2)) u3
    x4 = 2 asinh(x3 + 1.5 u4)

Ladder (30 variables, as in DCM)
--------------------------------
Ten super-nodes of three variables each (super-node ``k`` holds
``x{3k-2}, x{3k-1}, x{3k}``), with super-node edges 1->2, 1->3, 2->4, 3->4,
3->5, 4->6, 5->6, 5->7, 6->8, 7->8, 7->9, 8->10, 9->10; an edge between
super-nodes joins every variable of the one to every variable of the other.
Super-node 1 is the root: ``x1, x2, x3 = u1, u2, u3``. For a variable at
position ``j`` (0, 1, 2) of super-node ``k`` with parent vector ``pa``
(all variables of the parent super-nodes, in order)::

    h = silu(W1_k pa)                 (16 hidden units)
    additive:      x = 0.75 (W2_k h)_j + u
    non-additive:  x = 0.75 (W2_k h)_j + (0.2 + 2 s((V2_k h)_j)) u

``W1_k`` (16 x |pa|), ``W2_k`` and ``V2_k`` (3 x 16) hold fixed weights drawn
uniformly from [-1, 1] by a deterministic hash (the same on every machine).
(DCM's non-additive ladder feeds ``u`` through the MLP, which is not
monotone in ``u``; the location-scale head replaces it.)

Vector (one 2-dimensional variable; ``scm("vector")``, not in ``scm_names()``)
------------------------------------------------------------------------------
``x1 -> x2``, ``x1 -> x3``, ``x2 -> x3``, where ``x3`` is a 2-vector
(``Continuous(dim=2)``, DataFrame columns ``x3[0]``, ``x3[1]``) with a 2-vector
noise ``u3 ~ N(0, I_2)``::

    x1 = u1
    m(x1, x2) = (0.65 (sin(x1) + x2 / 2),  2.7 (x1 x2 / 2 + cos(x2)))
    additive:      x2 = 1.5 tanh(x1) + 0.5 u2
                   x3 = m + S0 u3,          S0 = [[0.6, 0.25], [0.25, 0.5]]
    non-additive:  x2 = 1.5 tanh(x1) + (0.3 + 0.5 s(2 x1)) u2
                   x3 = m + S(x1, x2) u3,   S = R(th) diag(a, b) R(th)^T
                   th = (pi / 2) s(2 (x1 - x2)),  a = 0.2 + 1.2 s(2 x2),  b = 0.2 + 1.2 s(-2 x1)

``R(th)`` is the rotation by ``th``. In the non-additive variant the noise is
scaled along axes that turn with the parents, so the two coordinates are
correlated in a parent-dependent way and neither is a function of its own
noise coordinate: a model of each coordinate as a scalar (or of the vector as
location + fixed noise) is misspecified. ``S`` is symmetric positive definite,
so ``u -> m + S u`` is the gradient of the convex function ``m.u + u'Su/2``:
the multivariate analogue of "strictly increasing in the noise" (for every
parent value it is the unique such map, Brenier's optimal transport map, from
``N(0, I)`` to the variable's conditional law), which is what makes the
counterfactual well defined. Mechanisms that abduct another map with the same
law (e.g. a triangular, autoregressive one) answer a different counterfactual.
The constants make the two coordinates' marginal standard deviations equal
(non-additive: 1.20 both, to 0.1%; additive: 0.99 and 0.98, within 2%), so the
map stays symmetric after per-column standardization. Interventions on ``x3`` take ``[n, 2]`` arrays or callables.

Units and their noise
---------------------
``sample`` names each row ``"<name>-<add|nonadd>:<seed>:<row>"`` (index
``"unit"``), and the noise of unit ``(seed, row)`` is a fixed function of those
two numbers: a counter-based hash (SplitMix64) mapped through the normal
quantile function. So ``sim.noise(df)`` and ``sim.counterfactual(df, ...)``
work on any slice, reordering or CSV round trip of sampled data, as long as
the ``unit`` index travels with it; ``sample(50, seed=s)`` is the first 50
rows of ``sample(100, seed=s)``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
from scipy.special import expit, ndtri

from ..errors import DataError, InterventionError, MedCausalError
from ..graph import CausalGraph
from ..interventions import Intervention, parse_do

__all__ = ["TabularSCM", "VectorSCM", "scm", "scm_names"]

# --------------------------------------------------------------------------- #
# counter-based noise: unit (seed, row), variable j  ->  one N(0, 1) number
# --------------------------------------------------------------------------- #
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_STRIDE = 1024  # counters per unit: up to 1024 noise variables per unit
_SEED_SALT = np.uint64(0x6D656463617573)  # "medcaus"
_MAX_SEED = 10**18


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on a uint64 array (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _hash_uniform(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Uniforms in (0, 1) from uint64 keys and counters (broadcast together)."""
    with np.errstate(over="ignore"):
        k = _mix64(np.asarray(keys, dtype=np.uint64) ^ _SEED_SALT)
        z = _mix64(k + (np.asarray(counters, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


def _unit_noise(seeds: np.ndarray, rows: np.ndarray, d: int) -> np.ndarray:
    """Standard normal noise ``[n, d]`` of units ``(seeds[i], rows[i])``."""
    rows = np.asarray(rows, dtype=np.uint64)
    counters = rows[:, None] * np.uint64(_STRIDE) + np.arange(d, dtype=np.uint64)[None, :]
    return ndtri(_hash_uniform(np.asarray(seeds, dtype=np.uint64)[:, None], counters))


_HAS_NP_STRINGS = hasattr(np, "strings") and hasattr(np.strings, "partition")


def _parse_ids(ids: np.ndarray, tag: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ids ``"<tag>:<seed>:<row>"`` into uint64 seeds and rows, plus a mask of bad ids."""
    n = len(ids)
    seeds = np.zeros(n, dtype=np.uint64)
    rows = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return seeds, rows, np.zeros(0, dtype=bool)
    if _HAS_NP_STRINGS:
        text = ids.astype(str)
        head, _, rest = np.strings.partition(text, ":")
        seed_s, sep, row_s = np.strings.partition(rest, ":")
        ok = ((head == tag) & (sep == ":")
              & np.strings.isdigit(seed_s) & (np.strings.str_len(seed_s) <= 18)
              & np.strings.isdigit(row_s) & (np.strings.str_len(row_s) <= 18))
        if ok.any():
            seeds[ok] = seed_s[ok].astype(np.int64).astype(np.uint64)
            rows[ok] = row_s[ok].astype(np.int64).astype(np.uint64)
        return seeds, rows, ~ok
    ok = np.zeros(n, dtype=bool)  # numpy < 2.2: a plain loop
    for i, uid in enumerate(ids):
        parts = str(uid).split(":")
        if (len(parts) == 3 and parts[0] == tag and all(
                p.isdigit() and p.isascii() and len(p) <= 18 for p in parts[1:])):
            seeds[i], rows[i], ok[i] = int(parts[1]), int(parts[2]), True
    return seeds, rows, ~ok


def _fixed_uniform(key: int, shape: tuple[int, ...], low: float = -1.0, high: float = 1.0):
    """Deterministic, machine-independent uniform weights for the ladder."""
    size = int(np.prod(shape))
    u = _hash_uniform(np.uint64(key), np.arange(size, dtype=np.uint64))
    return (low + (high - low) * u).reshape(shape)


# --------------------------------------------------------------------------- #
# structural equations
# --------------------------------------------------------------------------- #
Fn = Callable[..., np.ndarray]  # (parents [n, p], u [n]) -> [n]


@dataclass(frozen=True)
class _Equation:
    """``fn(P, u)``, or ``fn(P, u, memo)`` with a per-pass memo dict when ``uses_memo``."""

    parents: tuple[str, ...]
    fn: Fn
    text: str
    uses_memo: bool = False

    def __call__(self, P: np.ndarray, u: np.ndarray, memo: dict | None = None) -> np.ndarray:
        if self.uses_memo:
            return self.fn(P, u, {} if memo is None else memo)
        return self.fn(P, u)


def _root(text: str = "u") -> _Equation:
    return _Equation((), lambda P, u: np.array(u, dtype=float, copy=True), text)


def _s(z):
    return expit(z)


def _silu(z):
    return z * expit(z)


def _chain(additive: bool):
    edges = [("x1", "x2"), ("x2", "x3")]
    if additive:
        eqs = {
            "x1": _root("x1 = u1"),
            "x2": _Equation(("x1",), lambda P, u: (np.exp(P[:, 0] / 2) + u / 4) / 0.65,
                            "x2 = (exp(x1/2) + u2/4) / 0.65"),
            "x3": _Equation(("x2",), lambda P, u: ((P[:, 0] - 5) ** 3 / 15 + u) / 2.13,
                            "x3 = ((x2 - 5)^3/15 + u3) / 2.13"),
        }
    else:
        eqs = {
            "x1": _root("x1 = u1"),
            "x2": _Equation(("x1",), lambda P, u: np.exp((P[:, 0] + u) / 2),
                            "x2 = exp((x1 + u2)/2)"),
            "x3": _Equation(("x2",),
                            lambda P, u: 2 * np.tanh(P[:, 0] - 1.5) + (0.2 + 2 * _s(P[:, 0] - 1.5)) * u,
                            "x3 = 2 tanh(x2 - 1.5) + (0.2 + 2 s(x2 - 1.5)) u3"),
        }
    return ["x1", "x2", "x3"], edges, eqs


def _triangle(additive: bool):
    edges = [("x1", "x2"), ("x1", "x3"), ("x2", "x3")]
    if additive:
        eqs = {
            "x1": _root("x1 = u1"),
            "x2": _Equation(("x1",), lambda P, u: (2 * P[:, 0] ** 2 + u) / 3,
                            "x2 = (2 x1^2 + u2) / 3"),
            "x3": _Equation(("x1", "x2"),
                            lambda P, u: (20 * _s(P[:, 1] ** 2 - P[:, 0]) + u) / 2.41,
                            "x3 = (20 / (1 + exp(x1 - x2^2)) + u3) / 2.41"),
        }
    else:
        eqs = {
            "x1": _root("x1 = u1"),
            "x2": _Equation(("x1",), lambda P, u: 0.6 * P[:, 0] ** 2 + (0.3 + _s(2 * P[:, 0])) * u,
                            "x2 = 0.6 x1^2 + (0.3 + s(2 x1)) u2"),
            "x3": _Equation(("x1", "x2"),
                            lambda P, u: 1.5 * np.arcsinh(3 * (P[:, 1] - P[:, 0]) + 2 * u),
                            "x3 = 1.5 asinh(3 (x2 - x1) + 2 u3)"),
        }
    return ["x1", "x2", "x3"], edges, eqs


def _diamond(additive: bool):
    edges = [("x1", "x2"), ("x1", "x3"), ("x2", "x3"), ("x2", "x4"), ("x3", "x4")]
    if additive:
        eqs = {
            "x1": _root("x1 = u1"),
            "x2": _Equation(("x1",), lambda P, u: (P[:, 0] ** 2 + u / 2) / 1.5,
                            "x2 = (x1^2 + u2/2) / 1.5"),
            "x3": _Equation(("x1", "x2"),
                            lambda P, u: (P[:, 1] ** 2 - 2 * _s(P[:, 0]) + u / 2) / 1.27,
                            "x3 = (x2^2 - 2 s(x1) + u3/2) / 1.27"),
            "x4": _Equation(("x2", "x3"),
                            lambda P, u: (P[:, 1] / (np.abs(P[:, 0] + P[:, 1]) + 0.5) + u / 5) / 0.54,
                            "x4 = (x3 / (|x2 + x3| + 0.5) + u4/5) / 0.54"),
        }
    else:
        def x2(P, u):
            z = P[:, 0] + u / 2
            return z + z ** 3 / 4

        eqs = {
            "x1": _root("x1 = u1"),
            "x2": _Equation(("x1",), x2, "x2 = z + z^3/4, z = x1 + u2/2"),
            "x3": _Equation(("x1", "x2"),
                            lambda P, u: (3 * np.tanh(P[:, 1] / 2) - 2 * _s(P[:, 0])
                                          + (0.2 + 2 * _s(P[:, 0] - P[:, 1])) * u),
                            "x3 = 3 tanh(x2/2) - 2 s(x1) + (0.2 + 2 s(x1 - x2)) u3"),
            "x4": _Equation(("x2", "x3"), lambda P, u: (P[:, 1] + u) * (0.5 + _s(P[:, 0])),
                            "x4 = (x3 + u4) (0.5 + s(x2))"),
        }
    return ["x1", "x2", "x3", "x4"], edges, eqs


def _y(additive: bool):
    edges = [("x1", "x3"), ("x2", "x3"), ("x3", "x4")]
    if additive:
        eqs = {
            "x1": _root("x1 = u1"),
            "x2": _root("x2 = u2"),
            "x3": _Equation(("x1", "x2"),
                            lambda P, u: (-P[:, 1] ** 2 + 4 * _s(P[:, 0] + P[:, 1]) + u / 2) / 1.83,
                            "x3 = (-x2^2 + 4 s(x1 + x2) + u3/2) / 1.83"),
            "x4": _Equation(("x3",),
                            lambda P, u: (20 * _s(P[:, 0] - P[:, 0] ** 2 / 2) + u) / 3.26,
                            "x4 = (20 / (1 + exp(x3^2/2 - x3)) + u4) / 3.26"),
        }
    else:
        eqs = {
            "x1": _root("x1 = u1"),
            "x2": _root("x2 = u2"),
            "x3": _Equation(("x1", "x2"),
                            lambda P, u: (4 * _s(P[:, 0] + P[:, 1]) - P[:, 1] ** 2 / 2
                                          + (0.2 + 2 * _s(P[:, 0] - P[:, 1])) * u),
                            "x3 = 4 s(x1 + x2) - x2^2/2 + (0.2 + 2 s(x1 - x2)) u3"),
            "x4": _Equation(("x3",), lambda P, u: 2 * np.arcsinh(P[:, 0] + 1.5 * u),
                            "x4 = 2 asinh(x3 + 1.5 u4)"),
        }
    return ["x1", "x2", "x3", "x4"], edges, eqs


_LADDER_SUPER_EDGES = ((1, 2), (1, 3), (2, 4), (3, 4), (3, 5), (4, 6), (5, 6),
                       (5, 7), (6, 8), (7, 8), (7, 9), (8, 10), (9, 10))
_LADDER_HIDDEN = 16
_LADDER_KEY = 0x1ADD3A  # fixed key of the ladder weights


class _HiddenLayer:
    """``silu(P @ W1^T)`` of one ladder super-node, computed once per pass.

    The three variables of a super-node share their parents; within one
    ``sample``/``counterfactual`` pass they receive the same stacked ``P`` and
    the hidden layer is kept in that pass's ``memo`` (freed with it).
    """

    def __init__(self, w1t: np.ndarray):
        self.w1t = w1t

    def __call__(self, P: np.ndarray, memo: dict) -> np.ndarray:
        hit = memo.get(id(self))
        if hit is not None and hit[0] is P:
            return hit[1]
        h = _silu(np.dot(P, self.w1t))
        memo[id(self)] = (P, h)
        return h


def _ladder(additive: bool):
    def members(k: int) -> list[str]:
        return [f"x{3 * (k - 1) + j}" for j in (1, 2, 3)]

    names = [v for k in range(1, 11) for v in members(k)]
    edges = [(a, b) for p, c in _LADDER_SUPER_EDGES for a in members(p) for b in members(c)]
    eqs: dict[str, _Equation] = {}
    for k in range(1, 11):
        parent_supers = [p for p, c in _LADDER_SUPER_EDGES if c == k]
        if not parent_supers:
            for j, v in enumerate(members(k)):
                eqs[v] = _root(f"{v} = u{3 * (k - 1) + j + 1}")
            continue
        parents = tuple(v for p in parent_supers for v in members(p))
        w1t = np.ascontiguousarray(
            _fixed_uniform(_LADDER_KEY * 100 + 3 * k, (_LADDER_HIDDEN, len(parents))).T)
        w2 = _fixed_uniform(_LADDER_KEY * 100 + 3 * k + 1, (3, _LADDER_HIDDEN))
        v2 = _fixed_uniform(_LADDER_KEY * 100 + 3 * k + 2, (3, _LADDER_HIDDEN))
        hidden = _HiddenLayer(w1t)  # shared by the three variables of super-node k
        for j, v in enumerate(members(k)):
            if additive:
                def fn(P, u, memo, hidden=hidden, w2j=w2[j]):
                    return 0.75 * np.dot(hidden(P, memo), w2j) + u
                text = f"{v} = 0.75 (W2_{k} silu(W1_{k} pa))_{j} + u"
            else:
                def fn(P, u, memo, hidden=hidden, w2j=w2[j], v2j=v2[j]):
                    h = hidden(P, memo)
                    return 0.75 * np.dot(h, w2j) + (0.2 + 2 * _s(np.dot(h, v2j))) * u
                text = (f"{v} = 0.75 (W2_{k} h)_{j} + (0.2 + 2 s((V2_{k} h)_{j})) u, "
                        f"h = silu(W1_{k} pa)")
            eqs[v] = _Equation(parents, fn, text, uses_memo=True)
    return names, edges, eqs


_BUILDERS = {"chain": _chain, "triangle": _triangle, "diamond": _diamond, "y": _y,
             "ladder": _ladder}


# --------------------------------------------------------------------------- #
# the simulator
# --------------------------------------------------------------------------- #
class TabularSCM:
    """A ground-truth SCM: samples units, keeps their noise, answers counterfactuals.

    Build one with :func:`scm`. ``graph`` is a :class:`~medcausal.graph.CausalGraph`
    of continuous variables; ``equations`` maps each variable to its structural
    equation as text.

    >>> sim = scm("y", additive=False)
    >>> sim.graph.parents("x3")
    ('x1', 'x2')
    >>> sim.sample(3, seed=1).shape
    (3, 4)
    """

    def __init__(self, name: str, additive: bool):
        names, edges, eqs = _BUILDERS[name](bool(additive))
        self.name = name
        self.additive = bool(additive)
        self.graph = CausalGraph({v: "continuous" for v in names}, edges=edges)
        self._order: tuple[str, ...] = self.graph.topological_order
        self._eqs = eqs
        for v in self._order:  # the equations must agree with the graph
            assert set(eqs[v].parents) == set(self.graph.parents(v)), v
        self._tag = f"{name}-{'add' if self.additive else 'nonadd'}"
        self.equations: dict[str, str] = {v: eqs[v].text for v in self._order}
        self._columns: list[str] = list(self._order)  # DataFrame columns (a vector has several)

    def __repr__(self) -> str:
        return f"scm({self.name!r}, additive={self.additive})"

    # ------------------------------------------------------------------ public
    def evaluate(self, name: str, parents: Mapping[str, Any], noise: Any) -> np.ndarray:
        """Evaluate the structural equation of ``name`` at given parent values and noise.

        ``parents`` maps each parent of ``name`` to an array (or scalar); ``noise``
        is that variable's exogenous noise. Arrays broadcast together.

        >>> sim = scm("chain", additive=True)
        >>> float(sim.evaluate("x2", {"x1": 0.0}, 0.0))  # (exp(0) + 0) / 0.65
        1.5384615384615383
        """
        self.graph._check(name)
        eq = self._eqs[name]
        missing = [p for p in eq.parents if p not in parents]
        if missing:
            raise DataError(f"evaluate({name!r}) needs parent value(s) for {missing}")
        arrays = [np.asarray(parents[p], dtype=float) for p in eq.parents]
        u = np.asarray(noise, dtype=float)
        shape = np.broadcast_shapes(u.shape, *(a.shape for a in arrays))
        flat_u = np.broadcast_to(u, shape).reshape(-1)
        P = (np.stack([np.broadcast_to(a, shape).reshape(-1) for a in arrays], axis=1)
             if arrays else np.empty((flat_u.shape[0], 0)))
        return eq(P, flat_u).reshape(shape)

    def sample(self, n: int, seed: int | None = 0, do: Mapping[str, Any] | None = None
               ) -> pd.DataFrame:
        """Draw ``n`` fresh units (observational, or interventional under ``do``).

        Columns are the variables in topological order; the index ``"unit"``
        holds ids ``"<name>-<add|nonadd>:<seed>:<row>"`` from which the unit's
        noise is recovered. ``seed=None`` draws a random seed (recorded in the ids).

        >>> sim = scm("chain", additive=True)
        >>> df = sim.sample(1000, seed=0, do={"x1": 1.0})
        >>> bool((df["x1"] == 1.0).all())
        True
        >>> sim.sample(2, seed=7).index.tolist()
        ['chain-add:7:0', 'chain-add:7:1']
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise MedCausalError(f"n must be a non-negative integer, got {n!r}")
        n = int(n)
        seed = self._check_seed(seed)
        ivs = parse_do(do, known=self._order)
        rows = np.arange(n, dtype=np.uint64)
        U = _unit_noise(np.full(n, seed, dtype=np.uint64), rows, len(self._order))
        vals: dict[str, np.ndarray] = {}
        stacks: dict = {}
        memo: dict = {}
        for j, v in enumerate(self._order):
            if v in ivs and not ivs[v].needs_current:
                vals[v] = self._apply(ivs[v], None, n)
                continue
            P = self._stack(vals, self._eqs[v].parents, n, stacks)
            x = self._eqs[v](P, U[:, j], memo)
            vals[v] = self._apply(ivs[v], x, n) if v in ivs else x
        return pd.DataFrame(vals, index=self._make_ids(seed, n), columns=list(self._order))

    def noise(self, data: pd.DataFrame | Iterable) -> pd.DataFrame:
        """The exogenous noise of units this simulator produced (same index).

        ``data`` is a DataFrame whose index holds the unit ids (or the ids
        themselves). Columns are named after the variable each noise drives.

        >>> sim = scm("chain", additive=True)
        >>> df = sim.sample(5, seed=0)
        >>> u = sim.noise(df.iloc[[3, 1]])
        >>> bool((u["x1"] == df["x1"].iloc[[3, 1]]).all())   # x1 = u1
        True
        """
        if isinstance(data, (pd.DataFrame, pd.Series)):
            index = data.index
        elif isinstance(data, pd.Index):
            index = data
        else:
            index = pd.Index(list(data), name="unit")
        U = self._noise_of(index)
        return pd.DataFrame(U, index=index.copy(), columns=list(self._order))

    def counterfactual(self, data: pd.DataFrame, do: Mapping[str, Any] | None
                       ) -> pd.DataFrame:
        """The true counterfactual of the units in ``data`` under ``do``.

        Abduction (the units' own noise), action (``do``), prediction (the
        structural equations, in topological order). Variables that are not
        descendants of an intervened variable are copied from ``data``; so is
        any variable whose parents did not change in a row. Same index, columns
        and row order as ``data``. ``data`` is read as observed in the unintervened
        world: for units drawn with ``sample(n, do=earlier)``, give that intervention
        again (``do={**earlier, ...}``), or a variable it fixed may change.

        >>> sim = scm("chain", additive=True)
        >>> df = sim.sample(3, seed=0)
        >>> cf = sim.counterfactual(df, do={"x2": lambda x: x + 1.0})
        >>> bool(np.allclose(cf["x2"], df["x2"] + 1)) and bool((cf["x1"] == df["x1"]).all())
        True
        """
        frame = self._check_frame(data)
        ivs = parse_do(do, known=self._order, index=frame.index)
        n = len(frame)
        U = self._noise_of(frame.index)
        affected = set(ivs)
        for v in ivs:
            affected |= self.graph.descendants(v)
        fact = {v: frame[v].to_numpy(dtype=float) for v in self._order}
        cf = dict(fact)
        cf_stacks: dict = {}
        fact_stacks: dict = {}
        memo: dict = {}
        for j, v in enumerate(self._order):
            if v not in affected:
                continue
            iv = ivs.get(v)
            if iv is not None and not iv.needs_current:
                cf[v] = self._apply(iv, None, n)
                continue
            parents = self._eqs[v].parents
            if parents:
                P_cf = self._stack(cf, parents, n, cf_stacks)
                same = np.all(P_cf == self._stack(fact, parents, n, fact_stacks), axis=1)
                x = np.where(same, fact[v], self._eqs[v](P_cf, U[:, j], memo))
            else:
                x = fact[v]
            cf[v] = self._apply(iv, x, n) if iv is not None else x
        out = data.copy()
        for v in self._order:
            if v in affected:
                out[v] = cf[v]
        return out

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _check_seed(seed) -> int:
        if seed is None:
            return secrets.randbelow(_MAX_SEED)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise MedCausalError(f"seed must be a non-negative integer or None, got {seed!r}")
        if not 0 <= int(seed) < _MAX_SEED:
            raise MedCausalError(f"seed must lie in [0, 10**18), got {seed}")
        return int(seed)

    @staticmethod
    def _stack(vals: Mapping[str, np.ndarray], names: tuple[str, ...], n: int,
               cache: dict) -> np.ndarray:
        """Parents as an ``[n, p]`` array; siblings with the same parents share it."""
        if names not in cache:
            cache[names] = (np.stack([vals[p] for p in names], axis=1) if names
                            else np.empty((n, 0)))
        return cache[names]

    def _make_ids(self, seed: int, n: int) -> pd.Index:
        prefix = f"{self._tag}:{seed}:"
        if _HAS_NP_STRINGS:
            ids = np.strings.add(prefix, np.arange(n).astype(str)).astype(object)
        else:  # numpy < 2.2
            ids = [f"{prefix}{i}" for i in range(n)]
        return pd.Index(ids, name="unit")

    @staticmethod
    def _apply(iv: Intervention, current: np.ndarray | None, n: int) -> np.ndarray:
        out = iv.apply(current, n)
        try:
            out = np.asarray(out, dtype=float)
        except (TypeError, ValueError):
            raise InterventionError(
                f"{iv.describe()}: values must be numbers for a continuous variable") from None
        if out.shape == (n, 1):
            out = out[:, 0]
        if out.shape != (n,):
            raise InterventionError(
                f"{iv.describe()}: expected {n} scalar values, got shape {out.shape}")
        if not np.all(np.isfinite(out)):
            raise InterventionError(f"{iv.describe()}: values must be finite")
        return out

    def _noise_of(self, index: pd.Index) -> np.ndarray:
        seeds, rows, bad = _parse_ids(np.asarray(index, dtype=object), self._tag)
        if bad.any():
            first = np.asarray(index, dtype=object)[np.flatnonzero(bad)[0]]
            raise DataError(
                f"unit {first!r} was not produced by {self!r} ({int(bad.sum())} of {len(bad)} "
                f"rows are foreign); its units are named '{self._tag}:<seed>:<row>'. Keep the "
                f"'unit' index when slicing or saving (pd.read_csv(path, index_col='unit')).")
        return _unit_noise(seeds, rows, len(self._columns))

    def _check_frame(self, data: Any) -> pd.DataFrame:
        if not isinstance(data, pd.DataFrame):
            raise DataError(f"counterfactual expects a pandas DataFrame from {self!r}.sample, "
                            f"got {type(data).__name__}")
        missing = [c for c in self._columns if c not in data.columns]
        if missing:
            raise DataError(f"data lack column(s) {missing} of {self!r}; "
                            f"columns given: {list(data.columns)}")
        for c in self._columns:
            col = data[c]
            if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
                raise DataError(f"column {c!r} must be numeric, got dtype {col.dtype}")
            if col.isna().any():
                raise DataError(f"column {c!r} has {int(col.isna().sum())} missing value(s)")
        return data


# --------------------------------------------------------------------------- #
# the vector SCM: one 2-dimensional variable
# --------------------------------------------------------------------------- #
def _vector(additive: bool):
    """Names, dims, edges and equations of ``scm("vector")`` (see the module docstring)."""
    names = ["x1", "x2", "x3"]
    dims = {"x1": 1, "x2": 1, "x3": 2}
    edges = [("x1", "x2"), ("x1", "x3"), ("x2", "x3")]

    def m(P):
        x1, x2 = P[:, 0], P[:, 1]
        return np.stack([0.65 * (np.sin(x1) + x2 / 2), 2.7 * (x1 * x2 / 2 + np.cos(x2))], axis=1)

    if additive:
        s0 = np.array([[0.6, 0.25], [0.25, 0.5]])
        eqs = {
            "x1": _root("x1 = u1"),
            "x2": _Equation(("x1",), lambda P, u: 1.5 * np.tanh(P[:, 0]) + 0.5 * u,
                            "x2 = 1.5 tanh(x1) + 0.5 u2"),
            "x3": _Equation(("x1", "x2"), lambda P, u: m(P) + u @ s0,
                            "x3 = m(x1, x2) + S0 u3, S0 = [[0.6, 0.25], [0.25, 0.5]]"),
        }
    else:
        def x3(P, u):
            x1, x2 = P[:, 0], P[:, 1]
            th = np.pi / 2 * _s(2 * (x1 - x2))
            a, b = 0.2 + 1.2 * _s(2 * x2), 0.2 + 1.2 * _s(-2 * x1)
            c, sn = np.cos(th), np.sin(th)
            s00, s11, s01 = a * c * c + b * sn * sn, a * sn * sn + b * c * c, (a - b) * c * sn
            return m(P) + np.stack([s00 * u[:, 0] + s01 * u[:, 1], s01 * u[:, 0] + s11 * u[:, 1]], axis=1)

        eqs = {
            "x1": _root("x1 = u1"),
            "x2": _Equation(("x1",), lambda P, u: 1.5 * np.tanh(P[:, 0]) + (0.3 + 0.5 * _s(2 * P[:, 0])) * u,
                            "x2 = 1.5 tanh(x1) + (0.3 + 0.5 s(2 x1)) u2"),
            "x3": _Equation(("x1", "x2"), x3,
                            "x3 = m(x1, x2) + R(th) diag(a, b) R(th)^T u3, th = (pi/2) s(2 (x1 - x2)), "
                            "a = 0.2 + 1.2 s(2 x2), b = 0.2 + 1.2 s(-2 x1)"),
        }
    return names, dims, edges, eqs


class VectorSCM(TabularSCM):
    """The ground-truth SCM ``scm("vector")``: scalars ``x1``, ``x2`` and a 2-vector ``x3``.

    Same protocol as :class:`TabularSCM` (``sample``, ``noise``, ``counterfactual``,
    ``evaluate``); the vector lives in DataFrame columns ``x3[0]``, ``x3[1]``, and so
    does its noise in :meth:`noise`.

    >>> sim = scm("vector", additive=False)
    >>> df = sim.sample(3, seed=0)
    >>> list(df.columns)
    ['x1', 'x2', 'x3[0]', 'x3[1]']
    >>> cf = sim.counterfactual(df, do={"x1": 0.5})
    >>> bool((cf["x1"] == 0.5).all()) and cf.shape == df.shape
    True
    """

    def __init__(self, name: str, additive: bool):
        from ..graph import Continuous
        names, dims, edges, eqs = _vector(bool(additive))
        self.name = name
        self.additive = bool(additive)
        self.dims = dims
        self.graph = CausalGraph({v: Continuous(dim=dims[v]) for v in names}, edges=edges)
        self._order = self.graph.topological_order
        self._eqs = eqs
        self._tag = f"{name}-{'add' if self.additive else 'nonadd'}"
        self.equations = {v: eqs[v].text for v in self._order}
        self._cols = {v: [v] if dims[v] == 1 else [f"{v}[{i}]" for i in range(dims[v])] for v in names}
        self._columns = [c for v in self._order for c in self._cols[v]]

    def _take(self, v: str, U: np.ndarray) -> np.ndarray:
        start = self._columns.index(self._cols[v][0])
        u = U[:, start:start + self.dims[v]]
        return u[:, 0] if self.dims[v] == 1 else u

    def _frame(self, vals: Mapping[str, np.ndarray], index) -> pd.DataFrame:
        data = {}
        for v in self._order:
            x = vals[v]
            for j, c in enumerate(self._cols[v]):
                data[c] = x if x.ndim == 1 else x[:, j]
        return pd.DataFrame(data, index=index, columns=self._columns)

    def _apply_v(self, v: str, iv: Intervention, current, n: int) -> np.ndarray:
        if self.dims[v] == 1:
            return self._apply(iv, current, n)
        out = iv.apply(current, n)
        try:
            out = np.asarray(out, dtype=float)
        except (TypeError, ValueError):
            raise InterventionError(f"{iv.describe()}: values must be numbers") from None
        if out.shape != (n, self.dims[v]):
            raise InterventionError(f"{iv.describe()}: {v!r} is a {self.dims[v]}-vector; expected "
                                    f"values of shape ({n}, {self.dims[v]}), got {out.shape}")
        if not np.all(np.isfinite(out)):
            raise InterventionError(f"{iv.describe()}: values must be finite")
        return out

    def evaluate(self, name: str, parents: Mapping[str, Any], noise: Any) -> np.ndarray:
        """The structural equation of ``name``; for ``x3`` the noise has a last axis of 2.

        >>> sim = scm("vector", additive=True)
        >>> sim.evaluate("x3", {"x1": 0.0, "x2": 0.0}, [1.0, 0.0]).round(3).tolist()  # m + S0 e1
        [0.6, 2.95]
        """
        if self.dims.get(name, 1) == 1:
            return super().evaluate(name, parents, noise)
        eq = self._eqs[name]
        missing = [p for p in eq.parents if p not in parents]
        if missing:
            raise DataError(f"evaluate({name!r}) needs parent value(s) for {missing}")
        u = np.asarray(noise, dtype=float)
        if u.shape[-1:] != (self.dims[name],):
            raise DataError(f"evaluate({name!r}): the noise needs a last axis of {self.dims[name]}, "
                            f"got shape {u.shape}")
        arrays = [np.asarray(parents[p], dtype=float) for p in eq.parents]
        shape = np.broadcast_shapes(u.shape[:-1], *(a.shape for a in arrays))
        flat_u = np.broadcast_to(u, shape + u.shape[-1:]).reshape(-1, self.dims[name])
        P = np.stack([np.broadcast_to(a, shape).reshape(-1) for a in arrays], axis=1)
        return eq(P, flat_u).reshape(shape + (self.dims[name],))

    def sample(self, n: int, seed: int | None = 0, do: Mapping[str, Any] | None = None) -> pd.DataFrame:
        """Draw ``n`` units (observational, or under ``do``); see :meth:`TabularSCM.sample`."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise MedCausalError(f"n must be a non-negative integer, got {n!r}")
        n = int(n)
        seed = self._check_seed(seed)
        ivs = parse_do(do, known=self._order)
        U = _unit_noise(np.full(n, seed, dtype=np.uint64), np.arange(n, dtype=np.uint64), len(self._columns))
        vals: dict[str, np.ndarray] = {}
        for v in self._order:
            iv = ivs.get(v)
            if iv is not None and not iv.needs_current:
                vals[v] = self._apply_v(v, iv, None, n)
                continue
            x = self._eqs[v](self._stack(vals, self._eqs[v].parents, n, {}), self._take(v, U))
            vals[v] = x if iv is None else self._apply_v(v, iv, x, n)
        return self._frame(vals, self._make_ids(seed, n))

    def noise(self, data) -> pd.DataFrame:
        """The units' exogenous noise, one column per data column (``x3[0]``, ``x3[1]``)."""
        index = data.index if isinstance(data, (pd.DataFrame, pd.Series)) else (
            data if isinstance(data, pd.Index) else pd.Index(list(data), name="unit"))
        return pd.DataFrame(self._noise_of(index), index=index.copy(), columns=self._columns)

    def counterfactual(self, data: pd.DataFrame, do: Mapping[str, Any] | None) -> pd.DataFrame:
        """The true counterfactual of the units in ``data``; see :meth:`TabularSCM.counterfactual`."""
        frame = self._check_frame(data)
        ivs = parse_do(do, known=self._order, index=frame.index)
        n = len(frame)
        U = self._noise_of(frame.index)
        affected = set(ivs).union(*(self.graph.descendants(v) for v in ivs))
        fact = {v: (frame[self._cols[v][0]].to_numpy(dtype=float) if self.dims[v] == 1
                    else frame[self._cols[v]].to_numpy(dtype=float)) for v in self._order}
        cf = dict(fact)
        for v in self._order:
            if v not in affected:
                continue
            iv = ivs.get(v)
            if iv is not None and not iv.needs_current:
                cf[v] = self._apply_v(v, iv, None, n)
                continue
            parents = self._eqs[v].parents
            if parents:
                P_cf = self._stack(cf, parents, n, {})
                same = np.all(P_cf == self._stack(fact, parents, n, {}), axis=1)
                new = self._eqs[v](P_cf, self._take(v, U))
                x = np.where(same if new.ndim == 1 else same[:, None], fact[v], new)
            else:
                x = fact[v]
            cf[v] = self._apply_v(v, iv, x, n) if iv is not None else x
        out = data.copy()
        for v in self._order:
            if v in affected:
                x = cf[v]
                for j, c in enumerate(self._cols[v]):
                    out[c] = x if x.ndim == 1 else x[:, j]
        return out


_EXTRA = {"vector": VectorSCM}  # built by scm(name) but not listed by scm_names()


def scm_names() -> list[str]:
    """Names of the benchmark SCMs.

    >>> scm_names()
    ['chain', 'triangle', 'diamond', 'y', 'ladder']
    """
    return list(_BUILDERS)


def scm(name: str, additive: bool = True) -> TabularSCM:
    """A benchmark SCM by name (see the module docstring for its equations).

    ``additive=True`` gives ``x = f(pa) + c u``; ``additive=False`` a variant
    whose noise enters non-additively but monotonically. Besides the DCM SCMs
    of :func:`scm_names`, ``"vector"`` builds the :class:`VectorSCM` with a
    2-dimensional variable.

    >>> sim = scm("diamond", additive=False)
    >>> sim.graph.parents("x4"), sim.name, sim.additive
    (('x2', 'x3'), 'diamond', False)
    >>> scm("vector").graph.variables["x3"]
    Continuous(dim=2)
    """
    if not isinstance(additive, (bool, np.bool_)):  # a string "false" would be truthy
        raise MedCausalError(f"additive must be True or False, got {additive!r}")
    key = str(name).lower() if isinstance(name, str) else name
    if key in _EXTRA:
        return _EXTRA[key](key, bool(additive))
    if key not in _BUILDERS:
        raise MedCausalError(f"unknown SCM {name!r}; known: {scm_names() + list(_EXTRA)}")
    return TabularSCM(key, bool(additive))
