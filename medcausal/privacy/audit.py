"""Membership-inference audit of a fitted causal model.

Two black-box-style attacks score each candidate record; members (training records)
should score higher if the model leaks them:

- ``loss``: the model's per-record training loss (negative log-likelihood, or negative ELBO
  for mechanisms without a likelihood), score ``-loss`` (Yeom et al. 2018's threshold attack,
  swept over all thresholds);
- ``dcr``: distance to the closest record among synthetic samples drawn from the model
  (in the model's encoded feature space), score ``-distance`` (the DCR test of synthetic
  data; Chen et al. 2020's GAN-leaks "full black-box" attack).

Each attack reports the ROC AUC with a DeLong 95% confidence interval and the TPR at low
FPRs; for a DP model, the TPR bound every attack obeys: ``TPR <= e^eps FPR + delta``.
Candidates are the model's privacy units: with a ``unit_column`` (by default the ledger's,
for a model trained per unit) a unit's rows are scored together (the sum of their scores
for ``loss``, the closest row for ``dcr``), so the DeLong interval sees independent
candidates and the DP bound applies to what is scored.

>>> import numpy as np
>>> auc, lo, hi = delong_ci(np.array([3.0, 2.0, 4.0]), np.array([1.0, 0.0, 2.5]))
>>> round(auc, 3), lo <= auc <= hi
(0.889, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..adapters import tabular
from ..errors import DataError
from ..train import forked_rng
from .stats import table_of

FPR_LEVELS = (0.01, 0.1)


def _midranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def delong_ci(members: np.ndarray, non_members: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """AUC of ``members`` vs ``non_members`` scores and its DeLong confidence interval.

    DeLong, DeLong & Clarke-Pearson (1988), with midranks (Sun & Xu 2014).
    """
    from scipy.stats import norm

    x, y = np.asarray(members, float), np.asarray(non_members, float)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise DataError(f"the audit needs at least 2 members and 2 non-members, got {m} and {n}")
    tz = _midranks(np.concatenate([x, y]))
    tx, ty = _midranks(x), _midranks(y)
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    se = math.sqrt(max(v10.var(ddof=1) / m + v01.var(ddof=1) / n, 0.0))
    z = norm.ppf(0.5 + level / 2)
    return float(auc), float(max(0.0, auc - z * se)), float(min(1.0, auc + z * se))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    """TPR of the threshold attack whose FPR on ``non_members`` is at most ``fpr``.

    >>> tpr_at_fpr(np.array([5.0, 0.5]), np.arange(100.0) / 100, 0.01)
    0.5
    """
    y = np.sort(np.asarray(non_members, float))[::-1]
    k = int(math.floor(fpr * len(y)))  # number of non-members allowed above the threshold
    thr = y[k] if k < len(y) else -np.inf
    return float((np.asarray(members, float) > thr).mean())


@dataclass
class AttackResult:
    """One attack's outcome: AUC with CI, TPR at low FPRs, and the DP bound on those TPRs."""

    attack: str
    auc: float
    auc_ci: tuple[float, float]
    tpr_at_fpr: dict
    n_members: int
    n_non_members: int
    dp_tpr_bound: dict | None = None
    note: str = ""

    def detected(self) -> bool:
        """Whether membership leaks detectably: the CI lies above 0.5."""
        return self.auc_ci[0] > 0.5


@dataclass
class AuditResult:
    """Both attacks, with the (epsilon, delta) that bounds a candidate (:func:`dp_guarantee`;
    ``None`` for a non-DP model)."""

    attacks: dict = field(default_factory=dict)
    epsilon: float | None = None
    delta: float | None = None

    def to_dict(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta,
                "attacks": {k: asdict(v) for k, v in self.attacks.items()}}

    def __str__(self) -> str:
        head = ("model: NOT differentially private" if self.epsilon is None else
                f"model: ({self.epsilon:.4g}, {self.delta:.3g})-DP")
        lines = [head, f"{'attack':<8} {'AUC':>6} {'95% CI':>17} " +
                 " ".join(f"{'TPR@' + format(f, 'g'):>10}" for f in FPR_LEVELS)]
        for a in self.attacks.values():
            tprs = " ".join(f"{a.tpr_at_fpr[str(f)]:>10.3f}" for f in FPR_LEVELS)
            lines.append(f"{a.attack:<8} {a.auc:>6.3f} [{a.auc_ci[0]:.3f}, {a.auc_ci[1]:.3f}] {tprs}")
            if a.dp_tpr_bound:
                lines.append(f"{'':<8} DP bound on TPR: " +
                             ", ".join(f"@{k}: {v:.3f}" for k, v in a.dp_tpr_bound.items()))
        n = next(iter(self.attacks.values()))
        lines.append(f"({n.n_members} members, {n.n_non_members} non-members; an FPR below "
                     f"1/{n.n_non_members} cannot be resolved)")
        return "\n".join(lines)


