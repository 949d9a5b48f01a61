"""``Privacy``: the settings of differentially private training, and DP profiles (TOML).

Two modes, keyword-only like Opacus:

- *target-epsilon*: ``Privacy(epsilon=3.0)`` calibrates the noise multiplier from
  (epsilon, delta, sample rate, steps);
- *fixed-noise*: ``Privacy(noise_multiplier=1.1)`` reports the epsilon it spent.

>>> p = Privacy(epsilon=3.0, public_bounds={"age": (18, 100)})
>>> p.mode, p.max_grad_norm, p.public_bounds["age"]
('target-epsilon', 1.0, (18.0, 100.0))
>>> Privacy(epsilon=0)
Traceback (most recent call last):
...
medcausal.privacy.config.PrivacyError: Privacy(epsilon=0): epsilon must be > 0 (a finite privacy budget)
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import MedCausalError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class PrivacyError(MedCausalError):
    """Differentially private training cannot run as asked (bad budget, leaky preprocessing, ...)."""


class PrivacyWarning(UserWarning):
    """A privacy setting was accepted only because ``force=True`` was passed, or data were clipped."""


ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("auto", "ghost", "hooks", "vmap")
STANDARDIZE = ("dp", "bounds")


@dataclass(frozen=True)
class Privacy:
    """How to train a causal model under (epsilon, delta)-differential privacy (DP-SGD, Opacus).

    Give exactly one of ``epsilon`` (target-epsilon mode) or ``noise_multiplier``
    (fixed-noise mode). ``delta=None`` picks ``min(1e-5, 0.1 / N)`` for ``N`` records.

    - ``max_grad_norm``: per-record clipping norm ``C`` of the gradient.
    - ``accountant``: ``"rdp"`` (default) or ``"prv"`` (tighter, much slower).
    - ``grad_sample_mode``: how per-record gradients are computed: ``"ghost"`` (Opacus fast
      gradient clipping), ``"hooks"`` (Opacus per-layer hooks), ``"vmap"`` (whole-model
      ``torch.func`` per-record gradients), or ``"auto"``: the fastest of these whose
      per-record gradients are exact for the model (checked on fabricated inputs).
    - ``physical_batch_size``: records held in memory at once (Opacus BatchMemoryManager);
      the logical (privacy) batch is Poisson with sample rate ``1 / ceil(N / fit(batch_size=))``
      (Opacus's ``DPDataLoader``), so its expected size ``N / ceil(N / batch_size)`` is at most
      ``batch_size`` (the ledger's ``expected_batch_size``).
    - ``unit_column``: the privacy unit. Rows sharing this column's value (a patient, a
      donor) form one record for sampling and clipping. ``row_level=True`` (with
      ``force=True``) trains on rows instead and the ledger shows the group-privacy
      conversion to units, for ``max_rows_per_unit``: a public bound on a unit's rows (from
      the study design; the data's own maximum is not released).
    - ``public_bounds``: ``{variable: (low, high)}`` for every continuous variable: public
      knowledge, not read from the data. Values are clipped to them.
    - ``standardize``: ``"dp"`` estimates each continuous variable's mean/std under DP
      within its bounds (part of the budget, ``stats_share``); ``"bounds"`` derives them
      from the bounds alone (no budget).
    - ``stats_share``: in target-epsilon mode, the share of epsilon spent on DP statistics
      (standardization, mechanisms' private ``finalize``), when there are any.
    - ``stats_noise_multiplier``: in fixed-noise mode, the Gaussian noise multiplier of those
      statistics (default 10).
    - ``secure_mode``: cryptographically secure noise (needs ``torchcsprng``; no seed).
    - ``noise_seed``: pins the DP randomness (sampling, noise) for tests and reproductions.
      Anyone who knows it can replay the noise, so a model meant for release leaves it None
      (fresh OS entropy, never stored); ``fit(seed=...)`` only sets the initial weights.
    - ``force``: accept delta >= 1/N, row-level DP on multi-row units, ... with a warning.
    """

    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"
    physical_batch_size: int | None = None
    unit_column: str | None = None
    row_level: bool = False
    max_rows_per_unit: int | None = None
    public_bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    standardize: str = "dp"
    stats_share: float = 0.1
    stats_noise_multiplier: float | None = None
    secure_mode: bool = False
    noise_seed: int | None = None
    force: bool = False

    def __post_init__(self):
        def bad(msg):
            raise PrivacyError(f"Privacy({msg})")

        if self.epsilon is not None:
            eps = _number(self.epsilon, "epsilon")
            if not eps > 0:
                bad(f"epsilon={self.epsilon}): epsilon must be > 0 (a finite privacy budget")
            if math.isinf(eps):
                bad("epsilon=inf): an infinite budget is no privacy; train with privacy=None instead")
            object.__setattr__(self, "epsilon", eps)
        if self.noise_multiplier is not None:
            sigma = _number(self.noise_multiplier, "noise_multiplier")
            if not (sigma > 0 and math.isfinite(sigma)):
                bad(f"noise_multiplier={self.noise_multiplier}): must be a finite number > 0")
            object.__setattr__(self, "noise_multiplier", sigma)
        if (self.epsilon is None) == (self.noise_multiplier is None):
            bad(f"epsilon={self.epsilon}, noise_multiplier={self.noise_multiplier}): give exactly one: "
                "epsilon (the noise is calibrated to it) or noise_multiplier (epsilon is reported)")
        if self.delta is not None and self.delta != "auto":
            d = _number(self.delta, "delta")
            if not 0 < d < 1:
                bad(f"delta={self.delta}): delta must be in (0, 1), and well below 1/N")
            object.__setattr__(self, "delta", d)
        elif self.delta == "auto":
            object.__setattr__(self, "delta", None)
        c = _number(self.max_grad_norm, "max_grad_norm")
        if not (c > 0 and math.isfinite(c)):
            bad(f"max_grad_norm={self.max_grad_norm}): the clipping norm must be a finite number > 0")
        object.__setattr__(self, "max_grad_norm", c)
        for name, allowed in (("accountant", ACCOUNTANTS), ("grad_sample_mode", GRAD_SAMPLE_MODES),
                              ("standardize", STANDARDIZE)):
            if getattr(self, name) not in allowed:
                bad(f"{name}={getattr(self, name)!r}): choose one of {list(allowed)}")
        if self.physical_batch_size is not None:
            if not _whole(self.physical_batch_size) or self.physical_batch_size < 1:
                bad(f"physical_batch_size={self.physical_batch_size!r}): a whole number >= 1 (records per step)")
            object.__setattr__(self, "physical_batch_size", int(self.physical_batch_size))
        share = _number(self.stats_share, "stats_share")
        if not 0 < share < 1:
            bad(f"stats_share={self.stats_share}): must be in (0, 1)")
        object.__setattr__(self, "stats_share", share)
        if self.stats_noise_multiplier is not None:
            z = _number(self.stats_noise_multiplier, "stats_noise_multiplier")
            if not (z > 0 and math.isfinite(z)):
                bad(f"stats_noise_multiplier={self.stats_noise_multiplier}): must be a finite number > 0")
            object.__setattr__(self, "stats_noise_multiplier", z)
        if self.noise_seed is not None:
            if not _whole(self.noise_seed) or self.noise_seed < 0:
                bad(f"noise_seed={self.noise_seed!r}): a whole number >= 0, or None (fresh noise; for a release)")
            object.__setattr__(self, "noise_seed", int(self.noise_seed))
        if self.row_level and self.unit_column is None:
            bad("row_level=True): row-level DP is the default without a unit_column; "
                "row_level=True only makes sense with unit_column= declared")
        if self.max_rows_per_unit is not None:
            if not _whole(self.max_rows_per_unit) or self.max_rows_per_unit < 1:
                bad(f"max_rows_per_unit={self.max_rows_per_unit!r}): a whole number >= 1")
            object.__setattr__(self, "max_rows_per_unit", int(self.max_rows_per_unit))
            if not self.row_level:
                bad(f"max_rows_per_unit={self.max_rows_per_unit}): it bounds the group-privacy conversion of "
                    "row_level=True; unit-level DP (the default with a unit_column) needs no bound")
        bounds = {}
        for var, b in dict(self.public_bounds or {}).items():
            try:
                if isinstance(b, (str, bytes)) or len(b) != 2:  # "18" would unpack as (1.0, 8.0)
                    raise TypeError
                lo, hi = (float(v) for v in b)
            except (TypeError, ValueError):
                bad(f"public_bounds[{var!r}]={b!r}): give a pair (low, high) of numbers")
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                bad(f"public_bounds[{var!r}]=({lo}, {hi})): need finite low < high")
            bounds[str(var)] = (lo, hi)
        object.__setattr__(self, "public_bounds", bounds)

    @property
    def mode(self) -> str:
        """``"target-epsilon"`` or ``"fixed-noise"``."""
        return "target-epsilon" if self.epsilon is not None else "fixed-noise"

    def to_dict(self) -> dict:
        """JSON-serializable settings (bounds as lists).

        >>> Privacy(noise_multiplier=1.0).to_dict()["noise_multiplier"]
        1.0
        """
        d = asdict(self)
        d["public_bounds"] = {k: list(v) for k, v in self.public_bounds.items()}
        if self.noise_seed is not None:  # saved in ledgers: say that it was pinned, not what to
            d["noise_seed"] = "pinned (withheld)"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "profile") -> "Privacy":
        """Build from a mapping (a parsed TOML profile); unknown keys are an error naming them.

        >>> Privacy.from_dict({"epsilon": 8, "delta": "auto"}).delta is None
        True
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PrivacyError(f"{source}: unknown privacy setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_toml(cls, *paths: str | Path, **overrides) -> "Privacy":
        """Load one or more TOML profiles, later files (then ``overrides``) taking precedence.

        Tables (``[public_bounds]``) are merged key by key, so a generic profile
        (``privacy/eps8.toml``) can be combined with a cohort's public declarations.

        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "eps8.toml"
        >>> _ = p.write_text('epsilon = 8.0\\n[public_bounds]\\nage = [18, 100]\\n')
        >>> Privacy.from_toml(p).public_bounds
        {'age': (18.0, 100.0)}
        """
        merged: dict[str, Any] = {}
        for path in paths:
            path = Path(path)
            if not path.is_file():
                raise PrivacyError(f"privacy profile {str(path)!r} does not exist")
            try:
                d = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise PrivacyError(f"privacy profile {str(path)!r} is not valid TOML: {e}") from None
            for k, v in d.items():
                if isinstance(v, dict) and isinstance(merged.get(k), dict):
                    merged[k] = {**merged[k], **v}
                else:
                    merged[k] = v
        merged.update(overrides)
        return cls.from_dict(merged, source=", ".join(str(p) for p in paths) or "overrides")


def _whole(v) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(v, name: str) -> float:
    if isinstance(v, bool):
        raise PrivacyError(f"Privacy({name}={v!r}): must be a number")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise PrivacyError(f"Privacy({name}={v!r}): must be a number") from None


def load_profile(*paths: str | Path, **overrides) -> Privacy:
    """``Privacy.from_toml``: what ``medcausal fit --privacy PROFILE.toml`` calls.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "eps3.toml").write_text('epsilon = 3.0\\ndelta = "auto"\\n')
    >>> _ = (d / "cohort.toml").write_text('unit_column = "patient"\\n[public_bounds]\\nage = [18, 100]\\n')
    >>> p = load_profile(d / "eps3.toml", d / "cohort.toml")
    >>> p.epsilon, p.delta, p.unit_column
    (3.0, None, 'patient')
    """
    return Privacy.from_toml(*paths, **overrides)
