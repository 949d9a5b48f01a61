r"""``fcr`` and ``latent-shift``: count mechanisms for ``Expression`` variables.

``fcr`` follows Mao et al., *Learning Identifiable Factorized Causal Representations
of Cellular Responses* (NeurIPS 2024), written here from the paper. A cell's counts
``y`` are generated from three latent blocks with conditional priors on the cell's
covariates ``x`` (every parent except the treatment) and treatment ``t``:

* ``z_x ~ p(z_x | x)``, ``z_t ~ p(z_t | t)``, ``z_tx ~ p(z_tx | t, x)``: diagonal
  Gaussians (the conditionally factorized priors of the identifiability theory).
  ``p(z_x | x)`` is an MLP of ``x``. By default (``additive_treatment=True``) the
  treatment enters the natural parameters additively: ``p(z_t | t)`` has mean and
  log-variance ``A t + a``; ``p(z_tx | t, x)`` has a context baseline ``b(x)`` (an MLP)
  plus ``Σ_p t_p W_p h(x)`` with a linear context embedding ``h(x)`` of size
  ``interaction_rank`` (a low-rank treatment × context interaction). This is a choice
  of this implementation, not the paper's: it is what lets a combination never seen
  in training act through the sum of its members' latent effects, and a
  perturbation act in a context where it was never seen; ``additive_treatment=False``
  gives unstructured MLP priors over ``t`` and ``(t, x)``;
* ``y_g ~ NB(l · softmax(f(z_x, z_t, z_tx))_g, θ_g)``: a negative-binomial decoder
  with library size ``l`` and per-gene inverse dispersion ``θ_g``.

Inference is amortized: ``q(z_x | y, x)``, ``q(z_t | y, t)``, ``q(z_tx | y, t, x)`` share
an expression trunk, each with its own head. The objective is the negative ELBO plus

* causal-structure regularization: ``z_x`` predicts the covariates and ``z_t`` the
  treatment (weight ``lambda_cls``), ``z_tx`` predicts the treatment (its own weight
  ``lambda_cls_interaction``, 1 by default, ten times below ``lambda_cls``) —
  cross-entropy for parents named in ``categorical``, squared error otherwise. The
  interaction block depends on the treatment only through the treatment × context
  interaction and need not predict the treatment well; at the full weight the fit
  dedicated a ``z_tx`` coordinate to a noiseless copy of the treatment (99.9% of its
  variance between conditions, posterior variance equal to its prior's) and the block
  mirrored ``z_t`` (``benchmarks/perturbseq.py``: NMI(z_tx, treatment) 0.71, true
  factors 0.18);
* permutation discriminators (weight ``lambda_adv``) for the conditional
  independences of the model, ``z_tx ⊥ z_x | x`` and ``z_tx ⊥ z_t | t``: a
  discriminator tells real triples ``(x, z_x, z_tx)`` from triples whose ``z_tx`` was
  permuted among cells with the same ``x`` (likewise with ``t``); the encoder is
  trained to fool it through a gradient-reversal layer, so the adversarial game runs
  inside the one training loop. Two more discriminators of the same kind enforce
  ``z_x ⊥ t | x`` and ``z_t ⊥ x | t``, also implied by the model's graph (additions
  to the paper's two).

The library size gets its own prior ``log l ~ N(μ_l(pa), σ_l(pa))``.

An exact linear step on the ELBO ends each training run (an addition to the paper, the
one medcausal's iVAE takes): the code is ``z = B h`` for the encoder's Gaussian ``h`` and
the decoder reads ``B⁻¹ z``, so reconstruction does not depend on ``B`` and the rest of the
ELBO is the prior term, a linear ICA problem by conditional variances.
:meth:`FCRMechanism.refine_latent_map` maximizes it over ``B`` and the priors' parameters
from the posterior's moments in each condition (``refine_steps``), which moves
within-condition variation into the block whose conditional prior fits it; SGD on the whole
model moves along this direction only slowly. :meth:`FCRModel.fit
<medcausal.adapters.singlecell.FCRModel.fit>` runs three rounds of training, each ended by
the step; a :class:`~medcausal.CausalModel` fit takes it once, after training.

``latent-shift`` is the CPA-style additive baseline (Lotfollahi et al. 2023): a basal
code ``z_b ~ q(z_b | y)`` with prior ``N(0, I)``, shifted by linear embeddings of the
treatment and covariates, ``z = z_b + E_t t + E_x x``, decoded by the same NB decoder;
an adversary (through gradient reversal) keeps treatment and covariates out of ``z_b``.

Abduction (kind ``"amortized"``) returns, per cell,
``[ε_latent, ε_library, z_1 … z_G]`` (float64, all standard normal under the model):

* ``ε_latent``: the encoder's posterior mean, standardized by the prior of the
  factual parents (``ε = (m − μ_prior(pa)) / σ_prior(pa)``; for ``latent-shift`` the
  basal code itself), so a new treatment moves each block along its own prior:
  ``z' = μ_prior(pa') + σ_prior(pa') ε``;
* ``ε_library``: the standardized log library size of the observed counts;
* ``z_g = Φ⁻¹(u_g)``: the normal score of a randomized probability-integral transform
  of each observed count, ``u_g`` uniform on ``(F(y_g − 1), F(y_g)]`` under the fitted
  NB of that cell (kept as a normal score so that counts far in the tails keep their
  place in float64). Prediction pushes ``u_g`` through the NB quantile function of the
  counterfactual mean, the same monotone coupling the ``PerturbSeq`` simulator uses,
  so the factual world gives back the observed counts exactly
  (``reconstruction_tolerance = 0``).

>>> import torch
>>> from medcausal.graph import Expression
>>> m = FCRMechanism(Expression(30), {"cell_type": 2, "perturbation": 3}, treatment="perturbation")
>>> pa = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]] * 4)
>>> y = m.sample(pa, generator=torch.Generator().manual_seed(0))
>>> torch.equal(m.sample(pa, noise=m.abduct(y, pa)), y)
True
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..crl.ivae import _BatchRowsError, fit_linear_map, group_moments
from ..errors import DataError, MedCausalError
from ..synthetic.perturbseq import nb_normal_score, nb_quantile_normal
from .base import Mechanism, grad_reverse, mlp, rand
from .registry import register

__all__ = ["FCRMechanism", "LatentShiftMechanism", "nb_log_prob"]

_LIB_DEFAULT = math.log(1000.0)


def nb_log_prob(y: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Elementwise negative-binomial log-likelihood (mean ``mean``, inverse dispersion ``theta``).

    >>> from scipy import stats
    >>> lp = nb_log_prob(torch.tensor(3.0), torch.tensor(2.0), torch.tensor(5.0))
    >>> round(lp.item(), 5) == round(float(stats.nbinom.logpmf(3, 5.0, 5.0 / 7.0)), 5)
    True
    """
    log_theta_mu = torch.log(theta + mean + 1e-8)
    return (theta * (torch.log(theta + 1e-8) - log_theta_mu)
            + y * (torch.log(mean + 1e-8) - log_theta_mu)
            + torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1.0))


