"""DP-SGD over the whole causal model, on Opacus.

``prepare(...)`` runs before the model is built: it checks the budget and the privacy
unit, builds codecs without private constants (:mod:`.stats`), plans the DP statistics and
calibrates the noise multiplier. ``plan.attach(module, optimizer, tensors)`` hands the
module, optimizer and a record-index DataLoader to Opacus's ``PrivacyEngine.make_private``
(Poisson sampling; accounting hooked to the optimizer step) and returns a session whose
``step(records)`` computes per-record gradients, lets the DP optimizer clip them, add
noise and step. The loop itself is :func:`medcausal.train.train` (its DP path). Under
``torchrun`` the ranks share one seed (rank 0's), each clips its share of every batch,
rank 0 alone adds the noise, and the sums are all-reduced (Opacus's DPDDP recipe).

Per-record gradients (``Privacy.grad_sample_mode``):

- ``"ghost"``: Opacus fast gradient ("ghost") clipping: per-record gradient norms without
  materializing per-record gradients; two backward passes;
- ``"hooks"``: Opacus per-layer hooks (registered layers, functorch for others);
- ``"vmap"``: ``torch.func.vmap(grad(loss of one record))`` over the whole model. Exact for
  any parameter use (e.g. zuko's unconditional spline parameters, which no layer hook sees);
- ``"auto"``: ghost, else hooks, when their per-record gradients equal one-at-a-time
  gradients on fabricated inputs (no private data), else vmap.

>>> import pandas as pd, medcausal as mc
>>> from medcausal.privacy import Privacy
>>> g = mc.CausalGraph({"x": "continuous"})
>>> plan = prepare(Privacy(noise_multiplier=1.0, public_bounds={"x": (-3, 3)}, standardize="bounds"),
...                pd.DataFrame({"x": [0.0, 1.0, -1.0, 2.0]}), g, {}, batch_size=2,
...                max_epochs=1, max_steps=None)
>>> plan.n_records, plan.sample_rate, plan.steps
(4, 0.5, 2)
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..cohort import Cohort
from ..errors import DataError, MedCausalError, warn
from ..graph import CausalGraph
from . import ledger as _ledger
from .config import Privacy, PrivacyError, PrivacyWarning
from ..train import distributed_setup, on_rank0
from .stats import GaussianQuery, private_codecs, private_finalizer, table_of

# vmap randomness: each record draws its own noise in stochastic losses (ELBOs). Tests set
# "same" to compare against one-at-a-time gradients under one seed.
VMAP_RANDOMNESS = "different"
PROBE_ROWS = 4
USEFUL_STATS_SD = 0.05  # largest noise sd (fraction of the half-range) worth a DP standardization query
PROBE_RTOL = 1e-4
JOINT_SCOPE = ("one DP-SGD run over the joint loss of every mechanism (sum of per-record losses), "
               "one accountant for every access to the records (DP-SGD steps and DP statistics): "
               "epsilon bounds the released model as a whole")


SEED_BYTES = 16  # a fresh fit's DP seed: 128 bits of OS entropy, too many to replay

# torch's CPU generator (mt19937) takes a 32-bit seed; its state, set whole, holds 624 words.
# Its layout (aten CPUGeneratorImplStateLegacy): initial seed u64, left i32, seeded i32, next u64,
# then the 624 words, each in a u64.
_MT_WORDS, _MT_AT = 624, 24


def dp_generator(seed: int, salt: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for the DP randomness stream ``salt`` of ``seed``, with all the seed's
    entropy: every word of the CPU's mt19937 state (``manual_seed`` would keep 32 bits, and 2**32
    candidate seeds can be replayed against a released model), or a 64-bit seed on an accelerator.

    >>> a, b = dp_generator(2**40 + 5, 1), dp_generator(5, 1)  # the same low 32 bits, other streams
    >>> torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))
    False
    """
    sequence = np.random.SeedSequence([int(seed), int(salt)])
    device = torch.device(device)
    if device.type != "cpu":  # Philox (CUDA): a 64-bit seed is its whole key
        return torch.Generator(device=device).manual_seed(int(sequence.generate_state(1, np.uint64)[0]))
    words = sequence.generate_state(_MT_WORDS, np.uint32)
    gen = torch.Generator().manual_seed(int(words[0]))
    state = gen.get_state().numpy().copy()
    table = state[_MT_AT:_MT_AT + 8 * _MT_WORDS].view("<u8")
    if state[:8].view("<u8")[0] != words[0] or table[0] != words[0] or table[1] != (
            1812433253 * (int(words[0]) ^ (int(words[0]) >> 30)) + 1) & 0xFFFFFFFF:
        raise PrivacyError(f"torch {torch.__version__}'s CPU generator state has a layout medcausal does not "
                           "know, so the DP noise could not take more than a 32-bit seed; use a supported torch")
    table[:] = words
    gen.set_state(torch.from_numpy(state))
    return gen


# -- plan ----------------------------------------------------------------------------