def dp_guarantee(model, unit_column: str | None) -> tuple[float, float] | None:
    """The (epsilon, delta) that bounds one candidate's membership: the ledger's, or, when a
    row-level model is scored by units of ``unit_column``, its group-privacy conversion to them
    (the per-row epsilon would draw too tight a bound). None for a model that is not DP."""
    ledger = model.dp_ledger()
    if not ledger:
        return None
    group = ledger.get("group_privacy")
    if ledger.get("privacy_unit") == "row" and unit_column is not None and group and group["unit"] == unit_column:
        return group["epsilon"], group["delta"]
    return ledger["epsilon"], ledger["delta"]


def _result(name, sm, sn, guarantee, note="") -> AttackResult:
    auc, lo, hi = delong_ci(sm, sn)
    tprs = {str(f): tpr_at_fpr(sm, sn, f) for f in FPR_LEVELS}
    bound = None
    if guarantee:
        eps, delta = guarantee
        bound = {str(f): float(min(1.0, math.exp(eps) * f + delta)) for f in FPR_LEVELS}
    return AttackResult(name, auc, (lo, hi), tprs, len(sm), len(sn), bound, note)


def record_losses(model, data, repeats: int = 1, seed: int = 0) -> np.ndarray:
    """Each row's training loss under ``model`` (sum over mechanisms; eval mode, no gradient).

    Stochastic losses (ELBOs) are averaged over ``repeats`` draws under a fixed seed.

    >>> import medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> model = mc.CausalModel(sim.graph).fit(sim.sample(50, seed=0), max_epochs=1, verbose=False)
    >>> record_losses(model, sim.sample(3, seed=1)).shape
    (3,)
    """
    model._require_fit()
    values = model._encode(data)
    n = len(data)
    total = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad(), forked_rng(model.device, seed=seed):  # the caller's random state is kept
        for _ in range(repeats):
            for name in model.graph.topological_order:
                mech = model.mechanism(name)
                total += mech.loss(values[name], model._parents(name, values, n)).double().cpu()
    return (total / repeats).numpy()


def features(model, data) -> np.ndarray:
    """Rows in the model's encoded feature space (standardized, one-hot, arrays flattened).

    >>> import medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> model = mc.CausalModel(sim.graph).fit(sim.sample(50, seed=0), max_epochs=1, verbose=False)
    >>> features(model, sim.sample(4, seed=1)).shape
    (4, 3)
    """
    values = tabular.encode(data, model.graph, model.codecs)
    cols = []
    for name, vtype in model.graph.variables.items():
        v = values[name]
        if vtype.kind in ("continuous", "binary", "categorical"):
            v = model.codecs[name].features(v)
        cols.append(v.reshape(len(v), -1).double())
    return torch.cat(cols, 1).numpy()


def _by_unit(scores: np.ndarray, data, unit_column: str | None, reduce) -> np.ndarray:
    """Per-row scores combined per unit (``reduce``: ``np.add`` or ``np.maximum``); as they are
    without a unit column (checked by :func:`_check_units`)."""
    if unit_column is None:
        return scores
    codes, _ = pd.factorize(table_of(data)[unit_column], sort=False)
    out = np.full(codes.max() + 1, -np.inf if reduce is np.maximum else 0.0)
    reduce.at(out, codes, scores)
    return out


