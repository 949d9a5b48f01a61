r"""``cvae``: a plain conditional VAE image mechanism, the baseline for ``hvae``.

One global latent vector ``z ~ N(0, I)`` (``z_dim``), a convolutional encoder
``q(z | x, pa)`` and decoder ``p(x | z, pa)``, the parents concatenated to the code at
the bottleneck only (Kingma et al. 2014; Sohn et al. 2015), and the same Gaussian
pixel likelihood with a learned per-pixel scale and the same abduction as ``hvae``:
the posterior mean ``z`` plus the exact pixel noise ``u = (x - mu) / sigma``. What it
lacks is the hierarchy: one small code must carry everything the parents do not.

The noise is one flat tensor per row, ``[z (z_dim), u (C*H*W)]``.

>>> import torch
>>> from medcausal.graph import Image
>>> m = CVAEMechanism(Image((1, 16, 16)), parents=2, channels=[8, 16], z_dim=4)
>>> pa = torch.randn(3, 2)
>>> x = m.sample(pa, generator=torch.Generator().manual_seed(0))
>>> bool((m.sample(pa, noise=m.abduct(x, pa)) - x).abs().max() < m.reconstruction_tolerance)
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MedCausalError
from .base import randn
from .hvae import GaussianHead, PixelNoiseVAE, _bounded_logscale, _conv, _levels, _per_level, _Res
from .registry import register

__all__ = ["CVAEMechanism"]


def _standard_normal_kl(q_loc, q_ls) -> torch.Tensor:
    """KL(N(q_loc, e^q_ls) || N(0, I)) per row."""
    return (0.5 * (torch.exp(2 * q_ls) + q_loc ** 2) - q_ls - 0.5).sum(1)


class _CVAENet(nn.Module):
    def __init__(self, shape, parent_dim: int, channels, blocks, z_dim: int, hidden: int,
                 sigma_min: float, min_res: int = 4, pixel_scale: str = "map"):
        super().__init__()
        self.shape = tuple(shape)
        self.levels = _levels(shape, channels, min_res, False, "cvae")
        if z_dim < 0:
            raise MedCausalError(f"cvae: z_dim (size of the global code) must be >= 0, got {z_dim}")
        L = len(self.levels)
        sizes = [(h, w) for h, w, _ in self.levels]
        chs = [c for _, _, c in self.levels]
        nb = _per_level(blocks, L)
        self.parent_dim, self.z_dim = parent_dim, z_dim
        self.bottom = (chs[-1], *sizes[-1])
        flat = math.prod(self.bottom)
        self.stem = _conv(shape[0], chs[0], sizes[0])
        self.enc = nn.ModuleList(nn.Sequential(*[_Res(chs[k], sizes[k]) for _ in range(nb[k])]) for k in range(L))
        self.down = nn.ModuleList(nn.Conv2d(chs[k], chs[k + 1], 1) for k in range(L - 1))
        self.to_z = nn.Sequential(nn.Linear(flat + parent_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * z_dim))
        self.from_z = nn.Sequential(nn.Linear(z_dim + parent_dim, hidden), nn.SiLU(), nn.Linear(hidden, flat))
        self.dec = nn.ModuleList(nn.Sequential(*[_Res(chs[k], sizes[k]) for _ in range(nb[k])]) for k in range(L))
        self.up = nn.ModuleList(nn.Conv2d(chs[k + 1], chs[k], 1) for k in range(L - 1))
        self.head = GaussianHead(chs[0], shape[0], sigma_min=sigma_min, kernel=1 if min(sizes[0]) == 1 else 3,
                                 scale=pixel_scale, size=sizes[0])
        with torch.no_grad():
            self.to_z[-1].weight.mul_(0.1)
            self.to_z[-1].bias.zero_()

    def forward(self, op: str, *args, **kwargs):
        return getattr(self, op)(*args, **kwargs)

    @property
    def latent_noise_dim(self) -> int:
        return self.z_dim

    def _q(self, x, pa):
        a = self.stem(x)
        for k, block in enumerate(self.enc):
            a = block(a)
            if k + 1 < len(self.enc):
                a = self.down[k](F.avg_pool2d(a, 2))
        loc, raw = self.to_z(torch.cat([a.flatten(1), pa], dim=1)).chunk(2, dim=1)
        return loc, _bounded_logscale(raw)

    def _p(self, z, pa):
        h = self.from_z(torch.cat([z, pa], dim=1)).reshape(-1, *self.bottom)
        for k in range(len(self.levels) - 1, -1, -1):
            if k < len(self.levels) - 1:
                h = F.interpolate(self.up[k](h), size=self.levels[k][:2], mode="nearest")
            h = self.dec[k](h)
        return self.head(h)

    def elbo(self, x, pa):
        q_loc, q_ls = self._q(x, pa)
        z = q_loc + torch.exp(q_ls) * torch.randn_like(q_loc)
        loc, ls = self._p(z, pa)
        return GaussianHead.nll(x, loc, ls), _standard_normal_kl(q_loc, q_ls)

    def kl_levels(self, x, pa):
        return _standard_normal_kl(*self._q(x, pa))[:, None]

    def abduct(self, x, pa, generator=None):
        q_loc, q_ls = self._q(x, pa)
        z = q_loc if generator is None else q_loc + torch.exp(q_ls) * randn(q_loc.shape, generator, like=q_loc)
        loc, ls = self._p(z, pa)
        return z, loc, ls

    def decode(self, pa, lat, **_):
        return self._p(lat, pa)

    def reconstruct(self, x, pa):
        return self._p(self._q(x, pa)[0], pa)[0]

    def latent_noise_like(self, n, generator=None, like=None):
        return randn((n, self.z_dim), generator, like=like)


@register
class CVAEMechanism(PixelNoiseVAE):
    """Conditional VAE image mechanism (see the module docstring).

    Hyperparameters: ``channels`` (width per resolution, full resolution first, down to
    ``min_res``), ``blocks`` (as for ``hvae``), ``z_dim`` (size of the global code),
    ``hidden`` (width of the bottleneck MLPs), ``beta``, ``sigma_min``, ``pixel_scale``,
    ``ema_decay``, ``use_ema``, ``abduct_sample``, ``min_res`` (as for ``hvae``).

    >>> from medcausal.graph import Image
    >>> m = CVAEMechanism(Image((1, 16, 16)), parents=0, channels=[8, 16], z_dim=4)
    >>> m.noise_like(2).shape  # 4 latents + 256 pixels
    torch.Size([2, 260])
    """

    name = "cvae"

    def __init__(self, variable, parents, channels: list[int] | tuple[int, ...] = (8, 16, 32, 64, 64),
                 blocks: int | list[int] | tuple[int, ...] = (0, 1), z_dim: int = 16, hidden: int = 256,
                 beta: float = 1.0, sigma_min: float = 1e-3, ema_decay: float = 0.999, use_ema: bool = True,
                 abduct_sample: bool = False, min_res: int = 4, pixel_scale: str = "map"):
        blocks = blocks if isinstance(blocks, int) else list(blocks)
        super().__init__(variable, parents, channels=list(channels), blocks=blocks, z_dim=z_dim, hidden=hidden,
                         beta=beta, sigma_min=sigma_min, ema_decay=ema_decay, use_ema=use_ema,
                         abduct_sample=abduct_sample, min_res=min_res, pixel_scale=pixel_scale)
        self._check_variable(variable)
        if not beta >= 0:  # also refuses NaN
            raise MedCausalError(f"cvae: beta (KL weight) must be >= 0, got {beta}")
        self.beta, self.abduct_sample = float(beta), bool(abduct_sample)
        self.net = _CVAENet(variable.shape, self.parent_dim, list(channels), blocks, int(z_dim), int(hidden),
                            float(sigma_min), min_res=int(min_res), pixel_scale=pixel_scale)
        self._init_ema(ema_decay, use_ema)

