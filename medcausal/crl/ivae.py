"""The identifiable VAE (iVAE) and the plain VAE it is compared against.

Khemakhem, Kingma, Monti & Hyvärinen, "Variational Autoencoders and Nonlinear
ICA: A Unifying Framework" (AISTATS 2020). Data ``x`` are generated from
latent sources ``z`` that are *conditionally independent given an observed
auxiliary variable* ``u`` (a segment, environment, time window, label):

* prior   ``p(z | u) = prod_i N(z_i; mu_i(u), sigma_i^2(u))`` (default ``prior_mean=False``:
  ``mu = 0``, only the variances are modulated by ``u``, as in the paper's experiments),
* decoder ``p(x | z) = N(x; f(z), sigma_x^2 I)`` with an MLP ``f`` (``sigma_x^2`` fixed,
  ``decoder_var=1e-3`` in standardized units by default, or learned per feature),
* encoder ``q(z | x) = N(z; m(x), S(x))`` with a full covariance ``S = L L^T`` (Cholesky
  factor from the encoder; ``posterior="diagonal"`` for the mean-field one;
  ``encoder_u=True`` for the paper's ``q(z | x, u)``).

Under the paper's conditions (enough distinct values of ``u``, injective
``f``) the sources are identified up to permutation and elementwise
transformation, which a plain VAE (``p(z) = N(0, I)``) does not achieve.
:class:`VAE` is that baseline, sharing every line of code with :class:`IVAE`
(``IVAE(conditional_prior=False)``).

Training maximizes the ELBO ``E_q[log p(x|z)] - KL(q(z|x) || p(z|u))`` (one
reparameterized sample, analytic Gaussian KL) with the shared loop
:func:`medcausal.train.train`, then takes an exact step on the same ELBO
along the one direction SGD is slow on: an invertible linear map of the code,
under which reconstruction is invariant (see :meth:`IVAE.fit`). Choices made
beyond the paper, each for a measured reason:

* the full-covariance posterior: a mean-field posterior biases the ELBO
  towards decoders with orthogonal Jacobian columns (in the linear-Gaussian
  case its gap is ``0.5 log(det diag(A'A) / det A'A)`` for a mixing ``A``),
  which competes with the identifying prior term;
* the encoder ignores ``u`` by default (any ``q`` bounds the same model);
* the linear refinement (``refine_steps``, ``rounds`` in :meth:`IVAE.fit`).

Both take numpy arrays (``fit(x, u)``) or an :class:`anndata.AnnData`
(``fit(adata, aux_key="batch", layer=None)``: ``u`` is an ``.obs`` column).
The data matrix is standardized per column inside the model (an invertible
affine map that leaves identifiability unchanged); :meth:`IVAE.decode` returns
the original units.

>>> import numpy as np
>>> from medcausal.crl import IVAE
>>> x, u, z = nonlinear_ica_data(n_segments=4, n_per_segment=100, n_sources=2, seed=0)
>>> model = IVAE(latent_dim=2, hidden=(16,)).fit(x, u, max_epochs=2, verbose=False)
>>> model.encode(x, u).shape, model.decode(model.encode(x, u)).shape
((400, 2), (400, 2))

:func:`nonlinear_ica_data` regenerates the paper's synthetic data:
segment-wise conditionally independent sources mixed by a random invertible
leaky-ReLU MLP.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import DataError, MedCausalError, ModelFileError, NotFittedError, warn
from ..io import load_model_file, save_model_file
from ..train import TrainConfig, forked_rng, train_rounds

__all__ = ["IVAE", "VAE", "nonlinear_ica_data"]

FORMAT = "medcausal-crl"
FORMAT_VERSION = 1
_LOG2PI = math.log(2.0 * math.pi)
_EVAL_SEED = 20200826


# --------------------------------------------------------------------------- #
# input checking
# --------------------------------------------------------------------------- #


def _real(value: Any) -> bool:
    """Whether ``value`` is a real number (a bool, a string or None is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_anndata(obj: Any) -> bool:
    try:
        import anndata
    except ImportError:  # pragma: no cover - anndata is a dependency of the single-cell side
        return False
    return isinstance(obj, anndata.AnnData)


_AS_FITTED: Any = type("AsFitted", (), {"__repr__": lambda self: "<as at fit>"})()  # layer= default of queries


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """A float ``[n, p]`` array with finite values, or a DataError naming ``name``."""
    if hasattr(x, "to_memory") and not hasattr(x, "toarray"):  # backed AnnData's sparse matrix
        x = x.to_memory()
    if hasattr(x, "toarray") and not isinstance(x, np.ndarray):  # scipy sparse
        x = x.toarray()
    if isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be numeric; could not convert it to floats ({exc})") from None
    if arr.ndim != 2:
        raise DataError(f"{name} must be a 2-D array [n, features]; got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{name} is empty (shape {arr.shape})")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows, cols = np.nonzero(bad)
        kind = "NaN" if np.isnan(arr[rows[0], cols[0]]) else "infinite"
        raise DataError(f"{name} contains {int(bad.sum())} non-finite value(s) (first: {kind} at row "
                        f"{rows[0]}, column {cols[0]}); drop or impute them first")
    return arr


class _AuxCodec:
    """Turns the auxiliary variable ``u`` into model features (one-hot or standardized)."""

    def __init__(self, kind: str, width: int, categories: list | None = None,
                 mean: list | None = None, std: list | None = None):
        self.kind, self.width = kind, width
        self.categories = categories
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = None if std is None else np.asarray(std, dtype=np.float64)

    @staticmethod
    def _raw(u: Any, name: str, n: int) -> np.ndarray | pd.Series:
        if isinstance(u, torch.Tensor):
            u = u.detach().cpu().numpy()
        if isinstance(u, pd.DataFrame) and u.shape[1] == 1:
            u = u.iloc[:, 0]
        if not isinstance(u, (pd.Series, pd.DataFrame)):
            if hasattr(u, "toarray"):
                u = u.toarray()
            u = np.asarray(u)
        if u.ndim not in (1, 2):
            raise DataError(f"{name} must be 1-D (labels or one continuous value per row) or 2-D "
                            f"[n, features]; got shape {u.shape}")
        if len(u) != n:
            raise DataError(f"{name} has {len(u)} rows but x has {n}; rows must be the same samples, aligned")
        return u

    @staticmethod
    def _categorical_like(u) -> bool:
        if isinstance(u, pd.Series):
            return not pd.api.types.is_float_dtype(u.dtype) and not pd.api.types.is_complex_dtype(u.dtype)
        return (u.ndim == 1 or u.shape[1] == 1) and u.dtype.kind in "iubOSU"

    @classmethod
    def fit(cls, u: Any, name: str, n: int, aux_type: str) -> "_AuxCodec":
        if aux_type not in ("auto", "categorical", "continuous"):
            raise DataError(f"aux_type must be 'auto', 'categorical' or 'continuous'; got {aux_type!r}")
        u = cls._raw(u, name, n)
        categorical = cls._categorical_like(u) if aux_type == "auto" else aux_type == "categorical"
        if categorical:
            if np.ndim(u) == 2 and np.shape(u)[1] != 1:
                raise DataError(f"{name} is 2-D with {np.shape(u)[1]} columns; categorical u must be one "
                                "label per row (pass one-hot codes with aux_type='continuous')")
            values = u if isinstance(u, pd.Series) else pd.Series(np.asarray(u).reshape(len(u), -1)[:, 0])
            cls._check_missing(values, name)
            cats = list(pd.unique(values))
            try:
                cats = sorted(cats)
            except TypeError:
                pass
            cats = [c.item() if hasattr(c, "item") else c for c in cats]
            if len(cats) < 2:
                warn(f"{name} has a single category ({cats[0]!r}): the prior p(z|u) cannot vary "
                     "and the iVAE reduces to a plain VAE", UserWarning)
            return cls("categorical", len(cats), categories=cats)
        arr = _as_matrix(np.asarray(u, dtype=object).reshape(len(u), -1) if isinstance(u, pd.Series)
                         else np.asarray(u).reshape(len(u), -1), name)
        mean = arr.mean(axis=0)
        std = arr.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        return cls("continuous", arr.shape[1], mean=mean.tolist(), std=std.tolist())

    @staticmethod
    def _check_missing(values: pd.Series, name: str) -> None:
        missing = values.isna().to_numpy()
        if missing.any():
            raise DataError(f"{name} contains {int(missing.sum())} missing (NaN/None) value(s) (first at row "
                            f"{int(np.nonzero(missing)[0][0])}); drop those rows or fill them first")

    def encode(self, u: Any, name: str, n: int) -> torch.Tensor:
        u = self._raw(u, name, n)
        if self.kind == "categorical":
            if np.ndim(u) == 2 and np.shape(u)[1] != 1:
                raise DataError(f"{name} must be one label per row; got {np.shape(u)[1]} columns")
            values = u if isinstance(u, pd.Series) else pd.Series(np.asarray(u).reshape(len(u), -1)[:, 0])
            self._check_missing(values, name)
            index = {c: i for i, c in enumerate(self.categories)}
            codes = np.empty(n, dtype=np.int64)
            for r, v in enumerate(values.tolist()):
                key = v.item() if hasattr(v, "item") else v
                if key not in index:
                    raise DataError(f"{name} has category {key!r} (row {r}) not seen at fit; known: "
                                    f"{self.categories[:10]}{' ...' if len(self.categories) > 10 else ''} "
                                    "(a model whose encoder does not read u encodes without it: leave u out)")
                codes[r] = index[key]
            return torch.nn.functional.one_hot(torch.from_numpy(codes), self.width).float()
        arr = _as_matrix(np.asarray(u, dtype=object).reshape(len(u), -1) if isinstance(u, pd.Series)
                         else np.asarray(u).reshape(len(u), -1), name)
        if arr.shape[1] != self.width:
            raise DataError(f"{name} has {arr.shape[1]} columns but the model was fitted on {self.width}")
        return torch.from_numpy((arr - self.mean) / self.std).float()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "width": self.width, "categories": self.categories,
                "mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "_AuxCodec":
        return cls(d["kind"], int(d["width"]), d.get("categories"), d.get("mean"), d.get("std"))


# --------------------------------------------------------------------------- #
# network
# --------------------------------------------------------------------------- #


def _mlp(d_in: int, hidden: Sequence[int], d_out: int, slope: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = d_in
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.LeakyReLU(slope)]
        prev = h
    layers.append(nn.Linear(prev, d_out))
    return nn.Sequential(*layers)


class _BatchRowsError(DataError):
    """The moment batches of :func:`group_moments` hold another number of rows than its keys."""


def group_moments(batches, keys: torch.Tensor, k: int, max_groups: int = 4096, seed: int = 0,
                  dtype: torch.dtype = torch.float64):
    """The posterior's first and second moments averaged within each group of rows sharing a prior.

    ``batches`` yields ``(mean [b, k], second [b, k, k])`` for consecutive rows (the
    posterior mean and ``E[z z^T]``), so the rows need not fit in memory; ``keys [n, d]``
    are the rows' prior inputs: rows with equal keys share a group, and with ``d = 0``
    all rows are one group. With more than ``max_groups`` distinct keys (continuous ones),
    a fixed random ``max_groups`` of the rows (``seed``) are used, each its own group.
    Returns ``(groups [G, d], m1 [G, k], m2 [G, k, k], count [G])``: with ``weight = count /
    count.sum()``, the inputs of :func:`fit_linear_map`.

    >>> keys = torch.tensor([[0.0], [1.0], [0.0]])
    >>> mean = torch.tensor([[1.0], [5.0], [3.0]])
    >>> groups, m1, m2, count = group_moments([(mean, mean[:, :, None] ** 2)], keys, 1)
    >>> groups.tolist(), m1.tolist(), m2.flatten().tolist(), count.tolist()
    ([[0.0], [1.0]], [[2.0], [5.0]], [5.0, 25.0], [2.0, 1.0])
    """
    keys = keys.detach().cpu()
    n = len(keys)
    if n == 0:  # the callers weight groups by count / count.sum()
        raise MedCausalError("group_moments needs at least one row; got no keys")
    if keys.shape[1]:
        groups, group = torch.unique(keys, dim=0, return_inverse=True)
    else:  # no prior inputs: one group
        groups, group = torch.zeros(1, 0, dtype=keys.dtype), torch.zeros(n, dtype=torch.long)
    if len(groups) > max_groups:  # many distinct (continuous) keys: a fixed random subset of the rows
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_groups].sort().values
        groups, group = keys[pick], torch.full((n,), -1, dtype=torch.long)
        group[pick] = torch.arange(max_groups)
    m1 = torch.zeros(len(groups), k, dtype=dtype)
    m2 = torch.zeros(len(groups), k, k, dtype=dtype)
    start = 0
    for mean, second in batches:
        if start + len(mean) > n:
            raise _BatchRowsError(f"the moment batches hold more than {n} rows, the keys {n}")
        g = group[start:start + len(mean)]
        start += len(mean)
        keep = g >= 0
        m1.index_add_(0, g[keep], mean.detach().to("cpu", dtype)[keep])
        m2.index_add_(0, g[keep], second.detach().to("cpu", dtype)[keep])
    if start != n:
        raise _BatchRowsError(f"the moment batches hold {start} rows, the keys {n}")
    count = torch.bincount(group[group >= 0], minlength=len(groups)).to(dtype)
    used = count.clamp(min=1)
    return groups, m1 / used[:, None], m2 / used[:, None, None], count


