"""Privacy accounting and the ledger stored in a DP model's file.

Every access to the private records is a (subsampled) Gaussian mechanism, one entry
``(noise_multiplier, sample_rate, steps)`` in one Opacus accountant history: the DP-SGD
steps (``sample_rate = q``) and the DP statistics of preprocessing and private
``finalize`` (full-batch queries, ``sample_rate = 1``). The epsilon in the ledger is the
accountant's bound for that whole history, i.e. for the released model as a whole.

>>> round(epsilon_of([(1.0, 0.01, 1000)], delta=1e-5, accountant="rdp"), 2)
2.11
>>> sigma = calibrate_noise(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, steps=1000)
>>> abs(epsilon_of([(sigma, 0.01, 1000)], 1e-5) - 3.0) < 0.05
True
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping

from .config import PrivacyError

# RDP orders: a grid with few fractional orders (Opacus's default grid has 99 of them, each
# costly for subsampled Gaussians), extended upward for small budgets and full-batch queries.
# Any set of orders gives a valid bound; this one is within ~1% of Opacus's default grid.
_ALPHAS = [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40,
           48, 56, 64, 80, 96, 128, 160, 192, 256, 384, 512, 1024]

MAX_SIGMA = 1e4


def make_accountant(name: str = "rdp"):
    """An empty Opacus accountant (``"rdp"`` or ``"prv"``).

    >>> len(make_accountant("rdp").history)
    0
    """
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=name)


def epsilon_of(history: Iterable, delta: float, accountant: str = "rdp") -> float:
    """The epsilon that Opacus's accountant bounds for a history of Gaussian mechanisms."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    acc = make_accountant(accountant)
    acc.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            return float(acc.get_epsilon(delta=delta, alphas=_ALPHAS))
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    prior: Iterable = (), accountant: str = "rdp", rtol: float = 2e-3) -> float:
    """The smallest noise multiplier whose history (``prior`` + ``steps`` subsampled steps) meets
    ``target_epsilon`` at ``delta``; as Opacus's ``get_noise_multiplier``, with a prior history.
    """
    prior = list(prior)
    base = epsilon_of(prior, delta, accountant)
    if base >= target_epsilon:
        raise PrivacyError(f"the DP statistics alone spend epsilon={base:.3g} >= the target "
                           f"{target_epsilon}; lower Privacy(stats_share=) or declare public values")

    def eps(sigma):
        return epsilon_of(prior + [(sigma, sample_rate, steps)], delta, accountant)

    if accountant != "rdp":
        # RDP's epsilon bounds the tighter accountants' from above, so its noise is enough here: search
        # below it. (Evaluating PRV at a tiny noise multiplier, the generic bracket's low end, allocates
        # tens of GiB.)
        hi = calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                             prior=prior, accountant="rdp", rtol=rtol)
        while eps(hi) > target_epsilon:  # numerical slack of the other accountant
            hi *= 1.05
        lo = hi / 2
    else:
        lo, hi = 0.05, 1.0
    e_hi = eps(hi)
    while e_hi > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > MAX_SIGMA:
            raise PrivacyError(f"epsilon={target_epsilon} cannot be reached with {steps} steps at sample "
                               f"rate {sample_rate:.4g} (noise multiplier > {MAX_SIGMA:g}); train fewer "
                               "epochs, use a larger batch or a larger budget")
        e_hi = eps(hi)
    if eps(lo) <= target_epsilon:
        return lo
    from scipy.optimize import brentq

    log_sigma = brentq(lambda t: eps(math.exp(t)) - target_epsilon, math.log(lo), math.log(hi),
                       xtol=rtol / 2, rtol=rtol / 2)
    sigma = math.exp(log_sigma)
    while eps(sigma) > target_epsilon:  # the guarantee must hold: round up, never down
        sigma *= 1 + rtol
    return sigma


def calibrate_stats_noise(*, epsilon: float, delta: float, queries: int, accountant: str = "rdp") -> float:
    """Noise multiplier of ``queries`` full-batch Gaussian queries that together spend ``epsilon``.

    >>> z = calibrate_stats_noise(epsilon=0.5, delta=1e-5, queries=2)
    >>> round(epsilon_of([(z, 1.0, 2)], 1e-5), 2)
    0.5
    """
    return calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=queries,
                           accountant=accountant)


def group_privacy(epsilon: float, delta: float, k: int) -> dict:
    """(epsilon, delta)-DP for one row gives (k eps, k e^((k-1) eps) delta)-DP for a group of k rows.

    >>> group_privacy(1.0, 1e-6, 1)["epsilon"]
    1.0
    >>> round(group_privacy(1.0, 1e-6, 3)["epsilon"], 6)
    3.0
    """
    k = int(k)
    d = k * math.exp((k - 1) * epsilon) * delta if k > 1 else delta
    return {"group_size": k, "epsilon": k * epsilon, "delta": min(1.0, d),
            "rule": "group privacy: (k*eps, k*exp((k-1)*eps)*delta) for groups of k rows"}


def versions() -> dict:
    """Versions of the libraries that the guarantee depends on.

    >>> sorted(versions())
    ['medcausal', 'numpy', 'opacus', 'torch']
    """
    import numpy
    import opacus
    import torch

    from .. import __version__
    return {"medcausal": __version__, "opacus": opacus.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__}


LEDGER_ORDER = ("accountant", "epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate",
                "steps", "epochs", "n_records", "n_rows", "privacy_unit", "mode", "target_epsilon",
                "grad_sample_mode", "batch_size", "physical_batch_size", "poisson_sampling",
                "secure_mode")


def format_ledger(ledger: Mapping[str, Any] | None) -> str:
    """Human-readable ledger (what ``medcausal info`` prints).

    >>> print(format_ledger(None))
    privacy: NOT differentially private (trained without a privacy budget; no DP guarantee)
    """
    if not ledger:
        return "privacy: NOT differentially private (trained without a privacy budget; no DP guarantee)"
    lines = [f"privacy: ({ledger['epsilon']:.4g}, {ledger['delta']:.3g})-differentially private "
             f"for each {ledger['privacy_unit']}"]
    for key in LEDGER_ORDER:
        if key in ledger and key not in ("epsilon", "delta"):
            v = ledger[key]
            lines.append(f"  {key:<20} {v:.6g}" if isinstance(v, float) else f"  {key:<20} {v}")
        elif key in ("epsilon", "delta"):
            lines.append(f"  {key:<20} {ledger[key]:.6g}")
    g = ledger.get("group_privacy")
    if g:
        lines.append(f"  group privacy        per {g['unit']}: ({g['epsilon']:.4g}, {g['delta']:.3g}) "
                     f"for up to {g['group_size']} rows per {g['unit']}")
    for q in ledger.get("dp_statistics", []):
        lines.append(f"  dp statistic         {q['query']} (noise multiplier {q['noise_multiplier']:.4g})")
    pre = ledger.get("preprocessing", {})
    for var, how in pre.items():
        lines.append(f"  preprocessing        {var}: {how}")
    lines.append(f"  scope                {ledger.get('scope', '')}")
    v = ledger.get("versions", {})
    if v:
        lines.append("  trained with         " + ", ".join(f"{k} {val}" for k, val in v.items()))
    return "\n".join(lines)
