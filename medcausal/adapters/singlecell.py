"""Single-cell adapter, scverse style: declare the AnnData fields, fit FCR, write results back.

1. :func:`setup_anndata` declares which ``.obs`` columns and which layer a model
   reads (perturbation, control value, dose, covariates such as cell type and donor,
   raw counts) and validates them, with errors that name the culprit.
2. :class:`FCRModel` fits a count mechanism (``"fcr"`` or the ``"latent-shift"``
   baseline, from :mod:`medcausal.mechanisms.fcr`) with the shared training loop
   :func:`medcausal.train.train`, streaming minibatches of counts from the AnnData
   (in memory, sparse, or backed on disk) without densifying the whole matrix.
3. Results go back scverse style: latent blocks in ``.obsm["X_fcr_context"]``,
   ``["X_fcr_treatment"]``, ``["X_fcr_interaction"]``; counterfactual expression as
   a new AnnData with provenance in ``.uns["medcausal"]``.

Treatments are encoded multi-hot over the *single* perturbations (times the dose),
so a combination ``"A+B"`` never seen in training is still a valid query as long as
``A`` and ``B`` were seen.

>>> import medcausal as mc
>>> from medcausal.synthetic.perturbseq import PerturbSeq
>>> adata = PerturbSeq(n_genes=40, seed=0).sample(300, seed=0)
>>> setup_anndata(adata, perturbation_key="perturbation", control="control",
...               covariate_keys=["cell_type"], dose_key="dose")
>>> model = FCRModel(hidden=[32]).fit(adata, max_epochs=2, verbose=False)
>>> model.write_latents(adata)
>>> adata.obsm["X_fcr_context"].shape
(300, 4)
>>> cf = model.predict_counterfactual(adata[:5], perturbation="P0+P1")
>>> cf.obs["perturbation"].unique().tolist(), cf.uns["medcausal"]["kind"]
(['P0+P1'], 'counterfactual')
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from torch import nn

from ..cohort import Cohort
from ..errors import DataError, InterventionError, MedCausalError, ModelFileError, NotFittedError
from ..graph import Expression
from ..interventions import align_to_rows
from ..io import atomic_write, load_model_file, save_model_file
from ..synthetic.perturbseq import parse_perturbation
from ..train import TrainConfig, forked_rng, train_rounds

__all__ = ["FCRModel", "anndata_to_cohort", "check_counts", "cohort_to_anndata", "fit_fcr",
           "get_setup", "read_h5ad", "setup_anndata", "write_h5ad"]

SETUP_KEY = "medcausal_setup"
FORMAT = "medcausal-singlecell-model"
_CHUNK = 10_000


# --------------------------------------------------------------------------- validation
def _require_anndata(adata) -> None:
    import anndata as ad

    if not isinstance(adata, ad.AnnData):
        raise DataError(f"expected an anndata.AnnData, got {type(adata).__name__}")


def _copy(adata):
    if adata.isbacked:
        raise DataError(f"copy=True needs the data in memory, and this AnnData is backed by "
                        f"{str(adata.filename)!r}: " + ("pass view.to_memory()" if adata.is_view else
                                                         "use copy=False (annotations are written in place) "
                                                         "or adata.to_memory()"))
    return adata.copy()


def _check_writable(adata, what: str) -> None:
    """anndata cannot annotate a view of backed data in place; say so before any work."""
    if adata.is_view and adata.isbacked:
        raise DataError(f"{what} writes into the AnnData, and this one is a view of data backed by "
                        f"{str(adata.filename)!r}, which anndata cannot annotate in place: pass view.to_memory()")


def _missing_key(key: str, available: Sequence[str], what: str) -> DataError:
    close = difflib.get_close_matches(str(key), [str(a) for a in available], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return DataError(f"{what} {key!r} not found{hint}; available: {list(available)}")


def _matrix(adata, layer: str | None):
    if layer is None:
        if adata.X is None:
            raise DataError("adata.X is empty (None): name the counts layer with layer=...")
        return adata.X
    if layer not in adata.layers:
        err = _missing_key(layer, list(adata.layers), "layer")
        raise DataError(f"{err} (raw counts in .X? pass layer=None)") from None
    return adata.layers[layer]


def check_counts(matrix, where: str = "X", chunk: int = _CHUNK) -> None:
    """Raise unless ``matrix`` holds non-negative integer counts (checked in row chunks).

    >>> check_counts(np.array([[0, 3], [1, 2]], dtype=np.float32))
    >>> check_counts(np.log1p(np.array([[0.0, 3.0]])), where="layers['counts']")
    Traceback (most recent call last):
    ...
    medcausal.errors.DataError: layers['counts'] holds non-integer values (e.g. 1.386) ...
    """
    n = matrix.shape[0]
    for start in range(0, n, chunk):
        block = matrix[start:min(n, start + chunk)]
        vals = block.data if sparse.issparse(block) else np.asarray(
            block.toarray() if hasattr(block, "toarray") else block)
        vals = np.asarray(vals).ravel()
        if vals.size == 0:
            continue
        if not np.all(np.isfinite(vals)):
            raise DataError(f"{where} holds {int((~np.isfinite(vals)).sum())} NaN/infinite value(s)")
        if (vals < 0).any():
            raise DataError(f"{where} holds negative values (e.g. {vals[vals < 0][0]:.4g}): it looks "
                            "centered or scaled; count likelihoods need raw counts. Keep raw UMI counts "
                            "in a layer (adata.layers['counts'] = adata.raw.X or a copy made before "
                            "sc.pp.normalize_total/log1p/scale) and pass layer='counts'")
        frac = vals != np.round(vals)
        if frac.any():
            raise DataError(f"{where} holds non-integer values (e.g. {vals[frac][0]:.4g}) ... it looks "
                            "normalized or log-transformed; count likelihoods need raw counts. Keep raw "
                            "UMI counts in a layer (adata.layers['counts'] = adata.raw.X or a copy made "
                            "before sc.pp.normalize_total/log1p) and pass layer='counts'")


def setup_anndata(adata, perturbation_key: str, control: str, covariate_keys: Sequence[str] = (),
                  layer: str | None = "counts", dose_key: str | None = None,
                  split_key: str | None = None, sep: str = "+", copy: bool = False):
    """Declare and validate the fields a single-cell model reads; writes ``.uns["medcausal_setup"]``.

    ``perturbation_key``: the ``.obs`` column of treatment labels (``control`` for
    untreated cells, ``"A+B"`` for combinations); ``covariate_keys``: context columns
    (cell type, donor, batch); ``layer``: raw counts (``None`` for ``.X``);
    ``dose_key``: optional numeric dose column; ``split_key``: optional column of
    split names (when it is set, :meth:`FCRModel.fit` trains on the ``"train"`` rows and
    validates on the ``"val"`` rows, if any).
    Returns None, or the annotated copy with ``copy=True``.

    >>> import anndata as ad
    >>> a = ad.AnnData(np.ones((3, 2), dtype=np.float32),
    ...                obs=pd.DataFrame({"drug": ["ctrl", "A", "A+B"]}, index=list("xyz")))
    >>> setup_anndata(a, perturbation_key="drug", control="ctrl", layer=None)
    >>> a.uns["medcausal_setup"]["perturbations"]
    ['A', 'B']
    >>> setup_anndata(a, perturbation_key="drug", control="DMSO", layer=None)
    Traceback (most recent call last):
    ...
    medcausal.errors.DataError: control value 'DMSO' does not occur in obs['drug']; values: ['A', 'A+B', 'ctrl']
    """
    _require_anndata(adata)
    covariate_keys = [covariate_keys] if isinstance(covariate_keys, str) else list(covariate_keys)
    if not isinstance(sep, str) or not sep:
        raise DataError(f"sep= must be a non-empty string (the separator of combinations 'A+B'), got {sep!r}")
    if copy:
        adata = _copy(adata)
    else:
        _check_writable(adata, "setup_anndata")
    obs = adata.obs
    keys = [("perturbation_key", perturbation_key)] + [("covariate_keys", k) for k in covariate_keys]
    keys += [(n, k) for n, k in (("dose_key", dose_key), ("split_key", split_key)) if k is not None]
    for what, key in keys:
        if key not in obs.columns:
            raise _missing_key(key, list(obs.columns), f"{what}: obs column")
    if perturbation_key in covariate_keys:
        raise DataError(f"{perturbation_key!r} is both the perturbation key and a covariate key")
    repeated = sorted({str(k) for k in covariate_keys if covariate_keys.count(k) > 1})
    if repeated:
        raise DataError(f"covariate_keys names {repeated} more than once")
    labels = obs[perturbation_key]
    if labels.isna().any():
        raise DataError(f"obs[{perturbation_key!r}] has {int(labels.isna().sum())} missing value(s)")
    values = sorted(map(str, pd.unique(labels.astype(str))))
    if str(control) not in values:
        raise DataError(f"control value {control!r} does not occur in obs[{perturbation_key!r}]; "
                        f"values: {values[:20]}")
    for key in covariate_keys:
        if obs[key].isna().any():
            raise DataError(f"covariate obs[{key!r}] has {int(obs[key].isna().sum())} missing value(s)")
    if dose_key is not None:
        dose = pd.to_numeric(obs[dose_key], errors="coerce")[labels.astype(str).to_numpy() != str(control)]
        if dose.isna().any() or not np.all(np.isfinite(dose.to_numpy())) or (dose < 0).any():
            raise DataError(f"dose obs[{dose_key!r}] must hold finite non-negative numbers for treated cells "
                            "(a control's dose is ignored and may be missing)")
    if split_key is not None and obs[split_key].isna().any():
        raise DataError(f"split obs[{split_key!r}] has missing value(s)")
    where = "X" if layer is None else f"layers[{layer!r}]"
    check_counts(_matrix(adata, layer), where=where)
    setup = {"perturbation_key": str(perturbation_key), "control": str(control),
             "covariate_keys": [str(k) for k in covariate_keys], "sep": sep, "n_vars": int(adata.n_vars)}
    for name, val in (("layer", layer), ("dose_key", dose_key), ("split_key", split_key)):
        if val is not None:
            setup[name] = str(val)
    setup.update(_vocabulary(obs, setup))
    adata.uns[SETUP_KEY] = setup
    return adata if copy else None


def _vocabulary(obs: pd.DataFrame, setup: Mapping) -> dict:
    """What a model learns from these cells: single perturbations, covariate categories and
    the largest dose given to a treated cell."""
    pkey, control, sep = setup["perturbation_key"], setup["control"], setup.get("sep", "+")
    labels = obs[pkey].astype(str)
    singles: set[str] = set()
    for v in pd.unique(labels):
        try:
            singles.update(parse_perturbation(v, control, sep))
        except DataError as e:
            raise DataError(f"obs[{pkey!r}]: {e}") from None
    if not singles:
        raise DataError(f"obs[{pkey!r}] holds only the control {control!r}: nothing to learn")
    out = {"perturbations": sorted(singles),
           "covariate_categories": {k: sorted(map(str, pd.unique(obs[k].astype(str))))
                                    for k in setup["covariate_keys"]}}
    if setup.get("dose_key") is not None:
        d = pd.to_numeric(obs[setup["dose_key"]], errors="coerce").to_numpy(dtype=float)  # controls' may be NaN
        treated = labels.to_numpy() != control
        out["max_dose"] = float(d[treated].max()) if treated.any() else 1.0
    return out


def get_setup(adata) -> dict:
    """The declaration written by :func:`setup_anndata` (a plain dict)."""
    _require_anndata(adata)
    if SETUP_KEY not in adata.uns:
        raise DataError("this AnnData is not set up: call medcausal.adapters.singlecell.setup_anndata("
                        "adata, perturbation_key=..., control=..., covariate_keys=[...]) first")
    setup = dict(adata.uns[SETUP_KEY])
    setup["covariate_keys"] = [str(k) for k in setup.get("covariate_keys", [])]
    setup["perturbations"] = [str(k) for k in setup["perturbations"]]
    setup["covariate_categories"] = {k: [str(c) for c in v]
                                     for k, v in dict(setup.get("covariate_categories", {})).items()}
    return setup


# --------------------------------------------------------------------------- encoding
def _encode_obs(obs: pd.DataFrame, setup: Mapping, perturbation=None, dose=None,
                covariates: Mapping[str, Any] | None = None) -> np.ndarray:
    """Parent features ``[n, Σ categories + n_perturbations]``: one-hot covariates, multi-hot × dose."""
    n = len(obs)
    blocks = []
    covariates = dict(covariates or {})
    unknown = [k for k in covariates if k not in setup["covariate_keys"]]
    if unknown:
        raise InterventionError(f"covariates={unknown} are not covariates of this model; "
                                f"covariates: {setup['covariate_keys']}")
    for key in setup["covariate_keys"]:
        cats = setup["covariate_categories"][key]
        if key in covariates:
            vals = np.asarray(_per_cell(covariates[key], obs, key), dtype=object).astype(str)
        else:
            if key not in obs.columns:
                raise _missing_key(key, list(obs.columns), "covariate obs column")
            vals = obs[key].astype(str).to_numpy()
        idx = pd.Categorical(vals, categories=cats).codes
        if (idx < 0).any():
            bad = sorted(set(vals[idx < 0]))[:5]
            raise DataError(f"covariate {key!r} has value(s) {bad} not seen at fit; known: {cats}")
        blocks.append(np.eye(len(cats), dtype=np.float32)[idx])
    treat, d = _treatment(obs, setup, perturbation, dose)
    if d is not None:
        treat *= (d / float(setup.get("dose_scale", 1.0)))[:, None].astype(np.float32)
    blocks.append(treat)
    return np.concatenate(blocks, axis=1)


def _treatment(obs: pd.DataFrame, setup: Mapping, perturbation=None, dose=None):
    """``(multi-hot [n, n_perturbations], dose per cell in the data's units or None)``; the dose
    of a control (factual or counterfactual) is 0."""
    n = len(obs)
    pkey, control, sep = setup["perturbation_key"], setup["control"], setup.get("sep", "+")
    if perturbation is None:
        if pkey not in obs.columns:
            raise _missing_key(pkey, list(obs.columns), "perturbation obs column")
        labels = obs[pkey].astype(str).to_numpy()
    else:
        labels = np.asarray(_per_cell(perturbation, obs, "perturbation"), dtype=object).astype(str)
    singles = setup["perturbations"]
    col = {p: i for i, p in enumerate(singles)}
    treat = np.zeros((n, len(singles)), dtype=np.float32)
    for lab in np.unique(labels):
        members = parse_perturbation(lab, control, sep)
        missing = [m for m in members if m not in col]
        if missing:
            raise DataError(f"perturbation {lab!r} names {missing}, never seen alone or in a combination "
                            f"at fit; known single perturbations: {singles}")
        treat[np.ix_(labels == lab, [col[m] for m in members])] = 1.0
    dkey = setup.get("dose_key")
    if dkey is None:
        if dose is not None:
            raise InterventionError("dose= given, but this model has no dose: declare one with "
                                    "setup_anndata(..., dose_key=...) before fitting")
        return treat, None
    if dose is not None:
        d = np.asarray(_per_cell(dose, obs, "dose"), dtype=float)
    else:
        if dkey not in obs.columns:
            raise _missing_key(dkey, list(obs.columns), "dose obs column")
        d = pd.to_numeric(obs[dkey], errors="coerce").to_numpy(dtype=float, copy=True)  # a control's may be "NA"
        if perturbation is None:
            d[~treat.any(axis=1)] = 0.0  # a control's dose is ignored (may be NaN)
        else:  # treated cells keep their dose; controls (whatever dose they record) get the largest seen
            d[~(d > 0)] = float(setup.get("max_dose", 1.0))
            if pkey in obs.columns:
                d[obs[pkey].astype(str).str.strip().to_numpy() == control] = float(setup.get("max_dose", 1.0))
    if not np.all(np.isfinite(d)) or (d < 0).any():
        raise DataError(f"dose must be finite and non-negative (obs[{dkey!r}] or dose=)")
    return treat, np.where(treat.any(axis=1), d, 0.0)


def _per_cell(value, obs: pd.DataFrame, key: str) -> list:
    """``value`` for each cell of ``obs``: one for all, one per cell, or a Series by cell name."""
    n = len(obs)
    if np.ndim(value) == 0:
        return [value] * n
    vals = list(np.asarray(align_to_rows(value, obs.index, f"{key}="), dtype=object).reshape(-1))
    if len(vals) != n:
        raise InterventionError(f"{key}= has {len(vals)} values for {n} cells")
    return vals


class _CountRows:
    """Row access to a count matrix in memory (dense or sparse) or backed on disk.

    In backed mode anndata keeps ``X`` on disk (read here a minibatch at a time) and loads
    the layers into memory; a view (``adata[100:200]``) reads its own rows either way.
    """

    def __init__(self, adata, layer: str | None):
        self.src = _matrix(adata, layer)
        self.n = adata.n_obs
        self.n_vars = adata.n_vars

    def rows(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        uniq, inv = np.unique(idx, return_inverse=True)
        block = self.src[uniq]
        if hasattr(block, "toarray"):
            block = block.toarray()
        return np.asarray(block, dtype=np.float32)[inv]


class _LazyTensor:
    """Row-indexable stand-in for a tensor: ``train`` reads minibatches through it."""

    def __init__(self, rows: _CountRows, subset: np.ndarray):
        self.rows, self.subset, self.device = rows, subset, torch.device("cpu")

    def __len__(self) -> int:
        return len(self.subset)

    def to(self, device):
        self.device = torch.device(device)
        return self

    def __getitem__(self, idx):
        idx = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        return torch.from_numpy(self.rows.rows(self.subset[idx])).to(self.device)


class _Objective(nn.Module):
    def __init__(self, mechanism: nn.Module):
        super().__init__()
        self.mechanism = mechanism

    def forward(self, batch):
        return self.mechanism.loss(batch["counts"], batch["parents"])


# --------------------------------------------------------------------------- the model
class FCRModel:
    """Fit a count mechanism to a set-up AnnData and query it, scvi-tools style.

    ``mechanism`` is ``"fcr"`` (default) or ``"latent-shift"`` (the CPA-style
    baseline); ``hparams`` go to the mechanism (e.g. ``n_context=4``, ``hidden=[128]``).
    The covariates are its parents named after their ``.obs`` columns (one-hot,
    declared categorical), the treatment the parent named after the perturbation key
    (multi-hot over single perturbations, times the dose).
    """

    def __init__(self, mechanism: str = "fcr", **hparams: Any):
        from ..mechanisms import fcr  # noqa: F401  (registers "fcr" and "latent-shift")
        from ..mechanisms import registry

        self.mechanism_name = str(mechanism)
        self._cls = registry.get(self.mechanism_name)
        if "expression" not in self._cls.supports:
            raise MedCausalError(f"mechanism {mechanism!r} does not model expression counts")
        self.hparams = dict(hparams)
        self.module = None
        self.setup: dict | None = None
        self.var_names: list[str] | None = None
        self.fit_info: dict = {}
        self.history: list[dict] = []

    @property
    def prefix(self) -> str:
        return "X_" + self.mechanism_name.replace("-", "_")

    def _build(self, setup: Mapping, n_genes: int) -> None:
        parents = {k: len(setup["covariate_categories"][k]) for k in setup["covariate_keys"]}
        parents[setup["perturbation_key"]] = len(setup["perturbations"])
        kw = {"treatment": setup["perturbation_key"], "categorical": list(setup["covariate_keys"]),
              **self.hparams}
        try:
            self.module = self._cls(Expression(n_genes), parents, **kw)
        except TypeError as e:
            raise MedCausalError(f"bad settings for mechanism {self.mechanism_name!r}: {e}") from None

    def _require_fit(self) -> None:
        if self.module is None:
            raise NotFittedError("this FCRModel is not fitted yet: call .fit(adata) first")

    def _check_genes(self, adata) -> None:
        if adata.n_vars != len(self.var_names):
            raise DataError(f"the AnnData has {adata.n_vars} genes; the model was fitted on "
                            f"{len(self.var_names)}")
        if list(map(str, adata.var_names)) != self.var_names:
            raise DataError("the AnnData's var_names differ from those the model was fitted on "
                            "(same genes, same order needed)")

    def fit(self, adata, *, max_epochs: int = 100, max_steps: int | None = None, batch_size: int = 256,
            lr: float = 1e-3, weight_decay: float = 0.0, val_fraction: float = 0.1, patience: int = 20,
            seed: int = 0, rounds: int | None = None, verbose: bool | None = None,
            device: str = "cpu") -> "FCRModel":
        """Train on the cells of ``adata`` (its ``"train"`` split when a split key was declared).

        A declared split's ``"val"`` (or ``"validation"``) rows are the validation set of early
        stopping; without any, a random ``val_fraction`` of the training cells is. Counts stream
        from the declared layer in minibatches; returns ``self``.
        ``fcr`` ends each training run with its exact linear refinement of the code
        (``refine_steps``, :meth:`~medcausal.mechanisms.fcr.FCRMechanism.refine_latent_map`;
        ``fit_info["refine"]`` has one record per run); ``rounds > 1`` splits ``max_epochs``
        into that many runs, so training after a refinement starts from the aligned code.
        Default: 3 for ``fcr`` (at most ``max_epochs``; on the perturb-seq benchmark 3 rounds
        beat 1 on the interaction block's MCC on all three simulators), 1 otherwise.
        A fit that fails (bad input, a diverged loss, an interrupt) leaves the model as it was.
        """
        if isinstance(max_epochs, bool) or not isinstance(max_epochs, (int, np.integer)) or max_epochs < 1:
            raise MedCausalError(f"max_epochs must be an integer >= 1, got {max_epochs!r}")
        if rounds is None:  # fcr refines its code after each run; with refine_steps=0 one run is plain training
            refines = hasattr(self._cls, "refine_latent_map") and self.hparams.get("refine_steps") != 0
            rounds = min(3, max_epochs) if refines else 1
        if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or not 1 <= rounds <= max_epochs:
            raise MedCausalError(f"rounds must be an integer between 1 and max_epochs ({max_epochs}), got {rounds!r}")
        kept = {k: getattr(self, k) for k in ("setup", "var_names", "module", "history", "fit_info")}
        try:  # a refit builds a new module: the kept one is untouched
            return self._fit(adata, max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                             weight_decay=weight_decay, val_fraction=val_fraction, patience=patience, seed=seed,
                             rounds=int(rounds), verbose=verbose, device=device)
        except BaseException:  # KeyboardInterrupt too
            for k, v in kept.items():
                setattr(self, k, v)
            raise

    def _fit(self, adata, *, max_epochs, max_steps, batch_size, lr, weight_decay, val_fraction, patience,
             seed, rounds, verbose, device) -> "FCRModel":
        setup = get_setup(adata)
        if setup["n_vars"] != adata.n_vars:
            raise DataError(f"setup_anndata saw {setup['n_vars']} genes, the AnnData has {adata.n_vars}: "
                            "call setup_anndata again after subsetting genes")
        rows, val = np.arange(adata.n_obs), np.arange(0)
        if setup.get("split_key"):
            split = adata.obs[setup["split_key"]].astype(str).to_numpy()
            rows = np.flatnonzero(split == "train")
            val = np.flatnonzero(np.isin(split, ("val", "validation")))
            if rows.size == 0:
                raise DataError(f"obs[{setup['split_key']!r}] has no 'train' rows")
        if rows.size < 2:
            raise DataError(f"fit() needs at least 2 cells, got {rows.size}")
        with forked_rng(device, seed=seed):  # the caller's random state is left as it was
            # What the model can answer is what its training rows show (held-out split rows may
            # hold perturbations or categories it never sees); doses enter relative to the largest.
            setup = {**setup, **_vocabulary(adata.obs.iloc[rows], setup)}
            if setup.get("dose_key") is not None:
                setup["dose_scale"] = setup["max_dose"] if setup["max_dose"] > 0 else 1.0
            self.setup = setup
            self.var_names = list(map(str, adata.var_names))
            self._build(setup, adata.n_vars)
            parents = torch.from_numpy(_encode_obs(adata.obs.iloc[rows], setup))
            if val.size:
                try:
                    val_parents = torch.from_numpy(_encode_obs(adata.obs.iloc[val], setup))
                except DataError as e:
                    raise DataError(f"obs[{setup['split_key']!r}] 'val' rows: {e}; validation cells must hold "
                                    "what the 'train' rows show") from None
                parents = torch.cat([parents, val_parents])
            source = _CountRows(adata, setup.get("layer"))
            gen = np.random.default_rng(seed)
            init_rows = np.sort(gen.choice(rows.size, size=min(rows.size, 2000), replace=False))
            self.module.initialize(torch.from_numpy(source.rows(rows[init_rows])))
            tensors = {"parents": parents, "counts": _LazyTensor(source, np.concatenate([rows, val]))}
            config = TrainConfig(max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                                 weight_decay=weight_decay, val_fraction=val_fraction, patience=patience,
                                 seed=seed, verbose=verbose, device=device,
                                 val_rows=range(rows.size, rows.size + val.size) if val.size else None)
            refines: list[dict] = []

            def refine(_round):
                self.module.to("cpu").eval()
                if getattr(self.module, "refine_steps", 0):  # fcr: align the code with its conditional priors
                    refines.append(self.module.refine_latent_map(
                        (torch.from_numpy(source.rows(rows[i:i + 1024])) for i in range(0, rows.size, 1024)),
                        parents[:rows.size], seed=seed))

            result, runs = train_rounds(_Objective(self.module), tensors, config, rounds, after_round=refine)
        self.history = result.history
        self.fit_info = {"seed": seed, "n_cells": int(rows.size), "n_val_cells": int(val.size),
                         "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                         "epochs": len(result.history), "steps": result.steps, "seconds": round(result.seconds, 3),
                         "stopped_early": result.stopped_early, "rounds": runs, "rolled_back": result.rolled_back,
                         "skipped_batches": result.skipped_batches}
        if refines:
            self.fit_info["refine"] = refines
        return self

    # -- batched access ----------------------------------------------------------------
    def _batches(self, adata, batch_size: int):
        self._require_fit()
        self._check_genes(adata)
        layer = self.setup.get("layer")
        source = _CountRows(adata, layer)
        for start in range(0, adata.n_obs, batch_size):
            idx = np.arange(start, min(adata.n_obs, start + batch_size))
            counts = source.rows(idx)
            check_counts(counts, where="X" if layer is None else f"layers[{layer!r}]")
            yield idx, torch.from_numpy(counts)

    def get_latent_representation(self, adata, batch_size: int = 1024) -> dict[str, np.ndarray]:
        """Posterior means of each latent block: ``{"context", "treatment", "interaction"}`` for
        ``fcr``, ``{"basal"}`` for ``latent-shift``."""
        self._require_fit()
        parents = torch.from_numpy(_encode_obs(adata.obs, self.setup))
        out: dict[str, list] = {}
        for idx, counts in self._batches(adata, batch_size):
            for k, v in self.module.latents(counts, parents[idx]).items():
                out.setdefault(k, []).append(v.numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    def write_latents(self, adata, batch_size: int = 1024, copy: bool = False):
        """Write ``.obsm["X_fcr_<block>"]``; returns None, or the annotated copy with ``copy=True``."""
        if copy:
            adata = _copy(adata)
        else:
            _check_writable(adata, "write_latents")
        for k, v in self.get_latent_representation(adata, batch_size).items():
            adata.obsm[f"{self.prefix}_{k}"] = v.astype(np.float32)
        return adata if copy else None

    def predict_counterfactual(self, adata, perturbation, dose=None, covariates: Mapping | None = None,
                               seed: int = 0, batch_size: int = 1024, mean: bool = False):
        """The counterfactual counts of the given cells under a new treatment (and/or context).

        ``perturbation``: a label (``"A+B"`` for a combination, the control label),
        per-cell labels, or None to keep each cell's own; ``dose``: new dose(s) (default:
        treated cells keep theirs, controls get the largest dose seen at fit; only for a
        model with a dose); ``covariates``: context values to
        set (``{"cell_type": "T"}``). Abduction -> action -> prediction per minibatch;
        ``seed`` fixes the randomized PIT of the counts, drawn per cell from its name and the
        seed (the same cell gets the same counterfactual in any batch or subset). Returns a new AnnData: counts
        in ``X`` and ``layers["counts"]`` (and the NB means in ``layers["mean"]`` with
        ``mean=True``), ``.obs`` with the new treatment and the factual one in
        ``obs["factual_<key>"]``, provenance in ``.uns["medcausal"]``.
        """
        import anndata as ad

        from .. import __version__

        self._require_fit()
        setup, n = self.setup, adata.n_obs
        if n == 0:
            raise DataError("predict_counterfactual() got no cells")
        factual = torch.from_numpy(_encode_obs(adata.obs, setup))
        cf_parents = torch.from_numpy(_encode_obs(adata.obs, setup, perturbation=perturbation, dose=dose,
                                                  covariates=covariates))
        from ..mechanisms.base import RowNoise

        keyed = RowNoise.for_rows(adata.obs_names, int(seed), stream="counts")  # a cell's draws: its name's
        blocks, means = [], []
        for idx, counts in self._batches(adata, batch_size):
            noise = self.module.abduct(counts, factual[idx], generator=RowNoise(keyed.keys[idx]))
            blocks.append(sparse.csr_matrix(self.module.sample(cf_parents[idx], noise=noise).numpy()))
            if mean:
                means.append(self.module.expected(cf_parents[idx], noise).numpy())
        X = sparse.vstack(blocks).tocsr().astype(np.float32)
        obs = adata.obs.copy()
        pkey = setup["perturbation_key"]
        obs[f"factual_{pkey}"] = obs[pkey].astype(str).to_numpy()
        if perturbation is not None:  # written canonically ("P1 + P0" -> "P0+P1"), as grouping by label needs
            ctrl, sep = setup["control"], setup.get("sep", "+")
            obs[pkey] = [sep.join(parse_perturbation(v, ctrl, sep)) or str(ctrl)
                         for v in _per_cell(perturbation, adata.obs, "perturbation")]
        if setup.get("dose_key"):
            dkey = setup["dose_key"]
            obs[f"factual_{dkey}"] = obs[dkey].to_numpy()
            obs[dkey] = _treatment(adata.obs, setup, perturbation, dose)[1]  # in the data's units
        for key, val in (covariates or {}).items():
            obs[f"factual_{key}"] = obs[key].astype(str).to_numpy()
            obs[key] = np.asarray(_per_cell(val, adata.obs, key), dtype=object).astype(str)
        out = ad.AnnData(X=X, obs=obs, var=adata.var.copy())
        out.layers["counts"] = X.copy()
        if mean:
            out.layers["mean"] = np.concatenate(means).astype(np.float32)
        do = {} if perturbation is None else {
            pkey: perturbation if np.ndim(perturbation) == 0 else f"<{n} per-cell values>"}
        if dose is not None:
            do["dose"] = dose if np.ndim(dose) == 0 else f"<{n} per-cell values>"
        for key, val in (covariates or {}).items():
            do[key] = val if np.ndim(val) == 0 else f"<{n} per-cell values>"
        out.uns["medcausal"] = {"kind": "counterfactual", "model": self.mechanism_name,
                                "abduction": self.module.abduction, "do": json.dumps(do, default=str),
                                "seed": int(seed), "n_obs": int(n), "medcausal_version": __version__}
        return out

    # -- persistence --------------------------------------------------------------------
    def spec(self) -> dict:
        self._require_fit()
        return {"format": FORMAT, "format_version": 1, "mechanism": self.mechanism_name,
                "hparams": self.hparams, "setup": self.setup, "var_names": self.var_names,
                "fit": self.fit_info}

    def save(self, path: str | Path) -> Path:
        """Weights + JSON spec, written atomically; read back with :meth:`FCRModel.load`."""
        return save_model_file(path, self.spec(), self.module.state_dict())

    @classmethod
    def load(cls, path: str | Path) -> "FCRModel":
        """Load a saved model; opening it never runs code (``weights_only=True``)."""
        spec, state = load_model_file(path, FORMAT, 1, what="medcausal single-cell model")
        model = cls(spec["mechanism"], **spec["hparams"])
        model.setup, model.var_names, model.fit_info = spec["setup"], spec["var_names"], spec["fit"]
        model._build(model.setup, len(model.var_names))
        try:
            model.module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelFileError(f"{str(path)!r} is a damaged model file: {e}") from None
        model.module.eval()
        return model

    def __repr__(self) -> str:
        state = "fitted" if self.module is not None else "not fitted"
        return f"FCRModel(mechanism={self.mechanism_name!r}; {state})"


def fit_fcr(adata, mechanism: str = "fcr", hparams: Mapping | None = None, **fit_kwargs) -> FCRModel:
    """Shortcut: ``FCRModel(mechanism, **hparams).fit(adata, **fit_kwargs)``."""
    return FCRModel(mechanism, **dict(hparams or {})).fit(adata, **fit_kwargs)


# --------------------------------------------------------------------------- Cohort <-> AnnData
def cohort_to_anndata(cohort: Cohort, expression: str = "expression", layer: str = "counts",
                      var_names: Sequence[str] | None = None):
    """A Cohort with an expression array -> AnnData (counts in ``X`` and ``layers[layer]``).

    The table becomes ``.obs`` (``obs_names`` are the ids as strings; the id column
    is kept), other arrays go to ``.obsm``.

    >>> c = Cohort(pd.DataFrame({"drug": ["ctrl", "A"]}), {"expression": np.eye(2) * 3})
    >>> a = cohort_to_anndata(c)
    >>> a.obs_names.tolist(), a.layers["counts"].toarray().tolist()
    (['0', '1'], [[3.0, 0.0], [0.0, 3.0]])
    """
    import anndata as ad

    if not isinstance(cohort, Cohort):
        raise DataError(f"cohort_to_anndata takes a medcausal Cohort, got {type(cohort).__name__}")
    if expression not in cohort.arrays:
        raise _missing_key(expression, list(cohort.arrays), "Cohort array")
    counts = np.asarray(cohort.arrays[expression])
    if counts.ndim != 2:
        raise DataError(f"Cohort array {expression!r} must be [cells, genes], got shape {counts.shape}")
    obs = cohort.table.copy()
    obs.index = pd.Index(obs[cohort.id_column].astype(str).to_numpy())
    if obs.index.has_duplicates:
        raise DataError(f"Cohort ids (column {cohort.id_column!r}) are not unique")
    names = list(var_names) if var_names is not None else [f"g{j}" for j in range(counts.shape[1])]
    if len(names) != counts.shape[1]:
        raise DataError(f"var_names has {len(names)} names for {counts.shape[1]} genes")
    X = sparse.csr_matrix(counts.astype(np.float32))
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(names)))
    adata.layers[layer] = X.copy()
    for name, arr in cohort.arrays.items():
        if name != expression:
            adata.obsm[name] = np.asarray(arr)
    adata.uns["medcausal_cohort"] = {"id_column": cohort.id_column, "expression": expression}
    return adata


def anndata_to_cohort(adata, expression: str = "expression", layer: str | None = "counts",
                      obs_keys: Sequence[str] | None = None, obsm_keys: Sequence[str] = ()) -> Cohort:
    """AnnData -> Cohort: ``.obs`` columns as the table, counts as a dense array ``expression``.

    Ids come from the id column of an AnnData made by :func:`cohort_to_anndata` (also when
    ``obs_keys`` leaves it out), else from ``obs_names``, in the column ``"id"`` (``"obs_names"``
    when ``.obs`` has its own ``"id"`` column, e.g. donor ids, which stays data). Categorical
    columns become plain object columns.

    >>> import anndata as ad
    >>> a = ad.AnnData(np.array([[1.0, 0.0]], dtype=np.float32), obs=pd.DataFrame({"d": ["A"]}, index=["c1"]))
    >>> c = anndata_to_cohort(a, layer=None)
    >>> c.table.to_dict("list"), c.arrays["expression"].tolist()
    ({'id': ['c1'], 'd': ['A']}, [[1.0, 0.0]])
    """
    _require_anndata(adata)
    meta = dict(adata.uns.get("medcausal_cohort", {}))
    id_column = str(meta.get("id_column", "id"))
    if not meta and id_column in adata.obs.columns:  # someone else's "id" column: the barcodes go beside it
        id_column = "obs_names"
    keys = list(adata.obs.columns) if obs_keys is None else list(obs_keys)
    for k in keys:
        if k not in adata.obs.columns:
            raise _missing_key(k, list(adata.obs.columns), "obs column")
    table = adata.obs[keys].copy()
    for k in keys:
        if isinstance(table[k].dtype, pd.CategoricalDtype):
            table[k] = table[k].astype(object)
    if id_column not in table.columns:  # the ids cohort_to_anndata kept, else obs_names
        if meta and id_column in adata.obs.columns:
            ids = adata.obs[id_column]
            ids = (ids.astype(object) if isinstance(ids.dtype, pd.CategoricalDtype) else ids).to_numpy()
        else:
            ids = np.asarray(adata.obs_names, dtype=object)
        table.insert(0, id_column, ids)
    mat = _matrix(adata, layer)
    counts = np.empty(adata.shape, dtype=np.float32)
    for start in range(0, adata.n_obs, _CHUNK):  # row blocks: backed X is read from disk a block at a time
        block = mat[start:start + _CHUNK]
        counts[start:start + _CHUNK] = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
    arrays = {expression: counts}
    for k in obsm_keys:
        if k not in adata.obsm:
            raise _missing_key(k, list(adata.obsm), "obsm key")
        arrays[k] = np.asarray(adata.obsm[k])
    return Cohort(table.reset_index(drop=True), arrays, id_column=id_column)


def write_h5ad(adata, path: str | Path) -> Path:
    """Write ``.h5ad`` atomically (a reader never sees a half-written file)."""
    _require_anndata(adata)
    path = Path(path)
    if adata.isbacked:  # anndata would re-point the object at the temporary file, renamed away after
        raise DataError(f"{str(path)!r}: this AnnData is backed by {str(adata.filename)!r}; write "
                        "adata.to_memory() instead, or copy the backing file")
    with atomic_write(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def read_h5ad(path: str | Path, backed: bool = False):
    """Read an ``.h5ad`` file, optionally backed (``X`` stays on disk; use ``layer=None``
    in :func:`setup_anndata` to stream it)."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise DataError(f"h5ad file {str(path)!r} does not exist")
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as e:
        raise DataError(f"cannot read h5ad file {str(path)!r}: {type(e).__name__}: {e}") from None