def fit_linear_map(m1: torch.Tensor, m2: torch.Tensor, weight: torch.Tensor, prior, params: list,
                   start: torch.Tensor, steps: int, lr: float = 1e-2) -> tuple[torch.Tensor, float, float]:
    """The invertible map ``B`` of a Gaussian code that maximizes ``E_q log p(B z | g) + log |det B|``.

    ``m1 [G, k]`` and ``m2 [G, k, k]`` are the posterior's first and second moments
    averaged over each group ``g`` of rows sharing a prior, ``weight [G]`` the groups'
    shares of the rows, ``prior()`` the groups' prior ``(mean, log-variance) [G, k]``
    (diagonal), optimized with ``B`` through ``params``. A decoder that reads ``B^{-1} z``
    reconstructs exactly as before, so this is the part of the ELBO that depends on ``B``:
    a linear ICA problem by conditional (non-stationary) variances, which SGD on the whole
    model solves only slowly. Full-batch Adam from ``start``; stops once 100 steps gain
    under 1e-4 nats per row. Returns ``B`` (detached) and the objective (nats per row, up to
    a constant) at ``start`` and at ``B``; the prior's parameters are updated in place.
    Used by :class:`IVAE` and the ``fcr`` expression mechanism.

    >>> var = torch.tensor([[4.0, 1.0], [1.0, 2.0], [0.5, 0.5]])  # the sources' variances in 3 groups
    >>> mixed = torch.tensor([[2.0, 1.0], [0.5, 1.0]])             # the code mixes them linearly
    >>> m2 = mixed @ torch.diag_embed(var) @ mixed.T
    >>> logvar = torch.zeros(3, 2, requires_grad=True)
    >>> b, before, after = fit_linear_map(torch.zeros(3, 2), m2, torch.ones(3) / 3,
    ...                                   lambda: (torch.zeros(3, 2), logvar), [logvar], torch.eye(2), 5000)
    >>> u = (b @ mixed).abs()                                      # unmixed: one source per coordinate
    >>> bool((u.min(1).values < 0.01 * u.max(1).values).all()), after < before
    (True, True)
    """
    def objective(b):
        p_mean, p_logvar = prior()
        bm2 = ((b @ m2) * b).sum(-1)  # diag(B M2 B^T), [groups, k]
        sq = bm2 - 2.0 * p_mean * (m1 @ b.T) + p_mean ** 2
        return 0.5 * (weight[:, None] * (p_logvar + sq / p_logvar.exp())).sum() - torch.linalg.slogdet(b)[1]

    b = start.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([b] + list(params), lr=lr)
    first = last = math.inf
    with torch.enable_grad():  # callers may hold no_grad (a mechanism's finalize)
        for step in range(int(steps)):
            obj = objective(b)
            if step == 0:
                first = obj.item()
            if step % 100 == 0:  # converged: under 1e-4 nats per row gained in 100 steps
                if last - obj.item() < 1e-4:
                    break
                last = obj.item()
            opt.zero_grad()
            obj.backward()
            opt.step()
    with torch.no_grad():
        end = objective(b).item()
    return b.detach(), (first if steps else end), end


