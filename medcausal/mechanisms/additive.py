"""``additive``: the additive-noise model ``x = f(pa) + u`` with a neural regressor.

The classical ANM baseline (Hoyer et al. 2009; DoWhy gcm's ``AdditiveNoiseModel``).
``f`` is fitted by least squares; the noise distribution is the empirical distribution
of the training residuals (kept as quantiles), smoothed by a Gaussian kernel for
``log_prob``. Abduction is the exact residual ``u = x - f(pa)``, so counterfactuals are
exact when the true mechanism is additive and biased when it is not.

>>> import torch
>>> from medcausal.graph import Continuous
>>> m = AdditiveMechanism(Continuous(), parents=1)
>>> pa, x = torch.randn(4, 1), torch.randn(4, 1)
>>> torch.allclose(m.sample(pa, noise=m.abduct(x, pa)), x, atol=1e-6)
True
"""

from __future__ import annotations

import math

import torch

from .base import Mechanism, check_count, mlp
from .registry import register


@register
class AdditiveMechanism(Mechanism):
    name = "additive"
    abduction = "exact"
    supports = ("continuous",)

    def __init__(self, variable, parents, hidden: tuple[int, ...] | list[int] = (64, 64),
                 n_quantiles: int = 512):
        super().__init__(variable, parents, hidden=list(hidden), n_quantiles=n_quantiles)
        self.dim = variable.dim
        check_count("n_quantiles", n_quantiles)
        self.f = mlp(self.parent_dim, self.dim, tuple(hidden))
        # Before finalize(): standard normal residual quantiles, unit kernel width.
        probs = (torch.arange(n_quantiles) + 0.5) / n_quantiles
        q = torch.distributions.Normal(0.0, 1.0).icdf(probs)
        self.register_buffer("residual_quantiles", q[:, None].repeat(1, self.dim))
        self.register_buffer("bandwidth", torch.ones(self.dim))

    def loss(self, value, parents):
        value, parents = self._cast(value, parents)
        return 0.5 * ((value - self.f(parents)) ** 2).sum(-1)

    def finalize(self, value, parents):
        value, parents = self._cast(value, parents)
        with torch.no_grad():
            r = value - self.f(parents)
            n = self.residual_quantiles.shape[0]
            probs = (torch.arange(n, dtype=r.dtype) + 0.5) / n
            self.residual_quantiles.copy_(torch.quantile(r, probs, dim=0))
            # Silverman's rule for the kernel density used by log_prob.
            std = (r.std(0) if len(r) > 1 else torch.zeros_like(r[0])).clamp_min(1e-6)  # one row: no spread
            self.bandwidth.copy_(1.06 * std * r.shape[0] ** (-1 / 5))

    def log_prob(self, value, parents):
        value, parents = self._cast(value, parents)
        r = value - self.f(parents)                                   # [n, d]
        z = (r[:, None, :] - self.residual_quantiles[None]) / self.bandwidth  # [n, q, d]
        log_k = -0.5 * z**2 - torch.log(self.bandwidth) - 0.5 * math.log(2 * math.pi)
        per_dim = torch.logsumexp(log_k, dim=1) - math.log(self.residual_quantiles.shape[0])
        return per_dim.sum(-1)

    def noise_like(self, n, generator=None):
        q = self.residual_quantiles
        pos = torch.rand((n, self.dim), generator=generator).to(q) * (q.shape[0] - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp_max(q.shape[0] - 1)
        w = pos - lo
        cols = torch.arange(self.dim, device=q.device)
        return q[lo, cols] * (1 - w) + q[hi, cols] * w

    def abduct(self, value, parents, generator=None):
        value, parents = self._cast(value, parents)
        return value - self.f(parents)

    def sample(self, parents, noise=None, generator=None):
        parents, noise = self._cast(parents, noise)
        if noise is None:
            noise = self.noise_like(parents.shape[0], generator).to(parents)
        return self.f(parents) + noise