def _check_units(members, non_members, unit_column: str | None) -> None:
    if unit_column is None:
        return
    ids = {}
    for what, data in (("members", members), ("non-members", non_members)):
        table = table_of(data)
        if unit_column not in table.columns:
            raise DataError(f"the audit's {what} have no unit column {unit_column!r} (the privacy unit: a "
                            "unit's rows are scored together)")
        if table[unit_column].isna().any():
            raise DataError(f"the audit's {what} have {int(table[unit_column].isna().sum())} row(s) without a "
                            f"unit id in {unit_column!r}: every row needs its unit")
        ids[what] = set(table[unit_column])
    shared = ids["members"] & ids["non-members"]
    if shared:
        raise DataError(f"{len(shared)} unit(s) of {unit_column!r} are both members and non-members: a unit "
                        "is a member when any of its rows trained the model")


def loss_attack(model, members, non_members, repeats: int = 1, unit_column: str | None = None) -> AttackResult:
    """Loss-threshold membership inference: score ``-loss``; members should have lower loss.

    >>> import medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> train = sim.sample(40, seed=0)
    >>> model = mc.CausalModel(sim.graph).fit(train, max_epochs=1, verbose=False)
    >>> r = loss_attack(model, train, sim.sample(40, seed=1))
    >>> r.attack, r.auc_ci[0] <= r.auc <= r.auc_ci[1]
    ('loss', True)
    """
    _check_units(members, non_members, unit_column)
    sm = _by_unit(-record_losses(model, members, repeats), members, unit_column, np.add)
    sn = _by_unit(-record_losses(model, non_members, repeats), non_members, unit_column, np.add)
    return _result("loss", sm, sn, dp_guarantee(model, unit_column))


def dcr_attack(model, members, non_members, n_synthetic: int | None = None, seed: int = 0,
               unit_column: str | None = None) -> AttackResult:
    """Distance to the closest synthetic record: score ``-distance``; members should be closer.

    >>> import medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> train = sim.sample(40, seed=0)
    >>> model = mc.CausalModel(sim.graph).fit(train, max_epochs=1, verbose=False)
    >>> dcr_attack(model, train, sim.sample(40, seed=1), n_synthetic=100).note
    '100 synthetic records'
    """
    from sklearn.neighbors import NearestNeighbors

    _check_units(members, non_members, unit_column)
    n_syn = int(n_synthetic or max(1000, 2 * (len(members) + len(non_members))))
    synthetic = model.sample(n_syn, seed=seed)
    nn_ = NearestNeighbors(n_neighbors=1).fit(features(model, synthetic))
    dm = nn_.kneighbors(features(model, members))[0][:, 0]
    dn = nn_.kneighbors(features(model, non_members))[0][:, 0]
    return _result("dcr", _by_unit(-dm, members, unit_column, np.maximum),
                   _by_unit(-dn, non_members, unit_column, np.maximum), dp_guarantee(model, unit_column),
                   note=f"{n_syn} synthetic records")


def audit(model, members, non_members, *, attacks: Sequence[str] = ("loss", "dcr"),
          n_synthetic: int | None = None, repeats: int = 1, seed: int = 0,
          unit_column: str | None = "ledger") -> AuditResult:
    """Run the membership-inference attacks; members = training records, non-members = held out.

    Non-members must come from the same population as the members (e.g. a random held-out
    split made *before* training): otherwise the attack measures the distribution shift.
    ``unit_column``: the column whose rows form one candidate; ``"ledger"`` (default) takes the
    ledger's unit column of a model trained per unit (rows otherwise), None scores rows.

    >>> import medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> train, held = sim.sample(60, seed=0), sim.sample(60, seed=1)
    >>> model = mc.CausalModel(sim.graph).fit(train, max_epochs=2, verbose=False)
    >>> r = audit(model, train, held, n_synthetic=200)
    >>> sorted(r.attacks), r.epsilon is None
    (['dcr', 'loss'], True)
    """
    unknown = sorted(set(attacks) - {"loss", "dcr"})
    if unknown:
        raise DataError(f"unknown attack(s) {unknown}; available: ['loss', 'dcr']")
    ledger = model.dp_ledger() or {}
    if unit_column == "ledger":
        unit_column = ledger.get("unit_column") if ledger.get("privacy_unit") != "row" else None
    epsilon, delta = dp_guarantee(model, unit_column) or (None, None)
    out = AuditResult(epsilon=epsilon, delta=delta)
    if "loss" in attacks:
        out.attacks["loss"] = loss_attack(model, members, non_members, repeats, unit_column)
    if "dcr" in attacks:
        out.attacks["dcr"] = dcr_attack(model, members, non_members, n_synthetic, seed, unit_column)
    return out