class _IVAENet(nn.Module):
    """The three networks and the negative ELBO; ``forward(batch) -> [n]`` for :func:`train`.

    The code is ``z = A h`` where ``h ~ N(m(x), L L^T)`` is the encoder's
    Gaussian and ``A`` an invertible buffer (identity until :meth:`refine_linear`);
    the decoder reads ``A^{-1} z``. Reconstruction is therefore invariant to
    ``A`` and only the prior term of the ELBO depends on it.
    """

    def __init__(self, x_dim: int, u_dim: int, latent_dim: int, hidden: Sequence[int],
                 conditional_prior: bool, prior_mean: bool, decoder_var: float | None, slope: float,
                 posterior: str = "full", encoder_u: bool = False):
        super().__init__()
        k = latent_dim
        self.encoder_u = bool(encoder_u and conditional_prior)
        self.latent_dim, self.conditional = k, conditional_prior
        self.prior_mean, self.full = prior_mean, posterior == "full"
        enc_in = x_dim + (u_dim if self.encoder_u else 0)
        n_tril = k * (k - 1) // 2 if self.full else 0
        self.encoder = _mlp(enc_in, hidden, 2 * k + n_tril, slope)
        rows, cols = torch.tril_indices(k, k, offset=-1)
        self.register_buffer("tril_rows", rows, persistent=False)
        self.register_buffer("tril_cols", cols, persistent=False)
        self.register_buffer("latent_map", torch.eye(k))
        self.register_buffer("latent_map_inv", torch.eye(k))
        self.decoder = _mlp(k, tuple(reversed(tuple(hidden))), x_dim, slope)
        if conditional_prior:
            self.prior = _mlp(u_dim, hidden, (2 if prior_mean else 1) * k, slope)
        if decoder_var is None:
            self.log_dec_var = nn.Parameter(torch.full((x_dim,), math.log(0.1)))
        else:
            self.register_buffer("log_dec_var", torch.full((x_dim,), math.log(decoder_var)))

    def posterior(self, x: torch.Tensor, u: torch.Tensor):
        """(mean ``[n, k]``, square root ``R`` of the covariance ``[n, k, k]``, ``log det R R^T`` ``[n]``)."""
        h = self.encoder(torch.cat([x, u], dim=1) if self.encoder_u else x)
        k = self.latent_dim
        mean, logvar = h[:, :k], h[:, k:2 * k]
        root = torch.diag_embed(torch.exp(0.5 * logvar))
        if self.full and k > 1:
            root = root.index_put((torch.arange(len(h), device=h.device)[:, None], self.tril_rows,
                                   self.tril_cols), h[:, 2 * k:])
        a = self.latent_map
        logdet = logvar.sum(1) + 2.0 * torch.linalg.slogdet(a)[1]
        return mean @ a.T, a @ root, logdet

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z @ self.latent_map_inv.T)

    def prior_params(self, u: torch.Tensor, n: int):
        if not self.conditional:
            zero = torch.zeros(n, self.latent_dim, device=u.device)
            return zero, zero
        h = self.prior(u)
        if self.prior_mean:
            return h.chunk(2, dim=1)
        return torch.zeros_like(h), h

    def neg_elbo(self, x: torch.Tensor, u: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        q_mean, root, logdet = self.posterior(x, u)
        if eps is None:
            eps = torch.randn_like(q_mean)
        z = q_mean + (root @ eps.unsqueeze(-1)).squeeze(-1)
        x_mean = self.decode(z)
        log_px = -0.5 * (((x - x_mean) ** 2) / self.log_dec_var.exp() + self.log_dec_var + _LOG2PI).sum(1)
        p_mean, p_logvar = self.prior_params(u, x.shape[0])
        # KL(N(m, R R^T) || N(mu, diag exp(p_logvar))), analytic
        q_var = root.pow(2).sum(-1)
        kl = 0.5 * ((p_logvar + (q_var + (q_mean - p_mean) ** 2) / p_logvar.exp()).sum(1) - logdet
                    - self.latent_dim)
        return kl - log_px

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["x"]
        if self.training:
            return self.neg_elbo(x, batch["u"])
        # evaluation: common random numbers, so validation losses of different epochs compare fairly
        gen = torch.Generator(device=x.device).manual_seed(_EVAL_SEED + x.shape[0])
        eps = torch.randn(x.shape[0], self.latent_dim, generator=gen, device=x.device)
        return self.neg_elbo(x, batch["u"], eps)

    def refine_linear(self, x: torch.Tensor, u: torch.Tensor, steps: int, lr: float = 1e-2,
                      max_groups: int = 4096, seed: int = 0) -> None:
        """Maximize the ELBO over an invertible map ``B`` of the code (and the prior network), exactly.

        Reconstruction does not change under ``z -> B z`` (the decoder reads
        ``B^{-1}``), so the ELBO's dependence on ``B`` is ``E_q log p(Bz | u) +
        log |det B|``, computed in closed form from the posterior moments:
        a linear ICA problem SGD on the full networks solves only slowly.
        """
        with torch.no_grad():
            mean, root, _ = self.posterior(x, u)
            second = mean[:, :, None] * mean[:, None, :] + root @ root.transpose(1, 2)
        keys = u if self.conditional else u[:, :0]
        groups, m1, m2, count = (t.to(mean.device) for t in group_moments(
            [(mean, second)], keys, self.latent_dim, max_groups, seed, dtype=mean.dtype))
        weight = count / count.sum()
        prior = (lambda: self.prior_params(groups, len(groups)))
        b, _, _ = fit_linear_map(m1, m2, weight, prior, list(self.prior.parameters()) if self.conditional else [],
                                 torch.eye(self.latent_dim), steps, lr)
        with torch.no_grad():
            self.latent_map.copy_(b @ self.latent_map)
            self.latent_map_inv.copy_(torch.linalg.inv(self.latent_map))


# --------------------------------------------------------------------------- #
# model files
# --------------------------------------------------------------------------- #
# Local shim with the signature proposed for ``medcausal.io`` (save_model_file /
# load_model_file), shared in spirit with ``CausalModel.save``/``load``: once
# ``medcausal.io`` provides them, these two functions become an import.


# --------------------------------------------------------------------------- #
# public models
# --------------------------------------------------------------------------- #


class IVAE:
    """Identifiable VAE (Khemakhem et al., AISTATS 2020) with a conditionally factorized prior ``p(z|u)``.

    ``latent_dim`` sources; ``hidden`` the widths of the hidden layers of the
    encoder and the prior network (reversed for the decoder), all with
    leaky-ReLU (slope ``slope``). ``prior_mean=False`` (default) modulates
    only the prior's variances with ``u``, as in the paper's experiments;
    ``True`` learns its means too. ``posterior`` is ``"full"`` (Gaussian
    with a full covariance, default) or ``"diagonal"`` (mean field).
    ``encoder_u``: whether the encoder sees ``u`` (``q(z|x,u)``, the paper's
    form) or not (``q(z|x)``, default). Any ``q`` gives a valid bound on the
    same generative model, and for an injective decoder with little
    observation noise the true posterior depends on ``x`` alone; an encoder
    that sees ``u`` can warp the code per segment to match the prior (on
    three 3-source, 10-segment, linearly mixed data sets trained for 60
    epochs, ``q(z|x,u)`` reached Spearman MCC 1.00, 0.68, 0.76 and ``q(z|x)``
    1.00, 1.00, 0.96). ``decoder_var`` is the
    fixed observation-noise variance ``sigma_x^2`` in standardized data units
    (``None`` learns one per feature: with noise-free data it then tends to
    absorb a weak source as noise). ``conditional_prior=False`` is the plain
    VAE: prior ``N(0, I)`` and encoder ``q(z|x)``; ``u`` is then accepted and
    ignored (see :class:`VAE`).

    Example:
        >>> x, u, z = nonlinear_ica_data(n_segments=5, n_per_segment=60, n_sources=2, seed=1)
        >>> m = IVAE(2, hidden=(16,)).fit(x, u, max_epochs=3, seed=0, verbose=False)
        >>> m.encode(x, u).shape
        (300, 2)
        >>> m.fit_info["n_rows"], m.fit_info["aux"]["kind"]
        (300, 'categorical')
    """

    def __init__(self, latent_dim: int, *, hidden: Sequence[int] = (64, 64), prior_mean: bool = False,
                 posterior: str = "full", encoder_u: bool = False, decoder_var: float | None = 1e-3,
                 conditional_prior: bool = True, slope: float = 0.2):
        if not (_real(latent_dim) and math.isfinite(latent_dim)) or int(latent_dim) != latent_dim \
                or int(latent_dim) < 1:
            raise MedCausalError(f"latent_dim must be a positive integer; got {latent_dim!r}")
        if (isinstance(hidden, (str, bytes)) or np.ndim(hidden) != 1
                or not all(isinstance(h, (int, np.integer)) and not isinstance(h, bool) for h in hidden)):
            raise MedCausalError(f"hidden must be a sequence of integer layer widths, e.g. (64, 64); "
                                 f"got {hidden!r}")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise MedCausalError(f"hidden widths must be positive; got {hidden}")
        if posterior not in ("full", "diagonal"):
            raise MedCausalError(f"posterior must be 'full' or 'diagonal'; got {posterior!r}")
        if decoder_var is not None and not (_real(decoder_var) and 0 < decoder_var < math.inf):
            raise MedCausalError(f"decoder_var must be a finite number > 0 or None (learned); got {decoder_var!r}")
        if not (_real(slope) and math.isfinite(slope)):
            raise MedCausalError(f"slope (of the leaky ReLUs) must be a finite number; got {slope!r}")
        for name, flag in (("prior_mean", prior_mean), ("encoder_u", encoder_u),
                           ("conditional_prior", conditional_prior)):
            if not isinstance(flag, (bool, np.bool_)):
                raise MedCausalError(f"{name} must be True or False; got {flag!r}")
        self.latent_dim = int(latent_dim)
        self.hidden = hidden
        self.prior_mean = bool(prior_mean)
        self.posterior = posterior
        self.encoder_u = bool(encoder_u)
        self.decoder_var = None if decoder_var is None else float(decoder_var)
        self.conditional_prior = bool(conditional_prior)
        self.slope = float(slope)
        self.net: _IVAENet | None = None
        self.aux: _AuxCodec | None = None
        self.x_mean: np.ndarray | None = None
        self.x_std: np.ndarray | None = None
        self.anndata_keys: dict | None = None
        self.fit_info: dict = {}
        self.history: list[dict] = []

    # -- configuration -------------------------------------------------------
    def config(self) -> dict:
        """The constructor arguments (JSON-serializable)."""
        return {"latent_dim": self.latent_dim, "hidden": list(self.hidden), "prior_mean": self.prior_mean,
                "posterior": self.posterior, "encoder_u": self.encoder_u, "decoder_var": self.decoder_var,
                "conditional_prior": self.conditional_prior, "slope": self.slope}

    def __repr__(self) -> str:
        kind = "IVAE" if self.conditional_prior else "VAE"
        state = "fitted" if self.net is not None else "not fitted"
        return f"{kind}(latent_dim={self.latent_dim}, hidden={self.hidden}; {state})"

    # -- data ----------------------------------------------------------------
    def _inputs(self, x: Any, u: Any, aux_key: Any, layer: Any, fitting: bool, need_u: bool = True):
        """(x matrix, u raw, u name) from arrays or an AnnData. ``layer=_AS_FITTED``: the fit's
        (``.X`` when the fit was not on AnnData); ``None`` is ``.X``. ``need_u=False``: u is not
        read (queries of a model whose encoder does not see it)."""
        if layer is _AS_FITTED:
            fitted = not fitting and _is_anndata(x) and self.anndata_keys is not None
            layer = self.anndata_keys["layer"] if fitted else None
        if _is_anndata(x):
            adata = x
            if fitting:
                self.anndata_keys = {"aux_key": aux_key, "layer": layer}
            elif aux_key is None and self.anndata_keys is not None:
                aux_key = self.anndata_keys["aux_key"]
            if u is not None:
                raise DataError("give u through aux_key= (an .obs column) when x is an AnnData, not as u=")
            if layer is None:
                mat = adata.X
                where = "adata.X"
            else:
                if layer not in adata.layers:
                    raise DataError(f"layer {layer!r} not in adata.layers (has: {list(adata.layers.keys())})")
                mat, where = adata.layers[layer], f"adata.layers[{layer!r}]"
            if mat is None:
                raise DataError(f"{where} is empty (None)")
            arr = _as_matrix(mat, where)
            if not self.conditional_prior or not need_u:
                return arr, None, "u"
            if aux_key is None:
                raise DataError("an iVAE needs the auxiliary variable: pass aux_key= (the .obs column holding "
                                "the segment / environment / label)")
            keys = [aux_key] if isinstance(aux_key, str) else list(aux_key)
            missing = [k for k in keys if k not in adata.obs.columns]
            if missing:
                raise DataError(f"aux_key {missing[0]!r} is not an .obs column (has: {list(adata.obs.columns)})")
            if len(keys) == 1:
                return arr, adata.obs[keys[0]].reset_index(drop=True), f"obs column {keys[0]!r}"
            return arr, adata.obs[keys].to_numpy(), f"obs columns {keys}"
        if aux_key is not None or layer is not None:
            raise DataError("aux_key= and layer= apply to AnnData input only; for arrays pass u= directly")
        if fitting:  # fitted on arrays: no AnnData keys of an earlier fit to reuse
            self.anndata_keys = None
        arr = _as_matrix(x, "x")
        if not need_u:
            return arr, None, "u"
        if self.conditional_prior and u is None:
            raise DataError("an iVAE needs the auxiliary variable u (segment / environment / label), one row "
                            "per row of x; use VAE or conditional_prior=False for a plain VAE")
        return arr, u, "u"

    def _tensors(self, arr: np.ndarray, u: Any, uname: str, need_u: bool = True) -> dict[str, torch.Tensor]:
        if arr.shape[1] != len(self.x_mean):
            raise DataError(f"x has {arr.shape[1]} columns but the model was fitted on {len(self.x_mean)}")
        x = torch.from_numpy((arr - self.x_mean) / self.x_std).float()
        if self.conditional_prior and need_u:
            ut = self.aux.encode(u, uname, arr.shape[0])
        else:
            ut = torch.zeros(arr.shape[0], 0)
        return {"x": x, "u": ut}

    # -- training ------------------------------------------------------------
    def fit(self, x: Any, u: Any = None, *, aux_key: str | Sequence[str] | None = None, layer: str | None = None,
            aux_type: str = "auto", seed: int = 0, max_epochs: int = 200, max_steps: int | None = None,
            batch_size: int = 256, lr: float = 3e-3, val_fraction: float = 0.1, patience: int = 20,
            rounds: int = 1, refine_steps: int = 1000, verbose: bool | None = None,
            device: str = "cpu") -> "IVAE":
        """Fit by maximizing the ELBO with :func:`medcausal.train.train`; returns ``self``.

        ``x``: array ``[n, p]`` or an AnnData (then ``layer`` picks the matrix,
        default ``.X``, and ``aux_key`` the ``.obs`` column(s) holding ``u``).
        ``u``: one label per row (ints, strings, booleans, categorical: one-hot
        encoded) or numeric ``[n, q]`` (standardized); ``aux_type`` overrides
        the automatic choice (a 1-D float array counts as continuous).
        Training stops early when the validation loss (negative ELBO) has not
        improved for ``patience`` epochs; the best weights are kept.
        Then ``refine_steps`` full-batch Adam steps maximize the ELBO over an
        invertible linear map of the code and the prior network, with the
        encoder and decoder fixed (reconstruction is invariant to that map,
        so the step is exact and cheap; SGD on the whole model moves along
        this direction only slowly and stops with linearly mixed sources).
        It is kept only if the ELBO on all rows improves; ``fit_info["refine"]``
        has both values. ``refine_steps=0`` skips it. ``rounds > 1`` splits
        ``max_epochs`` (and ``max_steps``) into that many training runs, each followed by the
        refinement (training after a refinement starts from aligned sources).

        Example:
            >>> x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=50, n_sources=2, seed=0)
            >>> IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, verbose=False).fit_info["epochs"]
            1
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise MedCausalError(f"seed must be a non-negative integer; got {seed!r}")
        seed = int(seed)
        config = TrainConfig(max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                             val_fraction=val_fraction, patience=patience, seed=seed, verbose=verbose,
                             device=device)
        if int(rounds) < 1 or int(rounds) > max_epochs:
            raise MedCausalError(f"rounds must be between 1 and max_epochs ({max_epochs}); got {rounds}")
        if int(refine_steps) < 0:
            raise MedCausalError(f"refine_steps must be >= 0; got {refine_steps}")
        # A fit that fails (bad data, an error in training) leaves the model as it was.
        before = {k: getattr(self, k) for k in ("net", "aux", "x_mean", "x_std", "anndata_keys",
                                                "fit_info", "history")}
        with forked_rng(device, seed=seed):  # the caller's random state is left as it was
            try:
                arr, u_raw, uname = self._inputs(x, u, aux_key, layer, fitting=True)
                if arr.shape[0] < 2:
                    raise DataError(f"fit() needs at least 2 rows; got {arr.shape[0]}")
                if self.conditional_prior:
                    self.aux = _AuxCodec.fit(u_raw, uname, arr.shape[0], aux_type)
                else:
                    self.aux = _AuxCodec("none", 0)
                self.x_mean = arr.mean(axis=0)
                sd = arr.std(axis=0)
                self.x_std = np.where(sd > 0, sd, 1.0)
                tensors = self._tensors(arr, u_raw, uname)
                self.net = _IVAENet(arr.shape[1], self.aux.width, self.latent_dim, self.hidden, self.conditional_prior,
                                    self.prior_mean, self.decoder_var, self.slope, self.posterior, self.encoder_u)
                refines: list[dict] = []

                def refine(_round):
                    self.net.cpu().eval()
                    if int(refine_steps) > 0:
                        refines.append(self._refine(tensors, int(refine_steps), seed))

                result, runs = train_rounds(self.net, tensors, config, int(rounds), after_round=refine)
                self.net.cpu().eval()
                self.history = result.history
                self.fit_info = {"seed": seed, "n_rows": int(arr.shape[0]), "x_dim": int(arr.shape[1]),
                                 "aux": {"kind": self.aux.kind, "width": self.aux.width, "name": uname},
                                 "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                                 "epochs": len(result.history), "steps": result.steps, "rounds": runs,
                                 "seconds": round(result.seconds, 3), "stopped_early": result.stopped_early,
                                 "rolled_back": result.rolled_back, "skipped_batches": result.skipped_batches,
                                 "refine": refines,
                                 "config": {k: v for k, v in vars(config).items() if k != "verbose"}}
            except BaseException:
                for k, v in before.items():
                    setattr(self, k, v)
                raise
        return self

    def _refine(self, tensors: dict[str, torch.Tensor], steps: int, seed: int) -> dict:
        tensors = {k: v.cpu() for k, v in tensors.items()}
        before = self._neg_elbo_mean(tensors)
        saved = copy.deepcopy(self.net.state_dict())
        self.net.refine_linear(tensors["x"], tensors["u"], steps, seed=seed)
        after = self._neg_elbo_mean(tensors)
        kept = after <= before
        if not kept:
            self.net.load_state_dict(saved)
        return {"steps": steps, "neg_elbo_before": before, "neg_elbo_after": after, "kept": bool(kept)}

    def _neg_elbo_mean(self, tensors: dict[str, torch.Tensor], chunk: int = 4096) -> float:
        """Mean negative ELBO over all rows, with the evaluation's common random numbers."""
        self.net.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(tensors["x"]), chunk):
                total += self.net({k: v[start:start + chunk] for k, v in tensors.items()}).sum().item()
        return total / len(tensors["x"])

    def _require_fit(self) -> None:
        if self.net is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted; call fit() (or load()) first")

    # -- queries -------------------------------------------------------------
    def encode(self, x: Any, u: Any = None, *, aux_key: Any = None, layer: Any = _AS_FITTED) -> np.ndarray:
        """Posterior mean ``E_q[z | x, u]`` as a numpy array ``[n, latent_dim]``.

        ``u`` is needed only when the encoder sees it (``encoder_u=True``); otherwise it may be
        left out, and cells of environments never seen at fit encode too (a ``u`` given is
        checked as at fit). ``layer``: by default the one the model was fitted on
        (AnnData input); ``None`` is ``.X``.

        Example:
            >>> x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=20, n_sources=2, seed=0)
            >>> IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, verbose=False).encode(x[:5], u[:5]).shape
            (5, 2)
        """
        self._require_fit()
        # u is read when the encoder needs it or it is given (then checked as at fit)
        need_u = self.net.encoder_u or u is not None or aux_key is not None
        arr, u_raw, uname = self._inputs(x, u, aux_key, layer, fitting=False, need_u=need_u)
        t = self._tensors(arr, u_raw, uname, need_u=need_u)
        with torch.no_grad():
            mean = self.net.posterior(t["x"], t["u"])[0]
        return mean.numpy().astype(np.float64)

    def decode(self, z: Any) -> np.ndarray:
        """Decoder mean ``f(z)`` in the original units of ``x``, ``[n, p]``.

        Example:
            >>> x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=20, n_sources=2, seed=0)
            >>> IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, verbose=False).decode(np.zeros((4, 2))).shape
            (4, 2)
        """
        self._require_fit()
        zz = _as_matrix(z, "z")
        if zz.shape[1] != self.latent_dim:
            raise DataError(f"z has {zz.shape[1]} columns but latent_dim is {self.latent_dim}")
        with torch.no_grad():
            out = self.net.decode(torch.from_numpy(zz).float()).numpy().astype(np.float64)
        return out * self.x_std + self.x_mean

    def elbo(self, x: Any, u: Any = None, *, aux_key: Any = None, layer: Any = _AS_FITTED,
             n_samples: int = 1, seed: int = 0) -> np.ndarray:
        """Per-row ELBO (nats, in standardized data units), averaged over ``n_samples`` draws of ``q``.

        Example:
            >>> x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=20, n_sources=2, seed=0)
            >>> IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, verbose=False).elbo(x, u).shape
            (60,)
        """
        self._require_fit()
        if int(n_samples) < 1:
            raise MedCausalError(f"n_samples must be >= 1; got {n_samples}")
        arr, u_raw, uname = self._inputs(x, u, aux_key, layer, fitting=False)
        t = self._tensors(arr, u_raw, uname)
        gen = torch.Generator().manual_seed(int(seed))
        total = torch.zeros(arr.shape[0])
        with torch.no_grad():
            for _ in range(int(n_samples)):
                eps = torch.randn(arr.shape[0], self.latent_dim, generator=gen)
                total -= self.net.neg_elbo(t["x"], t["u"], eps)
        return (total / int(n_samples)).numpy().astype(np.float64)

    # -- persistence ---------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write weights and a JSON spec atomically (readable with ``torch.load(weights_only=True)``).

        Example:
            >>> import tempfile, os
            >>> x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=20, n_sources=2, seed=0)
            >>> m = IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, verbose=False)
            >>> p = m.save(os.path.join(tempfile.mkdtemp(), "ivae.pt"))
            >>> np.allclose(IVAE.load(p).encode(x, u), m.encode(x, u))
            True
        """
        self._require_fit()
        spec = {"format": FORMAT, "format_version": FORMAT_VERSION, "class": type(self).__name__,
                "config": self.config(), "aux": self.aux.to_dict(), "x_mean": self.x_mean.tolist(),
                "x_std": self.x_std.tolist(), "anndata_keys": self.anndata_keys,
                "fit": json.loads(json.dumps(self.fit_info, default=str))}
        return save_model_file(path, spec, self.net.state_dict())

    @classmethod
    def load(cls, path: str | Path) -> "IVAE":
        """Load a file written by :meth:`save`; never runs code (``torch.load(weights_only=True)``)."""
        path = Path(path)
        spec, state = load_model_file(path, FORMAT, FORMAT_VERSION, what="medcausal representation model")
        try:
            target = VAE if spec.get("class") == "VAE" else IVAE
            if cls is not IVAE and target is not cls:
                raise ModelFileError(f"{str(path)!r} holds a {spec.get('class')}, not a {cls.__name__}")
            cfg = dict(spec["config"])
            model = target(**cfg) if target is IVAE else target(**{k: v for k, v in cfg.items()
                                                                    if k != "conditional_prior"})
            model.aux = _AuxCodec.from_dict(spec["aux"])
            model.x_mean = np.asarray(spec["x_mean"], dtype=np.float64)
            model.x_std = np.asarray(spec["x_std"], dtype=np.float64)
            model.anndata_keys = spec.get("anndata_keys")
            model.fit_info = spec.get("fit", {})
            model.net = _IVAENet(len(model.x_mean), model.aux.width, model.latent_dim, model.hidden,
                                 model.conditional_prior, model.prior_mean, model.decoder_var, model.slope,
                                 model.posterior, model.encoder_u)
            model.net.load_state_dict(state, strict=True)
            model.net.eval()
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"{str(path)!r} is a damaged medcausal file: {type(e).__name__}: {e}") from None
        return model


class VAE(IVAE):
    """Plain VAE baseline: prior ``N(0, I)``, encoder ``q(z | x)``; same code as :class:`IVAE`.

    ``u`` (and ``aux_key``) are accepted and ignored, so the two models can be
    swapped in a benchmark.

    Example:
        >>> x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=50, n_sources=2, seed=0)
        >>> VAE(2, hidden=(8,)).fit(x, max_epochs=1, verbose=False).encode(x).shape
        (150, 2)
    """

    def __init__(self, latent_dim: int, *, hidden: Sequence[int] = (64, 64), posterior: str = "full",
                 decoder_var: float | None = 1e-3, slope: float = 0.2, prior_mean: bool = False,
                 encoder_u: bool = False):
        super().__init__(latent_dim, hidden=hidden, prior_mean=prior_mean, posterior=posterior,
                         encoder_u=encoder_u, decoder_var=decoder_var, conditional_prior=False, slope=slope)


# --------------------------------------------------------------------------- #
# synthetic nonlinear-ICA data
# --------------------------------------------------------------------------- #


def _well_conditioned(d: int, rng: np.random.Generator, max_cond: float) -> np.ndarray:
    for _ in range(10_000):
        w = rng.uniform(-1.0, 1.0, size=(d, d))
        w /= np.linalg.norm(w, axis=0, keepdims=True)  # unit-norm columns
        if np.linalg.cond(w) <= max_cond:
            return w
    raise MedCausalError(f"no random {d}x{d} matrix with condition number <= {max_cond} found")  # pragma: no cover


def _condition_threshold(d: int, rng: np.random.Generator, quantile: float = 0.25, draws: int = 2000) -> float:
    ws = rng.uniform(-1.0, 1.0, size=(draws, d, d))
    ws /= np.linalg.norm(ws, axis=1, keepdims=True)
    return float(np.quantile(np.linalg.cond(ws), quantile))


def nonlinear_ica_data(n_segments: int = 40, n_per_segment: int = 1000, n_sources: int = 5, *,
                       n_layers: int = 3, source: str = "gaussian", means: bool = False,
                       scale_range: tuple[float, float] = (0.5, 3.0), mean_range: tuple[float, float] = (-5.0, 5.0),
                       slope: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment-wise conditionally independent sources and a random invertible leaky-ReLU MLP mixing.

    The synthetic setting of Khemakhem et al. (2020, Sec. 6), regenerated:
    ``n_segments`` segments (``u``) of ``n_per_segment`` points; in segment
    ``m`` source ``i`` is Gaussian (``source="gaussian"``) or Laplace with
    standard deviation ``lambda_mi ~ U(scale_range)`` (so the variance
    varies between 0.25 and 9 by default) and, if ``means``, mean
    ``mu_mi ~ U(mean_range)`` (else 0: only the variance is modulated, as in
    the paper's experiments). The mixing ``x = f(z)`` has
    ``n_layers`` square linear maps with unit-norm columns, each drawn until
    its condition number is below the 25th percentile of such random matrices
    (well conditioned), with a leaky ReLU (``slope``) between consecutive
    maps, so ``f`` is invertible; ``n_layers=1`` is linear mixing.

    Returns ``(x [n, d], u [n] int segment labels, z [n, d] true sources)``.

    Example:
        >>> x, u, z = nonlinear_ica_data(n_segments=4, n_per_segment=10, n_sources=3, seed=0)
        >>> x.shape, u.shape, z.shape, sorted(set(u.tolist()))
        ((40, 3), (40,), (40, 3), [0, 1, 2, 3])
    """
    if source not in ("gaussian", "laplace"):
        raise MedCausalError(f"source must be 'gaussian' or 'laplace'; got {source!r}")
    for name, v in (("n_segments", n_segments), ("n_per_segment", n_per_segment),
                    ("n_sources", n_sources), ("n_layers", n_layers)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise MedCausalError(f"{name} must be an integer >= 1; got {v!r}")
    lo, hi = scale_range
    if not 0 < lo <= hi < math.inf:
        raise MedCausalError(f"scale_range must be (low, high) with 0 < low <= high; got {scale_range!r}")
    rng = np.random.default_rng(seed)
    scale = rng.uniform(*scale_range, size=(n_segments, n_sources))
    mu = rng.uniform(*mean_range, size=(n_segments, n_sources)) if means else np.zeros((n_segments, n_sources))
    u = np.repeat(np.arange(n_segments), n_per_segment)
    if source == "gaussian":
        eps = rng.standard_normal(size=(len(u), n_sources))
    else:  # Laplace with unit variance: scale 1/sqrt(2)
        eps = rng.laplace(scale=1.0 / math.sqrt(2.0), size=(len(u), n_sources))
    z = mu[u] + scale[u] * eps
    threshold = _condition_threshold(n_sources, rng)
    h = z
    for layer in range(n_layers):
        h = h @ _well_conditioned(n_sources, rng, threshold)
        if layer < n_layers - 1:
            h = np.where(h > 0, h, slope * h)
    return h, u, z