@dataclass
class PrivatePlan:
    """Everything fixed before training: records, budget, noise, codecs (see :func:`prepare`).

    >>> import numpy as np
    >>> plan = PrivatePlan(privacy=Privacy(noise_multiplier=1.0), codecs={}, data=None, seed=0, delta=1e-5,
    ...                    n_rows=5, n_records=3, record_of_row=np.array([2, 0, 2, 1, 0]), unit_label="unit",
    ...                    batch_size=3, sample_rate=1.0, steps_per_epoch=1, steps=1, noise_multiplier=1.0,
    ...                    stats_noise_multiplier=None)
    >>> rows, position = plan.rows_of(torch.tensor([2, 1]))
    >>> rows.tolist(), position.tolist()
    ([0, 2, 3], [0, 0, 1])
    """

    privacy: Privacy
    codecs: dict
    data: Any
    seed: int
    delta: float
    n_rows: int
    n_records: int
    record_of_row: np.ndarray
    unit_label: str
    batch_size: int
    sample_rate: float
    steps_per_epoch: int
    steps: int
    noise_multiplier: float
    stats_noise_multiplier: float | None
    history: list = field(default_factory=list)
    dp_statistics: list = field(default_factory=list)
    preprocessing: dict = field(default_factory=dict)
    finalizers: dict = field(default_factory=dict)
    group: dict | None = None
    target_epsilon: float | None = None
    grad_sample_mode: str | None = None
    secure_rng: Any = None

    # records <-> rows
    def __post_init__(self):
        r = np.asarray(self.record_of_row, dtype=np.int64)
        self._grouped = self.n_records != self.n_rows
        order = np.argsort(r, kind="stable")
        counts = np.bincount(r, minlength=self.n_records)
        self._order = torch.as_tensor(order)
        self._counts = torch.as_tensor(counts)
        self._starts = torch.as_tensor(np.concatenate([[0], np.cumsum(counts)[:-1]]))

    @property
    def physical_batch_size(self) -> int:
        return int(self.privacy.physical_batch_size or self.batch_size)

    def rows_of(self, records: torch.Tensor):
        """Row indices of the records and, for multi-row records, each row's position in ``records``."""
        records = records.long().cpu()
        if not self._grouped:
            return self._order[records], None
        counts = self._counts[records]
        total = int(counts.sum())
        pos = torch.repeat_interleave(torch.arange(len(records)), counts)
        first = torch.repeat_interleave(self._starts[records], counts)
        offset = torch.arange(total) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return self._order[first + offset], pos

    def _generator(self, salt: int, device: torch.device | str = "cpu") -> torch.Generator:
        if self.secure_rng is not None:
            return self.secure_rng
        return dp_generator(self.seed, salt, device)

    # -- training --------------------------------------------------------------
    def attach(self, module: nn.Module, optimizer: torch.optim.Optimizer,
               tensors: Mapping[str, torch.Tensor]) -> "PrivateSession":
        """Make ``module``/``optimizer`` private with Opacus; returns the session the loop steps."""
        return PrivateSession(self, module, optimizer, tensors)

    def finalize(self, mechanisms: nn.ModuleDict, tensors: Mapping[str, torch.Tensor]) -> None:
        """Run every mechanism's private finalize (one accounted Gaussian query each)."""
        for key, fin in self.finalizers.items():
            mech = mechanisms[key]
            query = GaussianQuery(self.stats_noise_multiplier, self.record_of_row, self.n_records,
                                  self._generator(100 + len(self.dp_statistics)))
            what = fin(mech, tensors[key], tensors[key + "|pa"], query)
            if query.calls > 1:
                raise PrivacyError(f"the private finalize of mechanism {mech.name!r} made {query.calls} "
                                   "queries; one was budgeted")
            if query.calls:
                self.history.append([self.stats_noise_multiplier, 1.0, 1])
                self.dp_statistics.append({"query": f"finalize of {key!r}: {what}",
                                           "noise_multiplier": self.stats_noise_multiplier})

    def ledger(self, steps: int | None = None) -> dict:
        """The JSON ledger saved in the model file as ``model.privacy``."""
        history = [list(h) for h in self.history]
        eps = _ledger.epsilon_of(history, self.delta, self.privacy.accountant)
        steps = self.steps if steps is None else int(steps)
        out = {"dp": True, "accountant": self.privacy.accountant, "epsilon": eps, "delta": self.delta,
               "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.privacy.max_grad_norm,
               "sample_rate": self.sample_rate, "steps": steps,
               "epochs": round(steps / max(self.steps_per_epoch, 1), 4),
               "n_records": self.n_records,
               # with a unit column the row count would tell a unit's number of rows: withheld
               "n_rows": None if self.privacy.unit_column else self.n_rows, "privacy_unit": self.unit_label,
               "unit_column": self.privacy.unit_column, "mode": self.privacy.mode,
               "target_epsilon": self.target_epsilon, "grad_sample_mode": self.grad_sample_mode,
               "batch_size": self.batch_size, "physical_batch_size": self.physical_batch_size,
               # Poisson batches: the mean size (sample_rate x records), at most batch_size
               "expected_batch_size": self.sample_rate * self.n_records,
               "poisson_sampling": True, "secure_mode": self.privacy.secure_mode,
               "noise": ("pinned by Privacy(noise_seed=...): replayable by whoever knows it; not for release"
                         if self.privacy.noise_seed is not None else "fresh OS entropy, not stored"),
               "history": history, "dp_statistics": list(self.dp_statistics),
               "preprocessing": dict(self.preprocessing), "group_privacy": None,
               "validation": "none: every record trains; no early stopping, last weights kept",
               "scope": JOINT_SCOPE, "settings": self.privacy.to_dict(), "versions": _ledger.versions()}
        if self.group is not None:
            g = _ledger.group_privacy(eps, self.delta, self.group["group_size"])
            out["group_privacy"] = {**g, "unit": self.group["unit"]}
        return out