def _group_permutation(keys: torch.Tensor | None, n: int, device) -> torch.Tensor:
    """A random permutation of ``n`` rows that only swaps rows with equal ``keys`` rows."""
    if keys is None or keys.shape[1] == 0:
        return torch.randperm(n, device=device)
    _, group = torch.unique(keys, dim=0, return_inverse=True)  # equal rows, compared exactly
    noisy = group.to(torch.float64) + torch.rand(n, device=device, dtype=torch.float64)
    order = torch.argsort(noisy)  # grouped, random order within each group
    base = torch.argsort(group, stable=True)  # grouped, original order within each group
    perm = torch.empty(n, dtype=torch.long, device=device)
    perm[base] = order
    return perm


def _gauss_kl(mean_q, var_q, logdet_q, mu_p, logvar_p) -> torch.Tensor:
    """KL(q || N(mu_p, diag e^logvar_p)) for a Gaussian ``q`` with mean ``mean_q``, marginal
    variances ``var_q`` and log-determinant ``logdet_q`` of its covariance; summed over the last axis."""
    return 0.5 * ((logvar_p + (var_q + (mean_q - mu_p) ** 2) / logvar_p.exp() - 1.0).sum(-1) - logdet_q)


class _ParentLoss(nn.Module):
    """Predict some parents' features from a latent block: CE for one-hot parents, MSE otherwise."""

    def __init__(self, n_in: int, blocks: list[tuple[str, slice, bool]], hidden: Sequence[int]):
        super().__init__()
        self.blocks = blocks
        width = sum(s.stop - s.start for _, s, _ in blocks)
        self.net = mlp(n_in, width, tuple(hidden))

    def forward(self, z: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        out = self.net(z)
        loss = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        start = 0
        for _, s, categorical in self.blocks:
            w = s.stop - s.start
            pred, target = out[:, start:start + w], parents[:, s]
            if categorical:
                loss = loss - (target * F.log_softmax(pred, dim=-1)).sum(-1)
            else:
                loss = loss + ((pred - target) ** 2).sum(-1)
            start += w
        return loss


class _CountMechanism(Mechanism):
    """Shared machinery: NB decoder with library size, expression trunk, PIT abduction."""

    abduction = "amortized"
    supports = ("expression",)
    has_log_prob = False
    reconstruction_tolerance = 0.0  # counts come back exactly (see the module docstring)

    def __init__(self, variable, parents, *, treatment: str | Sequence[str] | None = None,
                 categorical: Sequence[str] | None = None, hidden: Sequence[int] = (128,),
                 decoder_hidden: Sequence[int] = (128, 128), beta: float = 1.0, **hparams: Any):
        treat = [treatment] if isinstance(treatment, str) else list(treatment or [])
        super().__init__(variable, parents, treatment=treatment if treatment is None or isinstance(
            treatment, str) else list(treatment), categorical=list(categorical or []),
            hidden=list(hidden), decoder_hidden=list(decoder_hidden), beta=float(beta), **hparams)
        if variable.kind != "expression":
            raise MedCausalError(f"mechanism {self.name!r} models Expression variables, got {variable.kind!r}")
        if not list(hidden):
            raise MedCausalError(f"mechanism {self.name!r}: hidden must list at least one width, got {list(hidden)}")
        unknown = [p for p in treat + list(categorical or []) if p not in self.parent_dims]
        if unknown:
            raise MedCausalError(f"mechanism {self.name!r}: {unknown} named as treatment/categorical "
                                 f"but not a parent; parents: {list(self.parent_dims)}")
        if treatment is None and "perturbation" in self.parent_dims:
            treat = ["perturbation"]  # the default name, when present
        self.treatment_names = treat
        self.covariate_names = [p for p in self.parent_dims if p not in treat]
        self.n_genes = int(variable.n_genes)
        self.categorical = set(categorical or [])

        def index(names):
            return [i for n in names for i in range(self.parent_slice(n).start, self.parent_slice(n).stop)]

        self.register_buffer("_t_idx", torch.tensor(index(treat), dtype=torch.long), persistent=False)
        self.register_buffer("_x_idx", torch.tensor(index(self.covariate_names), dtype=torch.long),
                             persistent=False)
        self.dim_t, self.dim_x = len(self._t_idx), len(self._x_idx)
        self.beta = float(beta)
        self.trunk = mlp(self.n_genes, int(hidden[-1]), tuple(hidden[:-1]))
        self.trunk.append(nn.SiLU())
        self.width = int(hidden[-1])
        self.log_theta = nn.Parameter(torch.full((self.n_genes,), math.log(5.0)))
        self.lib_prior = mlp(self.parent_dim, 2, (32,))
        self.register_buffer("lib_loc", torch.tensor(_LIB_DEFAULT))
        self.register_buffer("lib_scale", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._decoder_hidden = tuple(decoder_hidden)

    # -- checks -----------------------------------------------------------------------
    def _check(self, value, parents, noise=None):
        """Shape checks (and, for ``value``, non-negative integer counts); returns ``(value,
        parents)`` in the weights' dtype (float64 or integer inputs are converted)."""
        if parents.dim() != 2 or parents.shape[1] != self.parent_dim:
            raise DataError(f"{self.name}: parents must be [n, {self.parent_dim}] ({self.parent_dims}), "
                            f"got {tuple(parents.shape)}")
        n, dtype = parents.shape[0], self._dtype()
        if value is not None:
            if value.dim() != 2 or tuple(value.shape) != (n, self.n_genes):
                raise DataError(f"{self.name}: counts must be [{n}, {self.n_genes}] (cells, genes), "
                                f"got {tuple(value.shape)}")
            bad = ~torch.isfinite(value) | (value < 0) | (value != torch.round(value))
            if bad.any():
                raise DataError(f"{self.name}: counts must be non-negative integers; {int(bad.sum())} "
                                "value(s) are not")
            value = value.to(dtype)
        if noise is not None and (noise.dim() != 2 or tuple(noise.shape) != (n, self.n_latent + 1 + self.n_genes)):
            raise DataError(f"{self.name}: noise must be [{n}, {self.n_latent + 1 + self.n_genes}] (latents, "
                            f"library, genes), got {tuple(noise.shape)}")
        return value, parents.to(dtype)

    # -- parts ------------------------------------------------------------------------
    def _split(self, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(covariates x, treatment t) features."""
        return parents[:, self._x_idx], parents[:, self._t_idx]

    def _parent_blocks(self, names) -> list[tuple[str, slice, bool]]:
        return [(n, self.parent_slice(n), n in self.categorical) for n in names]

    def _decoder_last(self) -> nn.Linear:
        return [m for m in self.decoder.modules() if isinstance(m, nn.Linear)][-1]

    def _features(self, value: torch.Tensor) -> torch.Tensor:
        lib = value.sum(-1, keepdim=True).clamp_min(1.0)
        return self.trunk(torch.log1p(value / lib * 1e4))

    def _lib_params(self, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lib_prior(parents)
        loc = self.lib_loc + self.lib_scale * out[:, 0]
        scale = self.lib_scale * torch.exp(out[:, 1].clamp(-5.0, 3.0)) + 1e-3
        return loc, scale

    def initialize(self, value: torch.Tensor) -> None:
        """Data-dependent initialization (as Glow's ActNorm): library prior and gene baseline.

        Called by the first training step when not done before (or explicitly).
        """
        with torch.no_grad():
            log_lib = torch.log(value.sum(-1).clamp_min(1.0))
            self.lib_loc.fill_(log_lib.mean().item())
            self.lib_scale.fill_(max(log_lib.std().item() if len(log_lib) > 1 else 1.0, 0.05))
            prop = (value / value.sum(-1, keepdim=True).clamp_min(1.0)).mean(0)
            self._decoder_last().bias.copy_(torch.log(prop + 1e-6))
            self.initialized.fill_(True)

    def finalize(self, value, parents) -> None:
        if not bool(self.initialized):
            self.initialize(value)

    def _mean(self, z_dec: torch.Tensor, log_lib: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.decoder(z_dec), dim=-1) * log_lib.exp()[:, None]

    # -- subclass hooks -----------------------------------------------------------------
    n_latent: int

    def _posterior(self, value, parents) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _prior(self, parents) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """(mean, log-variance) of the latent prior, ``[n, n_latent]`` each."""
        raise NotImplementedError

    def _decoder_input(self, z, parents) -> torch.Tensor:
        return z

    def _code(self, post: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The code's posterior: (mean, marginal variances, log-determinant of the covariance)."""
        return post["mu"], post["logvar"].exp(), post["logvar"].sum(-1)

    def _draw_code(self, post: dict) -> torch.Tensor:
        """A reparameterized draw of the code from its posterior."""
        return post["mu"] + torch.randn_like(post["mu"]) * (0.5 * post["logvar"]).exp()

    def _regularizers(self, z, post, parents) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def latents(self, value: torch.Tensor, parents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Posterior means of the latent blocks, by name."""
        raise NotImplementedError

    # -- the verbs ------------------------------------------------------------------------
    def loss(self, value, parents):
        value, parents = self._cast(value, parents)
        if self.training and not bool(self.initialized):
            self.initialize(value)
        post = self._posterior(value, parents)
        z = self._draw_code(post)
        log_lib = torch.log(value.sum(-1).clamp_min(1.0))
        mean = self._mean(self._decoder_input(z, parents), log_lib)
        nll = -nb_log_prob(value, mean, self.log_theta.exp()).sum(-1)
        mu_p, logvar_p = self._prior(parents)
        kl = _gauss_kl(*self._code(post), mu_p, logvar_p)
        loc, scale = self._lib_params(parents)
        lib_nll = 0.5 * ((log_lib - loc) / scale) ** 2 + torch.log(scale) + 0.5 * math.log(2 * math.pi)
        return nll + self.beta * kl + lib_nll + self._regularizers(z, post, parents)

    def noise_like(self, n, generator=None):
        kw = {"generator": generator}
        if generator is not None:
            kw["device"] = generator.device
        return torch.randn(n, self.n_latent + 1 + self.n_genes, dtype=torch.float64, **kw)

    def _mean_from_noise(self, parents, noise) -> torch.Tensor:
        eps = noise[:, :self.n_latent].to(parents.dtype)
        mu_p, logvar_p = self._prior(parents)
        z = mu_p + (0.5 * logvar_p).exp() * eps
        loc, scale = self._lib_params(parents)
        log_lib = loc + scale * noise[:, self.n_latent].to(parents.dtype)
        return self._mean(self._decoder_input(z, parents), log_lib)

    def expected(self, parents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The NB mean of each cell given its (abducted or fresh) noise."""
        with torch.no_grad():
            return self._mean_from_noise(parents, noise)

    def sample(self, parents, noise=None, generator=None):
        if noise is None:
            noise = self.noise_like(parents.shape[0], generator).to(parents.device)
        _, pa = self._check(None, parents, noise)
        with torch.no_grad():
            mean = self._mean_from_noise(pa, noise)
        theta = self.log_theta.detach().exp()
        counts = nb_quantile_normal(noise[:, self.n_latent + 1:].double().cpu().numpy(),
                                    mean.double().cpu().numpy(),
                                    np.broadcast_to(theta.double().cpu().numpy(), mean.shape))
        return torch.as_tensor(counts, dtype=parents.dtype if parents.is_floating_point()
                               else torch.float32, device=parents.device)

    def abduct(self, value, parents, generator=None):
        value, parents = self._check(value, parents)
        with torch.no_grad():
            code = self._code(self._posterior(value, parents))[0]
            mu_p, logvar_p = self._prior(parents)
            eps = (code - mu_p) / (0.5 * logvar_p).exp()
            loc, scale = self._lib_params(parents)
            eps_lib = (torch.log(value.sum(-1).clamp_min(1.0)) - loc) / scale
            noise = torch.cat([eps.double(), eps_lib.double()[:, None]], dim=1)
            mean = self._mean_from_noise(parents, noise)  # the path ``sample`` takes
        y = value.detach().double().cpu().numpy()
        theta = np.broadcast_to(self.log_theta.detach().exp().double().cpu().numpy(), y.shape)
        v = rand(y.shape, generator, dtype=torch.float64).cpu().numpy()  # uniform on the count's whole slice
        z = nb_normal_score(y, mean.double().cpu().numpy(), theta, v)
        return torch.cat([noise, torch.as_tensor(z, dtype=torch.float64, device=noise.device)], dim=1)


@register
class FCRMechanism(_CountMechanism):
    """Factorized causal representation (FCR) of single-cell counts; see the module docstring.

    ``treatment`` names the treatment parent(s) (default: ``"perturbation"`` when it
    is a parent; with none, ``z_t`` has a fixed prior); the other parents are
    covariates. ``categorical`` lists one-hot parents (cross-entropy in the
    causal-structure regularizer).

    * ``n_context``, ``n_treatment``, ``n_interaction``: the block sizes.
    * ``additive_treatment`` (default): the priors' natural parameters are additive over
      the treatment features: ``p(z_t | t)`` has mean and log-variance ``A t + a``, and
      ``p(z_tx | t, x)`` adds ``Σ_p t_p W_p h(x)`` to a context baseline, with a linear
      context embedding ``h(x)`` of size ``interaction_rank`` (a low-rank treatment ×
      context interaction). Combinations then act through the sum of their members'
      latent effects, and a perturbation's effect in a context where it was never seen
      follows from the shared embeddings; ``False`` uses unstructured MLP priors over
      ``t`` and ``(t, x)``. ``treatment_main_effect`` (off) adds a per-treatment main
      effect, ``Σ_p t_p (u_p + W_p h(x))``.
    * ``lambda_cls`` (``z_x`` and ``z_t``), ``lambda_cls_interaction`` (``z_tx``) and
      ``lambda_adv`` weigh the regularizers against the negative ELBO, a sum over genes
      (10 / 1 / 10, picked from {1, 10} on development runs of the ``PerturbSeq``
      simulator with 1000 genes).
    * ``refine_steps`` (default 2000, 0 to skip) bounds the Adam steps of the exact linear
      refinement of the code (:meth:`refine_latent_map`).
    * ``posterior``: ``"diagonal"`` (default; one Gaussian per coordinate, as the paper)
      or ``"full"``, a Gaussian with a full covariance across all blocks (a Cholesky factor
      from the encoder, off-diagonal entries starting at zero), which leaves the rotation
      to the conditional priors rather than to the posterior's shape (Rolinek et al.,
      CVPR 2019).
    * ``beta`` weighs the KL term; ``hidden`` lists the widths of the encoder's shared
      expression trunk, ``decoder_hidden`` those of the decoder MLP.

    On the perturb-seq benchmark (``benchmarks/perturbseq.py``, 10,000 training cells)
    the interaction block's MCC stays below 0.8. What each of these settings, and the
    other things tried, did to it is in ``benchmarks/results/perturbseq_interaction_mcc.md``.

    >>> from medcausal.graph import Expression
    >>> m = FCRMechanism(Expression(10), {"cell_type": 3, "perturbation": 4}, n_context=2)
    >>> m.treatment_names, m.covariate_names, m.n_latent
    (['perturbation'], ['cell_type'], 10)
    """

    name = "fcr"

    def __init__(self, variable, parents, n_context: int = 4, n_treatment: int = 4,
                 n_interaction: int = 4, lambda_cls: float = 10.0, lambda_cls_interaction: float = 1.0,
                 lambda_adv: float = 10.0, additive_treatment: bool = True, interaction_rank: int = 2,
                 treatment_main_effect: bool = False, refine_steps: int = 2000, posterior: str = "diagonal",
                 treatment: str | Sequence[str] | None = None, categorical: Sequence[str] | None = None,
                 hidden: Sequence[int] = (128,), decoder_hidden: Sequence[int] = (128, 128),
                 beta: float = 1.0):
        super().__init__(variable, parents, treatment=treatment, categorical=categorical, hidden=hidden,
                         decoder_hidden=decoder_hidden, beta=beta, n_context=int(n_context),
                         n_treatment=int(n_treatment), n_interaction=int(n_interaction),
                         lambda_cls=float(lambda_cls), lambda_cls_interaction=float(lambda_cls_interaction),
                         lambda_adv=float(lambda_adv),
                         additive_treatment=bool(additive_treatment), interaction_rank=int(interaction_rank),
                         treatment_main_effect=bool(treatment_main_effect), refine_steps=int(refine_steps),
                         posterior=str(posterior))
        kx, kt, ktx = int(n_context), int(n_treatment), int(n_interaction)
        if min(kx, kt, ktx) < 1:
            raise MedCausalError("fcr: n_context, n_treatment and n_interaction must be >= 1")
        if int(refine_steps) < 0:
            raise MedCausalError(f"fcr: refine_steps must be >= 0, got {refine_steps}")
        if posterior not in ("diagonal", "full"):
            raise MedCausalError(f"fcr: posterior must be 'diagonal' or 'full', got {posterior!r}")
        self.sizes = (kx, kt, ktx)
        self.n_latent = kx + kt + ktx
        self.refine_steps = int(refine_steps)
        # the code is z = B h for the encoder's Gaussian h; the decoder reads B^-1 z (refine_latent_map)
        self.register_buffer("latent_map", torch.eye(self.n_latent))
        self.register_buffer("latent_map_inv", torch.eye(self.n_latent))
        self.lambda_cls, self.lambda_adv = float(lambda_cls), float(lambda_adv)
        self.lambda_cls_tx = float(lambda_cls_interaction)
        dx, dt, w = self.dim_x, self.dim_t, self.width
        self.enc_x = mlp(w + dx, 2 * kx, (64,))
        self.enc_t = mlp(w + dt, 2 * kt, (64,))
        self.enc_tx = mlp(w + dt + dx, 2 * ktx, (64,))
        # posterior="full": the strictly lower entries of the posterior's Cholesky factor, across
        # blocks; zero at the start, so training starts from the diagonal posterior
        self.enc_cov = nn.Linear(w + dt + dx, self.n_latent * (self.n_latent - 1) // 2) \
            if posterior == "full" else None
        if self.enc_cov is not None:
            nn.init.zeros_(self.enc_cov.weight), nn.init.zeros_(self.enc_cov.bias)
        self.prior_x = mlp(dx, 2 * kx, (32,))
        self.additive = bool(additive_treatment)
        self.rank = int(interaction_rank)
        if self.rank < 1:
            raise MedCausalError("fcr: interaction_rank must be >= 1")
        if self.additive:  # natural parameters additive over the treatment's features
            self.prior_t = nn.Linear(dt, 2 * kt) if dt else mlp(0, 2 * kt)
            self.prior_tx = mlp(dx, 2 * ktx, (32,))  # untreated cells, by context
            self.ctx_embed = nn.Linear(dx, self.rank, bias=False) if dt and dx else None
            self.main_effect = bool(treatment_main_effect) and self.ctx_embed is not None
            width = dt * (self.rank + self.main_effect) if dx else dt
            self.prior_tx_effect = nn.Linear(width, 2 * ktx, bias=False) if dt else None
        else:
            self.prior_t = mlp(dt, 2 * kt, (32,))
            self.prior_tx = mlp(dt + dx, 2 * ktx, (32,))
        self.decoder = mlp(self.n_latent, self.n_genes, self._decoder_hidden)
        cov_blocks = self._parent_blocks(self.covariate_names)
        treat_blocks = self._parent_blocks(self.treatment_names)
        self.cls_x = _ParentLoss(kx, cov_blocks, (32,)) if dx else None
        self.cls_t = _ParentLoss(kt, treat_blocks, (32,)) if dt else None
        self.cls_tx = _ParentLoss(ktx, treat_blocks, (32,)) if dt else None
        self.disc_x = mlp(dx + kx + ktx, 1, (64,))  # z_tx ⊥ z_x | x
        self.disc_t = mlp(dt + kt + ktx, 1, (64,))  # z_tx ⊥ z_t | t
        self.disc_xt = mlp(dx + kx + dt, 1, (64,)) if dt else None  # z_x ⊥ t | x
        self.disc_tx = mlp(dt + kt + dx, 1, (64,)) if dt and dx else None  # z_t ⊥ x | t

    @staticmethod
    def _gauss(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = out.chunk(2, dim=-1)
        return mu, logvar.clamp(-8.0, 6.0)

    def _prior(self, parents):
        x, t = self._split(parents)
        if not self.additive:
            tx = self.prior_tx(torch.cat([t, x], dim=-1))
        else:
            tx = self.prior_tx(x)
            if self.prior_tx_effect is not None:  # Σ_p t_p W_p h(x): low-rank t × x interaction
                if self.ctx_embed is not None:
                    h = self.ctx_embed(x)
                    if self.main_effect:  # Σ_p t_p (u_p + W_p h(x)): main effect + low-rank interaction
                        h = torch.cat([torch.ones_like(h[:, :1]), h], -1)
                    t = (t[:, :, None] * h[:, None, :]).flatten(1)
                tx = tx + self.prior_tx_effect(t)
            t = self._split(parents)[1]
        parts = [self._gauss(self.prior_x(x)), self._gauss(self.prior_t(t)), self._gauss(tx)]
        return torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)

    def _posterior(self, value, parents):
        h = self._features(value)
        x, t = self._split(parents)
        parts = [self._gauss(self.enc_x(torch.cat([h, x], -1))), self._gauss(self.enc_t(torch.cat([h, t], -1))),
                 self._gauss(self.enc_tx(torch.cat([h, t, x], -1)))]
        post = {"mu": torch.cat([p[0] for p in parts], -1), "logvar": torch.cat([p[1] for p in parts], -1)}
        if self.enc_cov is not None:  # L = diag(sd) + strictly lower entries; covariance L L^T
            k = self.n_latent
            rows, cols = torch.tril_indices(k, k, -1, device=h.device)
            factor = torch.diag_embed((0.5 * post["logvar"]).exp())
            factor[:, rows, cols] = self.enc_cov(torch.cat([h, t, x], -1))
            post["factor"] = factor
        return post

    # The diagonal posterior keeps its own (cheaper) arithmetic: the committed benchmark figures
    # were computed with it, and the interaction MCC moves with rounding.
    def _code(self, post):
        b = self.latent_map
        logdet = post["logvar"].sum(-1) + 2.0 * torch.linalg.slogdet(b)[1]  # det L = prod sd
        if "factor" in post:  # covariance B L L^T B^T
            return post["mu"] @ b.T, ((b @ post["factor"]) ** 2).sum(-1), logdet
        return post["mu"] @ b.T, post["logvar"].exp() @ (b * b).T, logdet

    def _draw_code(self, post):
        if "factor" in post:
            eps = torch.randn_like(post["mu"])
            return (post["mu"] + (post["factor"] @ eps[:, :, None])[:, :, 0]) @ self.latent_map.T
        return super()._draw_code(post) @ self.latent_map.T

    @staticmethod
    def _second_moment(post) -> torch.Tensor:
        """``E[h h^T]`` under each cell's posterior, ``[n, k, k]`` (float64)."""
        mu = post["mu"].double()
        cov = (post["factor"].double() @ post["factor"].double().transpose(1, 2) if "factor" in post
               else torch.diag_embed(post["logvar"].exp().double()))
        return mu[:, :, None] * mu[:, None, :] + cov

    def _decoder_input(self, z, parents):
        return z @ self.latent_map_inv.T

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("latent_map", "latent_map_inv"):  # model files from before the refinement: identity
            state_dict.setdefault(prefix + key, torch.eye(self.n_latent, dtype=self.latent_map.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _prior_parameters(self) -> list[nn.Parameter]:
        parts = [self.prior_x, self.prior_t, self.prior_tx] + (
            [self.ctx_embed, self.prior_tx_effect] if self.additive else [])
        return [p for m in parts if m is not None for p in m.parameters()]

    def refine_latent_map(self, counts, parents: torch.Tensor, steps: int | None = None, lr: float = 1e-2,
                          max_groups: int = 4096, seed: int = 0) -> dict:
        """Maximize the ELBO over an invertible linear map of the code and the priors, exactly.

        The decoder reads ``B^-1 z``, so reconstruction does not change under ``z -> B z``:
        the ELBO's dependence on ``B`` is the prior term, computed from the posterior's
        moments in each group of cells that share their parents (one condition), as the iVAE
        does (:func:`medcausal.crl.ivae.fit_linear_map`). It moves within-condition variation
        to the block whose conditional prior fits it (e.g. a spread that depends on treatment
        x context to ``z_tx``), which SGD on the whole model does only slowly.

        ``parents``: ``[n, parent_dim]``, all cells; ``counts``: an iterable of count batches
        ``[b, n_genes]`` for those cells, in order (streamed: the counts need not fit in
        memory). With more than ``max_groups`` distinct parent rows (continuous covariates),
        a random ``max_groups`` of the cells (``seed``) are used, each its own group. Kept only
        if the objective improves. Returns ``{"groups", "cells", "objective_before",
        "objective_after", "kept"}`` (nats per cell, up to a constant). Called after training
        by :meth:`finalize` and :meth:`FCRModel.fit <medcausal.adapters.singlecell.FCRModel.fit>`
        (``refine_steps`` > 0).
        """
        steps = self.refine_steps if steps is None else int(steps)
        seen = [0]

        def moments():
            with torch.no_grad():
                for value in counts:
                    value, pa = self._cast(value, parents[seen[0]:seen[0] + len(value)])
                    seen[0] += len(value)
                    post = self._posterior(value.to(self.latent_map.device), pa.to(self.latent_map.device))
                    yield post["mu"], self._second_moment(post)

        try:
            groups, m1, m2, count = group_moments(moments(), parents, self.n_latent, max_groups, seed)
        except _BatchRowsError:  # other errors (reading the counts) pass as they are
            raise DataError(f"{self.name}: the count batches hold {seen[0]} cells, the parents {len(parents)}") \
                from None
        if steps == 0 or len(parents) == 0:
            return {"groups": len(groups), "cells": int(count.sum()), "kept": False}
        device, dtype = self.latent_map.device, self._dtype()
        groups = groups.to(device, dtype)
        saved = copy.deepcopy(self.state_dict())
        was_training = self.training
        self.eval()

        def prior():
            mean, logvar = self._prior(groups)
            return mean.double(), logvar.double()

        b, before, after = fit_linear_map(m1.to(device), m2.to(device), (count / count.sum()).to(device), prior,
                                          self._prior_parameters(), self.latent_map.double(), steps, lr)
        kept = after < before
        if kept:
            with torch.no_grad():
                self.latent_map.copy_(b.to(dtype))
                self.latent_map_inv.copy_(torch.linalg.inv(b).to(dtype))
        else:
            self.load_state_dict(saved)
        self.train(was_training)
        return {"groups": len(groups), "cells": int(count.sum()), "objective_before": before,
                "objective_after": after, "kept": bool(kept)}

    def finalize(self, value, parents, batch_size: int = 1024) -> None:
        super().finalize(value, parents)
        if self.refine_steps:
            self.refine_latent_map((value[i:i + batch_size] for i in range(0, len(value), batch_size)), parents)

    def _blocks(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kx, kt, _ = self.sizes
        return z[:, :kx], z[:, kx:kx + kt], z[:, kx + kt:]

    def latents(self, value, parents):
        with torch.no_grad():
            zx, zt, ztx = self._blocks(self._code(self._posterior(value, parents))[0])
        return {"context": zx, "treatment": zt, "interaction": ztx}

    def _discriminate(self, disc: nn.Module, cond: torch.Tensor, keep: torch.Tensor,
                      moved: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """BCE of telling ``(cond, keep, moved)`` (real) from ``(cond, keep, moved[perm])``."""
        real = torch.cat([cond, keep, moved], -1)
        fake = torch.cat([cond, keep, moved[perm]], -1)
        logits = disc(torch.cat([real, fake], 0)).squeeze(-1)
        target = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(logits)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return bce[:len(real)] + bce[len(real):]

    def _regularizers(self, z, post, parents):
        n = z.shape[0]
        zx, zt, ztx = self._blocks(z)
        x, t = self._split(parents)
        reg = torch.zeros(n, device=z.device, dtype=z.dtype)
        if self.cls_x is not None:
            reg = reg + self.lambda_cls * self.cls_x(zx, parents)
        if self.cls_t is not None:
            reg = reg + self.lambda_cls * self.cls_t(zt, parents) + self.lambda_cls_tx * self.cls_tx(ztx, parents)
        # the discriminators minimize their loss; the encoder, behind the reversal, maximizes it
        rx, rt, rtx = (grad_reverse(b, self.lambda_adv) for b in (zx, zt, ztx))
        adv = self._discriminate(self.disc_x, x, rx, rtx, _group_permutation(x, n, z.device))
        adv = adv + self._discriminate(self.disc_t, t, rt, rtx, _group_permutation(t, n, z.device))
        if self.disc_xt is not None:
            adv = adv + self._discriminate(self.disc_xt, x, rx, t, _group_permutation(x, n, z.device))
        if self.disc_tx is not None:
            adv = adv + self._discriminate(self.disc_tx, t, rt, x, _group_permutation(t, n, z.device))
        return reg + adv


@register
class LatentShiftMechanism(_CountMechanism):
    """CPA-style additive latent-shift baseline: ``z = z_basal + E_t t + E_x x``.

    ``n_latent`` is the basal code size; ``lambda_adv`` weighs the adversary that
    keeps treatment and covariates out of the basal code.

    >>> from medcausal.graph import Expression
    >>> m = LatentShiftMechanism(Expression(10), {"cell_type": 3, "perturbation": 4}, n_latent=6)
    >>> m.latents(torch.ones(2, 10), torch.zeros(2, 7))["basal"].shape
    torch.Size([2, 6])
    """

    name = "latent-shift"

    def __init__(self, variable, parents, n_latent: int = 12, lambda_adv: float = 1.0,
                 treatment: str | Sequence[str] | None = None, categorical: Sequence[str] | None = None,
                 hidden: Sequence[int] = (128,), decoder_hidden: Sequence[int] = (128, 128),
                 beta: float = 1.0):
        super().__init__(variable, parents, treatment=treatment, categorical=categorical, hidden=hidden,
                         decoder_hidden=decoder_hidden, beta=beta, n_latent=int(n_latent),
                         lambda_adv=float(lambda_adv))
        if int(n_latent) < 1:
            raise MedCausalError("latent-shift: n_latent must be >= 1")
        self.n_latent = int(n_latent)
        self.lambda_adv = float(lambda_adv)
        self.enc = mlp(self.width, 2 * self.n_latent, (64,))
        self.embed_t = nn.Linear(self.dim_t, self.n_latent, bias=False) if self.dim_t else None
        self.embed_x = nn.Linear(self.dim_x, self.n_latent, bias=False) if self.dim_x else None
        self.decoder = mlp(self.n_latent, self.n_genes, self._decoder_hidden)
        blocks = self._parent_blocks(self.treatment_names + self.covariate_names)
        self.adversary = _ParentLoss(self.n_latent, blocks, (64,)) if blocks else None

    def _prior(self, parents):
        zeros = torch.zeros(parents.shape[0], self.n_latent, device=parents.device, dtype=parents.dtype)
        return zeros, zeros

    def _posterior(self, value, parents):
        mu, logvar = self.enc(self._features(value)).chunk(2, dim=-1)
        return {"mu": mu, "logvar": logvar.clamp(-8.0, 6.0)}

    def _decoder_input(self, z, parents):
        x, t = self._split(parents)
        if self.embed_t is not None:
            z = z + self.embed_t(t)
        if self.embed_x is not None:
            z = z + self.embed_x(x)
        return z

    def latents(self, value, parents):
        with torch.no_grad():
            return {"basal": self._posterior(value, parents)["mu"]}

    def _regularizers(self, z, post, parents):
        if self.adversary is None:
            return torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        return self.adversary(grad_reverse(z, self.lambda_adv), parents)