def prepare(privacy: Privacy, data, graph: CausalGraph, mechanisms: Mapping[str, type], *,
            batch_size: int, max_epochs: int, max_steps: int | None, device: str = "cpu") -> PrivatePlan:
    """Check the request, build private codecs and plan the budget; see the module docstring.

    ``mechanisms`` maps variable (ModuleDict key) -> mechanism class, for the finalize check.
    Under ``torchrun`` every rank must call it alike: rank 0 draws the noise's seed for all.
    """
    if not isinstance(privacy, Privacy):
        raise PrivacyError(f"privacy= takes a medcausal Privacy, got {type(privacy).__name__}")
    _, world = distributed_setup(device)
    secure_rng = None
    # The DP randomness (Poisson sampling, gradient noise, noisy statistics) never comes from
    # fit(seed=...): that seed is stored in the model file and 0 by default, and anyone who
    # knows it could replay the noise and tell the two neighbouring datasets apart exactly.
    # It comes from fresh OS entropy and is not stored; Privacy(noise_seed=...) pins it for
    # tests, and the ledger says so. fit's seed still sets the weights' initialization.
    if privacy.secure_mode:
        if world > 1:  # each rank's secure generator would draw other statistics and batches
            raise PrivacyError("Privacy(secure_mode=True) under torchrun is not supported: the ranks' "
                               "cryptographically secure generators cannot agree on the noisy statistics and "
                               "the Poisson batches; train on one process")
        if privacy.noise_seed is not None:
            raise PrivacyError(f"Privacy(secure_mode=True, noise_seed={privacy.noise_seed}): secure noise "
                               "comes from a cryptographically secure generator that cannot be seeded")
        try:
            import torchcsprng as csprng  # noqa: F401
        except ImportError:
            raise PrivacyError("Privacy(secure_mode=True) needs the torchcsprng package (Opacus's secure "
                               "generator), which is not installed") from None
        secure_rng = csprng.create_random_device_generator("/dev/urandom")
    seed = privacy.noise_seed
    if seed is None:  # under torchrun rank 0's: every rank then draws the same statistics and batches
        seed = on_rank0(lambda: int.from_bytes(os.urandom(SEED_BYTES), "little"))

    table = table_of(data)
    n_rows = len(table)
    record_of_row, unit_label, group = _records(privacy, data, graph, table)
    n_records = int(record_of_row.max()) + 1 if n_rows else 0
    if n_records < 2:
        raise PrivacyError(f"differential privacy needs at least 2 records, got {n_records}")

    delta = privacy.delta if privacy.delta is not None else min(1e-5, 0.1 / n_records)
    if delta >= 1.0 / n_records:
        msg = (f"delta={delta:g} >= 1/N = {1 / n_records:.3g} for N={n_records} records: a mechanism "
               "that publishes a random record whole is (0, 1/N)-DP, so such a delta protects nobody; "
               f"pick delta well below 1/N (e.g. {min(1e-5, 0.1 / n_records):.1g})")
        if not privacy.force:
            raise PrivacyError(msg + "; pass Privacy(force=True) to accept it anyway")
        warn(msg + " (accepted because force=True)", PrivacyWarning)

    finalizers = {}
    for key, cls in mechanisms.items():
        if getattr(cls, "dp_compatible", True) is False:
            raise PrivacyError(f"mechanism {cls.name!r} (variable {key!r}) declares itself incompatible with "
                               f"differential privacy: {getattr(cls, 'dp_incompatible_reason', 'no reason given')}")
        fin = private_finalizer(cls)
        if fin is not None:
            finalizers[key] = fin

    # Noise of the DP statistics, then of DP-SGD.
    d_cont = sum(t.dim for t in graph.variables.values() if t.kind == "continuous")
    n_codec_queries = int(privacy.standardize == "dp" and d_cont > 0)
    batch = min(int(batch_size), n_records)
    steps_per_epoch = math.ceil(n_records / batch)
    sample_rate = 1.0 / steps_per_epoch
    steps = int(max_epochs) * steps_per_epoch
    if max_steps is not None:
        steps = min(steps, int(max_steps))

    def stats_noise(n_queries):
        if not n_queries:
            return None
        if privacy.mode == "target-epsilon":
            return _ledger.calibrate_stats_noise(epsilon=privacy.stats_share * privacy.epsilon, delta=delta,
                                                 queries=n_queries, accountant=privacy.accountant)
        return float(privacy.stats_noise_multiplier or 10.0)

    n_queries = n_codec_queries + len(finalizers)
    z_stats = stats_noise(n_queries)
    standardize_note = None
    if n_codec_queries:
        # The noise sd of a DP mean, in units of the half-range, is known before any data are read
        # (z sqrt(2d) / N): when it is too large to help, skip the query and spend nothing on it.
        sd = z_stats * math.sqrt(2 * d_cont) / n_records
        if sd > USEFUL_STATS_SD:
            n_codec_queries, n_queries = 0, n_queries - 1
            z_stats = stats_noise(n_queries)
            standardize_note = (f"DP standardization skipped: with N={n_records} records its noise (sd "
                                f"{sd:.2g} of the half-range) would swamp the estimate; no budget spent")
    stats_history = [[z_stats, 1.0, n_queries]] if n_queries else []
    if privacy.mode == "target-epsilon":
        sigma = _ledger.calibrate_noise(target_epsilon=privacy.epsilon, delta=delta, sample_rate=sample_rate,
                                        steps=steps, prior=stats_history, accountant=privacy.accountant)
    else:
        sigma = privacy.noise_multiplier

    plan = PrivatePlan(privacy=privacy, codecs={}, data=None, seed=int(seed), delta=float(delta),
                       n_rows=n_rows, n_records=n_records, record_of_row=record_of_row, unit_label=unit_label,
                       batch_size=batch, sample_rate=sample_rate, steps_per_epoch=steps_per_epoch, steps=steps,
                       noise_multiplier=float(sigma), stats_noise_multiplier=z_stats, finalizers=finalizers,
                       group=group, target_epsilon=privacy.epsilon, secure_rng=secure_rng)
    query = None
    if n_codec_queries:
        query = GaussianQuery(z_stats, record_of_row, n_records, plan._generator(1))
    plan.codecs, plan.data, plan.preprocessing = private_codecs(
        data, graph, privacy, query, standardize="dp" if n_codec_queries else "bounds")
    if standardize_note:
        plan.preprocessing["standardization"] = standardize_note
    if query is not None and query.calls:
        plan.history.append([z_stats, 1.0, 1])
        plan.dp_statistics.append({"query": "standardization: mean and std of every continuous variable "
                                            "within its public bounds", "noise_multiplier": z_stats})
    return plan


def _records(privacy: Privacy, data, graph: CausalGraph, table: pd.DataFrame):
    """(record index of each row, privacy-unit label, group-privacy info or None)."""
    n = len(table)
    col = privacy.unit_column
    has_cells = any(t.kind == "expression" for t in graph.variables.values())
    if col is None:
        if has_cells and not privacy.force:
            raise PrivacyError("single-cell data: the privacy unit is the donor, not the cell; declare the "
                               "donor column, Privacy(unit_column='donor'), so that a donor's cells form one "
                               "record (or pass force=True to protect single cells only)")
        if isinstance(data, Cohort) and data.table[data.id_column].duplicated().any() and not privacy.force:
            raise PrivacyError(f"the Cohort's id column {data.id_column!r} repeats: several rows belong to one "
                               f"unit; declare it, Privacy(unit_column={data.id_column!r}), or pass force=True "
                               "for row-level DP")
        if has_cells:
            warn("row-level (cell-level) DP on single-cell data: a donor with k cells is only "
                 "protected at k times epsilon (accepted because force=True)", PrivacyWarning)
        return np.arange(n, dtype=np.int64), "row", None
    if col not in table.columns:
        close = difflib.get_close_matches(str(col), [str(c) for c in table.columns], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unit column {col!r}{hint} is not in the data; columns: {list(table.columns)}")
    ids = table[col]
    if ids.isna().any():
        raise DataError(f"unit column {col!r} has {int(ids.isna().sum())} missing value(s): every row needs "
                        "its unit (patient/donor) id")
    codes, uniques = pd.factorize(ids, sort=False)
    codes = codes.astype(np.int64)
    if not privacy.row_level:
        return codes, f"unit ({col!r}: all rows of one {col} form one record)", None
    # The group-privacy conversion is for a public bound on a unit's rows: the data's own maximum
    # is a record-dependent number and would be released exactly in the ledger.
    bound = privacy.max_rows_per_unit
    if bound is None:
        raise PrivacyError(f"row_level=True with unit column {col!r}: declare max_rows_per_unit=K, a public "
                           "bound on a unit's rows (from the study design, not the data); the ledger's "
                           "group-privacy conversion to units is for it. Or drop row_level to train per unit")
    if int(np.bincount(codes).max()) > bound:
        raise PrivacyError(f"unit column {col!r} has a unit with more than max_rows_per_unit={bound} rows: "
                           "declare a bound that holds for every unit, or drop row_level to train per unit")
    if bound > 1 and not privacy.force:
        raise PrivacyError(f"row_level=True with up to {bound} rows per unit (max_rows_per_unit): row-level DP "
                           f"protects a unit only at {bound}x epsilon (group privacy); pass force=True to accept "
                           "it (the ledger shows the conversion), or drop row_level to train per unit")
    if bound > 1:
        warn(f"row-level DP with up to {bound} rows per {col!r}: the ledger's group_privacy gives the "
             "guarantee per unit", PrivacyWarning)
    return np.arange(n, dtype=np.int64), "row", {"group_size": bound, "unit": str(col)}


# -- module checks --------------------------------------------------------------------

def validate_module(module: nn.Module, mode: str) -> None:
    """Opacus's module validator (BatchNorm etc.), naming the offending layer.

    In ``vmap`` mode, Opacus's "should replace" advice (LSTM -> DPLSTM, attention ->
    DPMultiheadAttention) does not apply: vmap differentiates the original layer exactly.

    >>> validate_module(nn.Sequential(nn.Linear(2, 4), nn.GroupNorm(2, 4)), "ghost")
    >>> try:
    ...     validate_module(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)), "vmap")
    ... except PrivacyError as e:
    ...     print("1: BatchNorm" in str(e))
    True
    """
    from opacus.validators import ModuleValidator

    errors = []
    was = module.training
    module.train()
    try:
        for name, sub in module.named_modules():
            check = ModuleValidator.VALIDATORS.get(type(sub))
            if check is None or (mode == "vmap" and isinstance(sub, (nn.RNNBase, nn.MultiheadAttention))):
                continue
            errors += [f"{name or 'model'}: {e}" for e in check(sub)]
    finally:
        module.train(was)
    if errors:
        raise PrivacyError("the model cannot be trained under DP as it is (Opacus module validator): "
                           + "; ".join(errors)
                           + ". Replace BatchNorm by GroupNorm/LayerNorm and drop running statistics")


def fabricated_batch(tensors: Mapping[str, torch.Tensor], n: int = PROBE_ROWS, seed: int = 0) -> dict:
    """Random 0/1 rows shaped like ``tensors``: valid for every encoding, independent of the data.

    >>> b = fabricated_batch({"x": torch.zeros(100, 3)})
    >>> tuple(b["x"].shape), set(b["x"].unique().tolist()) <= {0.0, 1.0}
    ((4, 3), True)
    """
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(0, 2, (n, *v.shape[1:]), generator=g).to(v.dtype).to(v.device)
            for k, v in tensors.items()}


def _check_buffers_static(module: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    """No buffer may change in a training-mode forward pass (the check leaves the module as it was)."""
    before = {k: b.detach().clone() for k, b in module.named_buffers()}
    was = module.training
    module.train()
    try:
        with torch.no_grad():
            module(batch)
        changed = [k for k, b in module.named_buffers() if k in before and not torch.equal(before[k], b)]
    finally:
        module.train(was)
        with torch.no_grad():
            for k, b in module.named_buffers():
                if k in before:
                    b.copy_(before[k])
    if changed:
        raise PrivacyError(f"training updates buffer(s) {changed} from the data (e.g. running statistics); "
                           "they would be released without noise. Remove them before private training")


def _trainable(module: nn.Module):
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def reference_grads(module: nn.Module, batch: Mapping[str, torch.Tensor], losses: torch.Tensor | None = None):
    """Per-row gradients one row at a time: ``autograd.grad(losses[i])`` of one batch forward.

    Returns one ``[n, *param.shape]`` tensor per trainable parameter.

    >>> class Sq(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.w = nn.Parameter(torch.ones(1))
    ...     def forward(self, batch):
    ...         return (self.w * batch["x"]).pow(2).sum(-1)
    >>> reference_grads(Sq(), {"x": torch.tensor([[1.0], [2.0]])})[0].squeeze(-1).tolist()
    [2.0, 8.0]
    """
    named = _trainable(module)
    if losses is None:
        losses = module(batch)
    out = []
    for i in range(losses.shape[0]):
        gs = torch.autograd.grad(losses[i], [p for _, p in named], retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, gs)])
    return [torch.stack([row[j] for row in out]) for j in range(len(named))]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-12)) if b.norm() > 0 else float(a.norm())


def probe(module: nn.Module, tensors: Mapping[str, torch.Tensor], mode: str,
          max_grad_norm: float = 1.0) -> tuple[bool, str]:
    """Whether Opacus ``mode`` ("hooks"/"ghost") gives exact per-record gradients (norms) here.

    Runs on :func:`fabricated_batch` (no private data): one forward with Opacus's hooks
    attached, reference gradients one row at a time from that same forward (hooks off),
    then Opacus's backward; compares per-row gradients (hooks) or their norms (ghost).

    >>> class Reg(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.lin = nn.Linear(3, 1)
    ...     def forward(self, batch):
    ...         return (self.lin(batch["x"]) - batch["y"]).pow(2).squeeze(-1)
    >>> probe(Reg(), {"x": torch.zeros(8, 3), "y": torch.zeros(8, 1)}, "ghost")
    (True, 'per-record gradient norms exact')
    """
    batch = fabricated_batch(tensors)
    named = _trainable(module)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Full backward hook.*")
        return _probe(module, batch, named, mode, max_grad_norm)


def _probe(module, batch, named, mode, max_grad_norm):
    from opacus.grad_sample import GradSampleHooks
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping

    hooks = None
    was = module.training
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()}
    module.train()
    try:
        if mode == "hooks":
            hooks = GradSampleHooks(module, batch_first=True, loss_reduction="sum", strict=True)
        else:
            hooks = GradSampleHooksFastGradientClipping(module, batch_first=True, loss_reduction="sum",
                                                        strict=True, max_grad_norm=max_grad_norm,
                                                        use_ghost_clipping=True)
        losses = module(batch)
        hooks.disable_hooks()
        refs = reference_grads(module, batch, losses)
        hooks.enable_hooks()
        if mode == "hooks":
            losses.sum().backward()
            for (name, p), ref in zip(named, refs):
                gs = getattr(p, "grad_sample", None)
                if gs is None:
                    if ref.abs().max() > 0:
                        return False, f"parameter {name!r} gets no per-record gradient from Opacus's hooks"
                    continue
                if isinstance(gs, list):
                    gs = torch.cat(gs)
                err = _rel_err(gs, ref)
                if err > PROBE_RTOL:
                    return False, f"parameter {name!r}: per-record gradient off by {err:.2e} (relative)"
            return True, "per-record gradients exact"
        losses.sum().backward(retain_graph=True)
        norms = torch.stack([r.reshape(r.shape[0], -1).norm(dim=1) for r in refs], 1).norm(dim=1)
        got = hooks.get_norm_sample()
        err = _rel_err(got, norms)
        if err > PROBE_RTOL:
            return False, f"ghost per-record gradient norms off by {err:.2e} (relative)"
        return True, "per-record gradient norms exact"
    except Exception as e:  # unsupported layers, buffers, missing norm samples ...
        return False, f"{type(e).__name__}: {e}"
    finally:
        if hooks is not None:
            hooks.cleanup()
        module.zero_grad(set_to_none=True)
        for _, p in named:
            for attr in ("grad_sample", "_norm_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        with torch.no_grad():  # e.g. weight averages updated by the loss: leave the module as it was
            for k, b in module.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])
        module.train(was)


def choose_mode(module: nn.Module, tensors: Mapping[str, torch.Tensor], privacy: Privacy,
                grouped: bool) -> str:
    """The per-record gradient mode to train with (see the module docstring).

    >>> class Reg(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.lin = nn.Linear(3, 1)
    ...     def forward(self, batch):
    ...         return (self.lin(batch["x"]) - batch["y"]).pow(2).squeeze(-1)
    >>> tensors = {"x": torch.zeros(8, 3), "y": torch.zeros(8, 1)}
    >>> choose_mode(Reg(), tensors, Privacy(epsilon=1.0), grouped=False)
    'ghost'
    >>> choose_mode(Reg(), tensors, Privacy(epsilon=1.0, grad_sample_mode="vmap"), grouped=False)
    'vmap'
    """
    requested = privacy.grad_sample_mode
    if requested == "vmap":
        return "vmap"
    if requested == "ghost" and grouped:
        raise PrivacyError("grad_sample_mode='ghost' clips per row, but records here span several rows "
                           f"(unit_column={privacy.unit_column!r}); use 'hooks', 'vmap' or 'auto'")
    candidates = ["hooks"] if grouped else ["ghost", "hooks"]
    if requested != "auto":
        candidates = [requested]
    reasons = []
    for mode in candidates:
        ok, why = probe(module, tensors, mode, privacy.max_grad_norm)
        if ok:
            return mode
        reasons.append(f"{mode}: {why}")
        if requested != "auto":
            raise PrivacyError(f"grad_sample_mode={mode!r} does not give exact per-record gradients for this "
                               f"model ({why}); use 'vmap' (always exact) or 'auto'")
    return "vmap"


# -- per-record gradients with torch.func ---------------------------------------------

class VmapGrads:
    """Per-record gradients and losses of a per-row-loss module: ``vmap(grad_and_value(row loss))``.

    >>> class Sq(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.w = nn.Parameter(torch.ones(1))
    ...     def forward(self, batch):
    ...         return (self.w * batch["x"]).pow(2).sum(-1)
    >>> grads, losses = VmapGrads(Sq())({"x": torch.tensor([[1.0], [2.0]])})
    >>> grads[0].squeeze(-1).tolist(), losses.tolist()
    ([2.0, 8.0], [1.0, 4.0])
    """

    def __init__(self, module: nn.Module, randomness: str | None = None):
        from torch.func import functional_call, grad_and_value, vmap

        self.module = module
        self.named = _trainable(module)

        def row_loss(params, buffers, row):
            out = functional_call(module, (params, buffers), ({k: v.unsqueeze(0) for k, v in row.items()},))
            return out.sum()

        self.fn = vmap(grad_and_value(row_loss), in_dims=(None, None, 0),
                       randomness=randomness or VMAP_RANDOMNESS)

    def __call__(self, batch: Mapping[str, torch.Tensor]):
        params = {n: p.detach() for n, p in self.named}
        buffers = dict(self.module.named_buffers())
        grads, losses = self.fn(params, buffers, dict(batch))
        return [grads[n] for n, _ in self.named], losses


# -- the session the loop steps ------------------------------------------------------

class _RankShare:
    """This rank's share (every ``world``-th record) of each logical batch ``sampler`` draws."""

    def __init__(self, sampler, rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self):
        for batch in self.sampler:
            yield batch[self.rank::self.world]

    def __len__(self) -> int:
        return len(self.sampler)


def make_engine(mode: str, accountant: str, secure_mode: bool):
    """Opacus's ``PrivacyEngine`` whose module validation is :func:`validate_module` for ``mode``.

    >>> make_engine("vmap", "rdp", secure_mode=False).accountant.mechanism()
    'rdp'
    """
    from opacus import PrivacyEngine

    class Engine(PrivacyEngine):
        def validate(self, *, module, optimizer, data_loader):
            validate_module(module, mode)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        return Engine(accountant=accountant, secure_mode=secure_mode)


class PrivateSession:
    """Opacus objects for one private training run; ``step(records)`` does one physical batch.

    Made by :meth:`PrivatePlan.attach`; the loop is :func:`medcausal.train._train_private`.

    >>> import numpy as np
    >>> class Sq(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.w = nn.Parameter(torch.ones(1))
    ...     def forward(self, batch):
    ...         return (self.w * batch["x"]).pow(2).sum(-1)
    >>> m = Sq()
    >>> plan = PrivatePlan(privacy=Privacy(noise_multiplier=1.0, grad_sample_mode="vmap"), codecs={}, data=None,
    ...                    seed=0, delta=1e-5, n_rows=4, n_records=4, record_of_row=np.arange(4),
    ...                    unit_label="row", batch_size=2, sample_rate=0.5, steps_per_epoch=2, steps=2,
    ...                    noise_multiplier=0.0, stats_noise_multiplier=None)
    >>> session = plan.attach(m, torch.optim.SGD(m.parameters(), lr=1.0), {"x": torch.ones(4, 1)})
    >>> session.step(torch.tensor([0, 1])), round(m.w.item(), 6)  # two records, gradients 2 clipped to 1
    (True, 0.0)
    >>> session.close()
    """

    def __init__(self, plan: PrivatePlan, module: nn.Module, optimizer: torch.optim.Optimizer,
                 tensors: Mapping[str, torch.Tensor]):
        from torch.utils.data import DataLoader, TensorDataset

        self.plan, self.module, self.tensors = plan, module, tensors
        privacy = plan.privacy
        self.named = _trainable(module)
        self.params = [p for _, p in self.named]
        mode = plan.grad_sample_mode or choose_mode(module, tensors, privacy, plan._grouped)
        validate_module(module, mode)
        _check_buffers_static(module, fabricated_batch(tensors))
        plan.grad_sample_mode = self.mode = mode
        self.engine = make_engine(mode, privacy.accountant, privacy.secure_mode)
        self.engine.accountant.history = [tuple(h) for h in plan.history]
        loader = DataLoader(TensorDataset(torch.arange(plan.n_records)), batch_size=plan.batch_size,
                            generator=plan._generator(2))
        device = self.params[0].device if self.params else torch.device("cpu")
        noise_gen = None if privacy.secure_mode else plan._generator(3, device)  # noise is drawn on device
        kwargs = dict(module=module, optimizer=optimizer, data_loader=loader,
                      noise_multiplier=plan.noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                      poisson_sampling=True, noise_generator=noise_gen, loss_reduction="mean")
        self.hooks = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            warnings.filterwarnings("ignore", message=".*Full backward hook.*")
            if mode == "ghost":
                self.hooks, self.optimizer, _, self.loader = self.engine.make_private(
                    grad_sample_mode="ghost", wrap_model=False, **kwargs)
            elif mode == "hooks":
                self.hooks, self.optimizer, self.loader = self.engine.make_private(
                    grad_sample_mode="hooks", wrap_model=False, **kwargs)
            else:
                self.hooks, self.optimizer, self.loader = self.engine.make_private(
                    grad_sample_mode="no_op", wrap_model=True, **kwargs)
                self.vmap = VmapGrads(module)
        # Opacus derives the epoch's step count as int(1 / (1 / steps)) and, from it, the rate it
        # accounts and (truncated by int()) the expected batch size it averages by. Float rounding
        # loses a step for some step counts (93 -> 92: 1/92 accounted where 1/93 was planned, and
        # the ledger overshot its target epsilon), and the truncation gave 49 records in batches of
        # 1 an expected batch of 0 (a non-finite update) or 98 in batches of 2 one of 1 (a doubled
        # step). The plan's own values replace them.
        sampler = self.loader.batch_sampler
        if not hasattr(sampler, "steps") or not math.isclose(sampler.sample_rate, plan.sample_rate):
            if self.hooks is not None:
                self.hooks.cleanup()
            raise MedCausalError(f"unexpected Opacus data loader {type(sampler).__name__}: cannot set the "
                                 "planned sampling (is the installed Opacus version supported?)")
        sampler.steps = plan.steps_per_epoch
        self.world = distributed_setup()[1]  # as prepare() counted them: they must agree
        # per rank: rank 0's noise and every rank's clipped sum, all-reduced and divided by the
        # world size, are then divided by the planned expected batch size, as in one process
        expected = plan.sample_rate * plan.n_records / self.world
        if self.world > 1:
            self._distribute(optimizer, noise_gen, expected)
        self.optimizer.expected_batch_size = expected
        self.optimizer.attach_step_hook(self.engine.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
        self.grouped = plan._grouped
        self.device = self.params[0].device if self.params else torch.device("cpu")

    def _distribute(self, optimizer: torch.optim.Optimizer, noise_gen, expected_batch_size: float) -> None:
        """Opacus's DPDDP recipe, under torchrun: each rank clips the per-record gradients of its
        share of every logical batch, rank 0 alone adds the noise, and the sums are all-reduced, so
        every rank takes the update one process would. Every rank draws the same Poisson batches
        (the plan's seed is rank 0's) and keeps every ``world``-th record of each; Opacus's
        distributed sampler is not used, as it skips a rank's empty batch and would leave the
        other ranks waiting in the all-reduce."""
        from opacus.optimizers import get_optimizer_class
        from torch.utils.data import DataLoader

        rank = torch.distributed.get_rank()
        cls = get_optimizer_class(clipping="flat", distributed=True,
                                  grad_sample_mode="ghost" if self.mode == "ghost" else "hooks")
        self.optimizer = cls(optimizer, noise_multiplier=self.plan.noise_multiplier,
                             max_grad_norm=self.plan.privacy.max_grad_norm,
                             expected_batch_size=expected_batch_size,
                             loss_reduction="mean", generator=noise_gen, secure_mode=self.plan.privacy.secure_mode)
        # the loader's generator too: each epoch's iterator draws a seed from it, as make_private's does
        self.loader = DataLoader(self.loader.dataset, batch_sampler=_RankShare(self.loader.batch_sampler, rank,
                                                                               self.world),
                                 collate_fn=self.loader.collate_fn, generator=self.loader.generator)
        with torch.no_grad():  # DPDDP's start: rank 0's weights everywhere
            for t in [*self.module.parameters(), *self.module.buffers()]:
                torch.distributed.broadcast(t.data, src=0)

    def _group(self, gs: torch.Tensor, pos: torch.Tensor | None, n: int) -> torch.Tensor:
        if pos is None:
            return gs
        out = gs.new_zeros((n, *gs.shape[1:]))
        return out.index_add_(0, pos.to(gs.device), gs)

    def _check(self, losses: torch.Tensor) -> None:
        if not torch.isfinite(losses).all():
            raise MedCausalError("private training diverged: non-finite loss; lower lr= or "
                                 "max_grad_norm=, or check the public bounds")

    def step(self, records: torch.Tensor) -> bool:
        """Forward/backward one physical batch and step the DP optimizer; True after a real step."""
        rows, pos = self.plan.rows_of(records)
        n = len(records)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Full backward hook.*")
            if len(rows) == 0:
                for p in self.params:  # empty Poisson batch: the update is pure noise
                    if self.mode == "ghost":
                        p.grad = torch.zeros_like(p)
                    else:
                        p.grad_sample = p.new_zeros((0, *p.shape))
            else:
                rows = rows.to(self.device)
                batch = {k: v[rows] for k, v in self.tensors.items()}
                if self.mode == "vmap":
                    grads, losses = self.vmap(batch)
                    self._check(losses)
                    for p, g in zip(self.params, grads):
                        p.grad_sample = self._group(g, pos, n)
                elif self.mode == "hooks":
                    losses = self.module(batch)
                    self._check(losses)
                    losses.mean().backward()
                    if pos is not None:
                        for p in self.params:
                            p.grad_sample = self._group(p.grad_sample, pos, n)
                else:
                    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

                    losses = self.module(batch)
                    self._check(losses)
                    DPTensorFastGradientClipping(self.hooks, self.optimizer, losses, "mean").backward()
            self.optimizer.step()
            stepped = not self.optimizer._is_last_step_skipped
            self.optimizer.zero_grad(set_to_none=True)
        return stepped

    def close(self) -> None:
        """Remove Opacus's hooks and attributes; keep the accountant's history in the plan."""
        self.plan.history = [list(h) for h in self.engine.accountant.history]
        if self.hooks is not None:
            try:
                self.hooks.cleanup()
            except Exception:  # pragma: no cover - cleanup is best effort
                pass
        for p in self.params:
            for attr in ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample", "_processed"):
                if hasattr(p, attr):
                    try:
                        delattr(p, attr)
                    except AttributeError:  # pragma: no cover
                        pass
