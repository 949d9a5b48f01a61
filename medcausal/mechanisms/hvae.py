r"""``hvae``: a conditional hierarchical VAE as the mechanism of an image variable.

After Ribeiro, Xia, Monteiro, Pawlowski & Glocker, *High Fidelity Image Counterfactuals
with Probabilistic Causal Models* (ICML 2023). The image ``x`` (float ``[n, C, H, W]``,
intensities roughly in [0, 1]) is generated from its parents ``pa`` by

- a VDVAE-style ladder: a bottom-up encoder, and a top-down decoder with one latent
  ``z_i`` (``z_dim`` channels at that resolution) at each of the ``latent_levels``
  coarsest resolutions (the coarsest is a global 1x1 latent); the parents modulate
  (FiLM) every resolution of the decoder, and so every posterior;
- a Gaussian pixel likelihood with a learned per-pixel scale,
  ``x = mu(z, pa) + sigma * u``, ``u ~ N(0, I)``. By default (``pixel_scale="map"``)
  ``sigma`` is a learned per-pixel map, so a counterfactual keeps the unit's residual
  ``x - mu`` unchanged; ``pixel_scale="decoder"`` makes it a decoder output
  ``sigma(z, pa)`` (the paper's diagonal Gaussian), which rescales the residual under
  interventions (it gave larger true-counterfactual errors on the synthetic brains);
- a pose warp (``pose_warp=True``, the default; an addition to the paper): the decoded mean
  and scale map are moved by a similarity transform. Its rotation and shift are the first
  three channels of the top latent times a learned scale, so each scan's pose is part of the
  unit's exogenous noise and a counterfactual keeps it (with ``latent_mode="mediator"`` it moves
  with the rest of the top latent); a map linear in the parents adds a
  magnification and an offset (head size follows the intracranial volume). The top
  posterior also reads the scan's centre of mass and principal-axis angle, the usual start of
  a rigid registration: from pooled conv features alone the pose stayed unlearned.
  ``pose_warp=False`` is the paper's ladder.

**Abduction** (``amortized``): the posterior latents ``z = E q(z | x, pa)`` (their mean;
``abduct_sample=True`` draws them instead) and the exact pixel noise
``u = (x - mu) / sigma``. **Prediction** decodes the same latents with the intervened
parents and adds the same pixel noise, so ``sample(pa, noise=abduct(x, pa))`` returns
``x`` (up to float rounding) and each counterfactual keeps the unit's own detail.

Two readings of the latents (``latent_mode``), as in the paper:

- ``"exogenous"`` (default): ``z`` has a parent-free hierarchical prior ``p(z)``; it is
  part of the unit's exogenous noise and held fixed under interventions, so a
  counterfactual shows the *direct* effect of the parents on the image.
- ``"mediator"``: ``z`` has a conditional prior ``p(z | pa)``: the latents are mediators
  and a counterfactual shows the *total* effect. ``mediator_abduction`` chooses how the
  counterfactual latents are formed at each level ``i``:

  * ``"mixture"`` (the paper's): ``z*_i = r_loc + r_scale * eps_i`` with
    ``r = alpha q(z_i | ...) + (1 - alpha) p(z_i | z*_{<i}, pa*)`` (loc and variance
    mixed) and ``eps_i`` the posterior noise; ``alpha = 1`` holds the latents
    (direct effect), smaller ``alpha`` moves them toward the counterfactual prior.
    A null intervention does not return ``x`` exactly unless ``alpha = 1``.
  * ``"prior"``: each latent keeps its standardized position under its conditional
    prior, ``z*_i = p_loc(z*_{<i}, pa*) + p_scale(z*_{<i}, pa*) e_i`` with
    ``e_i = (z_i - p_loc(z_{<i}, pa)) / p_scale(z_{<i}, pa)``: an exact
    location-scale SCM for the latents, so a null intervention returns ``x``.

  :meth:`HVAEMechanism.holding_latents` asks for the direct effect of a mediator model.

The noise is one flat tensor per row: the latents' noise (``exogenous``: ``e``, the
latents standardized under their prior; ``mediator``: ``[flag, q_loc, q_logscale, eps,
e]`` over all latents, ``flag = 1`` for abducted rows) followed by the ``C*H*W`` pixel
noise ``u``. ``noise_like(n)`` draws the same structure from the prior.

Why the pose warp: on the synthetic brains (``benchmarks/brain_collapsed_ceiling.py``) the
parents-only answer ``x + E[x | pa*] - E[x | pa]`` scores CF MAE 0.0173, and the same answer
given each scan's own pose (rotation and shift; bias field, lesion sites and acquisition noise
still unknown) 0.0081: a change applied at the average pose misses every patient whose head
lies otherwise. The plain ladder leaves its latents unused (posterior collapse, below), so it
cannot know the pose. With the warp its top latent carries it (KL about 10 nats per scan; a
linear read-out of it explains R^2 0.91, 0.91 and 0.85 of the true rotation and shifts). In
the benchmark's default setting (64x64, 600 steps; ``brain_counterfactuals.md``) the CF MAE is
0.0164 against 0.0201 for the plain ladder and 0.0192 for cvae (on a second cohort,
``brain_counterfactuals_seed1.md``: 0.0153, 0.0192 and 0.0184), with the largest gain where
the head's size changes (sex flip: 0.0140 against 0.0234). Two costs:
do-then-undo no longer returns the scan exactly (reversibility 0.0027 after one cycle, from 0.0000),
because the pose abducted from a counterfactual scan differs a little from the original's; and
the decoder-mean composition drifts slowly (0.0249 after one null intervention, 0.0297 after ten).

The rest of this docstring records what was tried on the plain ladder (``pose_warp=False``)
before the warp was added; its figures are of that ladder.

The loss is the negative ELBO in nats per image (``has_log_prob = False``). The weights
are averaged (EMA, with the usual warm-up ``min(decay, (1 + t) / (10 + t))``) after each
optimizer step; ``sample``/``abduct`` use the averaged weights (``use_ema=False`` to
query the live ones). Optional counterfactual fine-tuning with frozen anti-causal
predictors: :meth:`HVAEMechanism.finetune_counterfactual` (off unless called). On the
synthetic brains it made true counterfactuals worse (32x32, 1000 steps after 3000: CF MAE
0.0152 -> 0.0170; cvae 0.0150 -> 0.0164; ``benchmarks/results/brain_counterfactuals_32_3000_cft.md``): it moves the
scans toward what the frozen predictors read, which is not the true counterfactual. Latents
as mediators gave 0.0156 on the same cohort (``brain_counterfactuals_32_3000_mediator.md``),
and a KL weight ``beta = 4`` (the latents made dearer, so the parents must carry more) 0.0149
against 0.0151 at ``beta = 1`` (``brain_counterfactuals_32_3000_beta4.md``; cvae 0.0149), and
at 64x64 0.0199 against 0.0203 (``brain_counterfactuals_64_3000_beta4.md``; cvae 0.0184).
An adversary reading the parents from the latents, its gradient reversed into the encoder
(the SCM's noise independent of the parents, made a training term), made it worse and was not
kept: 32x32, 3000 steps, weight 10: 0.0234 (the sampling itself degraded: null-abduction MAE
0.098 against 0.052); weight 100 diverged.

Why none of these latent settings matter there: on the synthetic brains both VAEs leave their
latents unused (posterior collapse). The ELBO's KL term (:meth:`PixelNoiseVAE.latent_kl`) is
0.13 nats per scan for hvae and 0.47 for cvae in the benchmark's default setting (the demo's
sizes, 64x64 and 600 steps, the image mechanism trained alone; ``brain_counterfactuals.md``,
*Latent use*), 0.012 and 0.24 at 32x32 after 3000 steps
(``brain_counterfactuals_32_3000_latent_use.md``). The pixel noise carries the scan's own
detail, so a counterfactual adds the decoder mean's change ``mu(pa*) - mu(pa)``, the same for
every patient with the same parents, and hvae and cvae compare two conditional decoders.
At 32x32 and 3000 steps (CF MAE, KL in nats per scan): ``beta`` 1: 0.0151 (0.01), 0.3: 0.0146
(31), 0.1: 0.0156 (6), 0: 0.0160 (1.7e3). Without a KL cost the latents carry everything and the
counterfactuals get worse; at 0.1-0.3 they carry information only on some fits, and the
counterfactuals move within the spread between cohorts (sd 0.0003,
``brain_counterfactuals_32_3000_realism_seeds.md``): ``beta = 0.3`` on two more cohorts gives
0.0152 (0.8) and 0.0153 (0.03) against 0.0150 and 0.0155 at ``beta = 1`` (cvae 0.0151, 0.0153);
in the benchmark's default setting 0.0199 against 0.0201 (cvae at 0.3: 0.0189 against 0.0190),
and at 64x64 with 3000 steps 0.0202 against 0.0203 (``brain_counterfactuals*_beta0*.md``).

What a VAE with unused latents can reach is estimated by
``benchmarks/brain_collapsed_ceiling.py`` in the benchmark's default setting (mean over the four
queries, 64 other patients' noise per patient, both figures still falling slowly with more): each
scan plus the true conditional mean's change ``E[x | pa*] - E[x | pa]``, which a collapsed VAE
with the per-pixel scale map converges to under its Gaussian likelihood, scores about 0.017
(0.0173); the per-pixel median of the same changes, an estimate of the least MAE any answer
``x + change(pa, pa*)`` can have, 0.0158 or a little below; cvae 0.0190, hvae 0.0201 (0.0191 and 0.0200
in the re-run on another machine, with the training loop's spike guard,
``brain_counterfactuals.md``). Going lower needs an answer that depends on the scan beyond a
shift set by the parents: latents that carry the patient's own noise (pose, bias field, lesion
sites), or a pixel scale from the decoder that rescales the residual. ``parent_embedding=256``
(the FiLMs read an MLP embedding of the parents, and the coarsest grid a map of it, as the cvae's
bottleneck does; 1.19 M weights against 0.80 M, cvae 0.90 M) brings hvae from 0.0201 / 0.0192 to
0.0196 / 0.0185 on two cohorts (``--seed`` 0 / 1), against cvae 0.0190 / 0.0184: closer, not
below, so it stays off. On seed 0 its latents carried 76 nats per scan (4x4 level), on seed 1
0.04 (``brain_counterfactuals*_parent_embedding256*.md``, ``brain_counterfactuals_seed1.md``);
with one latent level (the global one) it gives 0.0193
(``brain_counterfactuals_parent_embedding256_latent_levels1.md``). The likelihood is not the
criterion: in the benchmark's run hvae's held-out negative ELBO is below cvae's (-6804 against
-6763 nats per scan; -6645 against -6600 in the re-run, ``best_val_loss_nats`` in
``brain_counterfactuals.json``), yet its counterfactuals are worse. Scratch runs not kept in the
code did not help either: free bits (no KL cost below 4 nats per latent level; the latents then
carried 3.6 nats per scan) 0.0205, and the latents' projection into the decoder started at zero
0.0201. Parents modulating only the 4x4 and global levels (the 8-64 px levels left alone, a
departure from the paper) gave 0.0193, age+20 0.0284 against 0.0301: part of the gap is the fine
levels' modulation, which extrapolates badly.

>>> import torch
>>> from medcausal.graph import Image
>>> m = HVAEMechanism(Image((1, 16, 16)), parents=2, channels=[8, 16], z_dim=3, latent_levels=2)
>>> pa = torch.randn(3, 2)
>>> x = m.sample(pa, generator=torch.Generator().manual_seed(0))
>>> x.shape, m.loss(x, pa).shape
(torch.Size([3, 1, 16, 16]), torch.Size([3]))
>>> bool((m.sample(pa, noise=m.abduct(x, pa)) - x).abs().max() < m.reconstruction_tolerance)
True
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, MedCausalError
from .base import AveragedWeights, Mechanism, StandaloneLoss, grad_reverse, randn
from .registry import register

__all__ = ["HVAEMechanism", "PixelNoiseVAE", "TRAIN_SETTINGS"]

#: Training settings image mechanisms need (``CausalModel.fit`` defaults are tuned for tables).
TRAIN_SETTINGS = {"batch_size": 32, "lr": 3e-3, "max_epochs": 200, "patience": 20}

_LOGIT_QUARTER = math.log(3.0)  # sigmoid(x + log 3) = 0.75 at x = 0


def _bounded_logscale(raw: torch.Tensor, lo: float = -6.0, hi: float = 2.0) -> torch.Tensor:
    """A latent log-scale in (lo, hi), equal to 0 where ``raw = 0`` (for lo=-6, hi=2)."""
    return lo + (hi - lo) * torch.sigmoid(raw + _LOGIT_QUARTER)


def _gaussian_kl(q_loc, q_ls, p_loc, p_ls) -> torch.Tensor:
    """KL(N(q_loc, e^q_ls) || N(p_loc, e^p_ls)), elementwise."""
    return p_ls - q_ls + 0.5 * (torch.exp(2 * q_ls) + (q_loc - p_loc) ** 2) * torch.exp(-2 * p_ls) - 0.5


def _conv(c_in: int, c_out: int, size: tuple[int, int], scale: float = 1.0) -> nn.Conv2d:
    """3x3 conv (1x1 at a 1x1 resolution, where a 3x3 kernel's rim never sees data)."""
    k = 1 if min(size) == 1 else 3
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    if scale != 1.0:
        with torch.no_grad():
            conv.weight.mul_(scale)
            conv.bias.mul_(scale)
    return conv


class _Res(nn.Module):
    """Pre-activation residual block ``x + conv(act(conv(act(x))))``."""

    def __init__(self, ch: int, size: tuple[int, int], scale: float = 0.3):
        super().__init__()
        self.c1 = _conv(ch, ch, size)
        self.c2 = _conv(ch, ch, size, scale=scale)

    def forward(self, x):
        return x + self.c2(F.silu(self.c1(F.silu(x))))


class _AddBias(nn.Module):
    """``x + b`` with a learned ``b`` of fixed shape (a module, so per-sample gradient tools
    such as Opacus see a layer rather than a bare parameter)."""

    def __init__(self, *shape: int, init_std: float = 0.0):
        super().__init__()
        self.bias = nn.Parameter(init_std * torch.randn(1, *shape))

    def forward(self, x):
        return x + self.bias


class _FiLM(nn.Module):
    """Feature-wise modulation by the parents: ``h (1 + gamma(pa)) + beta(pa)``."""

    def __init__(self, parent_dim: int, ch: int):
        super().__init__()
        self.lin = nn.Linear(parent_dim, 2 * ch)
        with torch.no_grad():
            self.lin.weight[:ch].mul_(0.1)

    def forward(self, h, pa):
        gamma, beta = self.lin(pa)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + gamma) + beta


class _Stats(nn.Module):
    """A small conv net to ``2 * z_dim`` channels: (loc, raw log-scale)."""

    def __init__(self, c_in: int, ch: int, z_dim: int, size, scale: float = 0.1):
        super().__init__()
        self.c1 = _conv(c_in, ch, size)
        self.c2 = _conv(ch, 2 * z_dim, size, scale=scale)

    def forward(self, x):
        loc, raw = self.c2(F.silu(self.c1(x))).chunk(2, dim=1)
        return loc, _bounded_logscale(raw)


class GaussianHead(nn.Module):
    """Per-pixel Gaussian likelihood: features -> (loc, log-scale >= log(sigma_min)).

    ``scale="map"``: the log-scale is a learned per-pixel map shared by all images (it does
    not move under interventions, so a counterfactual keeps the unit's residual
    ``x - mu`` as it is); ``scale="decoder"``: a second output of the decoder, so it
    depends on the latents and the parents (the paper's diagonal Gaussian). The floor is
    smooth (``log_min + softplus(raw - log_min)``) so the scale never collapses on
    constant background and the pixel noise stays finite.

    >>> head = GaussianHead(4, 1, sigma_min=0.01, size=(3, 3))
    >>> loc, ls = head(torch.zeros(2, 4, 3, 3))
    >>> loc.shape, bool((ls > math.log(0.01)).all())
    (torch.Size([2, 1, 3, 3]), True)
    """

    def __init__(self, ch: int, out_ch: int, sigma_min: float = 1e-3, init_sigma: float = 0.1,
                 init_loc: float = 0.5, kernel: int = 3, scale: str = "map", size: tuple[int, int] = (1, 1)):
        super().__init__()
        if scale not in ("map", "decoder"):
            raise MedCausalError(f"pixel scale must be 'map' or 'decoder', got {scale!r}")
        if not sigma_min > 0:
            raise MedCausalError(f"sigma_min (pixel scale floor) must be > 0, got {sigma_min}")
        self.log_min = math.log(sigma_min)
        self.scale = scale
        self.loc = nn.Conv2d(ch, out_ch, kernel, padding=kernel // 2)
        with torch.no_grad():
            self.loc.bias.fill_(init_loc)
        if scale == "decoder":
            self.logscale = nn.Conv2d(ch, out_ch, kernel, padding=kernel // 2)
            with torch.no_grad():
                self.logscale.weight.mul_(0.1)
                self.logscale.bias.fill_(math.log(init_sigma))
        else:
            self.logscale = _AddBias(out_ch, *size)
            with torch.no_grad():
                self.logscale.bias.fill_(math.log(init_sigma))

    def forward(self, h):
        h = F.silu(h)
        loc = self.loc(h)
        raw = self.logscale(h) if self.scale == "decoder" else self.logscale(torch.zeros_like(loc))
        return loc, self.log_min + F.softplus(raw - self.log_min)

    @staticmethod
    def nll(x, loc, ls) -> torch.Tensor:
        """Per-row Gaussian negative log-likelihood, summed over pixels (nats)."""
        z = (x - loc) * torch.exp(-ls)
        return (0.5 * z * z + ls + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def _pixel_coords(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel centres of ``img`` ``[..., H, W]`` along x and y, in [-1, 1]
    (``grid_sample``'s coordinates with ``align_corners=False``)."""
    H, W = img.shape[-2:]
    def axis(n):
        return (2 * torch.arange(n, dtype=img.dtype, device=img.device) + 1) / n - 1
    return axis(W), axis(H)


def _similarity_warp(img: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """``img`` ``[n, C, H, W]`` rotated by ``pose[:, 0]`` radians about its centre, shifted by
    ``pose[:, 1:3]`` (in units of half the image's width and height) and, where ``pose`` has a
    fourth column, magnified by its exponential; bilinear, edges extended."""
    inv = torch.exp(-pose[:, 3]) if pose.shape[1] > 3 else torch.ones_like(pose[:, 0])
    cos, sin = torch.cos(pose[:, 0]) * inv, torch.sin(pose[:, 0]) * inv
    H, W = img.shape[-2:]
    # a rotation of the pixel grid, written in [-1, 1] coordinates (they stretch a non-square image)
    mat = torch.stack([torch.stack([cos, -sin * (H / W), pose[:, 1]], dim=1),
                       torch.stack([sin * (W / H), cos, pose[:, 2]], dim=1)], dim=1)
    xs, ys = _pixel_coords(img)
    base = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1)  # [H, W, (x, y)]
    # affine_grid's grid, written out (vmap, used by private training, has no rule for affine_grid)
    grid = torch.einsum("hwj,nij->nhwi", base, mat[:, :, :2]) + mat[:, None, None, :, 2]
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


_POSE_SCALE = 0.05  # pose_warp's initial pose scale: about 3 degrees, 1/40 of the image's width


def _pose_moments(x: torch.Tensor) -> torch.Tensor:
    """``[n, 3]``: the centre of mass of ``x`` (positive intensities, channels summed; in the
    [-1, 1] coordinates of :func:`_pixel_coords`) and the turn of its principal axis from the
    nearer image axis (radians, in pixel space, within +-pi/4; the same sign for tall and wide
    shapes): the standard start of a rigid registration."""
    w = x.clamp(min=0).sum(1)
    xs, ys = _pixel_coords(w)
    mass = w.sum((1, 2)).clamp(min=1e-8)
    wx, wy = w.sum(1), w.sum(2)  # marginals over rows and columns
    cx, cy = (wx * xs).sum(1) / mass, (wy * ys).sum(1) / mass
    H, W = w.shape[-2:]
    side = max(H, W)  # second moments in pixel units (up to one factor), so angles are the grid's
    dx = (xs[None, None, :] - cx[:, None, None]) * (W / side)
    dy = (ys[None, :, None] - cy[:, None, None]) * (H / side)
    sxx, syy, sxy = ((w * dx * dx).sum((1, 2)), (w * dy * dy).sum((1, 2)), (w * dx * dy).sum((1, 2)))
    axis = 0.5 * torch.atan2(2 * sxy, sxx - syy)  # the major axis, in (-pi/2, pi/2]
    angle = torch.remainder(axis + math.pi / 4, math.pi / 2) - math.pi / 4
    return torch.stack([cx, cy, angle], dim=1)


def _levels(shape, channels, min_res: int, global_latent: bool, what: str):
    """[(h, w, ch)] from full resolution down (halving), then an optional global 1x1 level."""
    _, H, W = shape
    if not channels or min(int(c) for c in channels) < 1:
        raise MedCausalError(f"{what}: channels must be a non-empty list of widths >= 1, got {list(channels)}")
    levels = []
    for k, ch in enumerate(channels):
        h, w = H >> k, W >> k
        if k > 0 and (min(h, w) < min_res or H % (1 << k) or W % (1 << k)):
            break
        levels.append((h, w, int(ch)))
    if global_latent and (levels[-1][0], levels[-1][1]) != (1, 1):
        levels.append((1, 1, levels[-1][2]))
    if not levels:
        raise MedCausalError(f"{what}: no resolution levels for image shape {tuple(shape)}")
    return levels


def _per_level(blocks, n_levels: int) -> list[int]:
    """Residual blocks per level from an int (every level) or a list (full resolution first;
    the last entry repeats for the coarser levels)."""
    b = [int(blocks)] if isinstance(blocks, int) else [int(v) for v in blocks]
    if not b or min(b) < 0:
        raise MedCausalError(f"blocks must be a non-negative int or a non-empty list, got {blocks!r}")
    return (b + [b[-1]] * n_levels)[:n_levels]


class _HVAENet(nn.Module):
    """The ladder network. ``forward(op, ...)`` dispatches, so the EMA weights can be swapped in."""

    def __init__(self, shape, parent_dim: int, channels, blocks, z_dim: int, latent_levels: int,
                 latent_mode: str, sigma_min: float, min_res: int = 4, global_latent: bool = True,
                 pixel_scale: str = "map", parent_embedding: int = 0, pose_warp: bool = False):
        super().__init__()
        self.shape = tuple(shape)
        self.levels = _levels(shape, channels, min_res, global_latent, "hvae")
        L = len(self.levels)
        if z_dim < 1:
            raise MedCausalError(f"hvae: z_dim (latent channels per level) must be >= 1, got {z_dim}")
        if not 1 <= latent_levels <= L:
            raise MedCausalError(f"hvae: latent_levels={latent_levels} must be in [1, {L}] for image shape "
                                 f"{tuple(shape)} with channels {list(channels)} ({L} resolution levels)")
        self.parent_dim, self.z_dim, self.mode = parent_dim, z_dim, latent_mode
        self.latent_ids = list(range(L - 1, L - 1 - latent_levels, -1))  # top-down
        C = shape[0]
        sizes = [(h, w) for h, w, _ in self.levels]
        chs = [c for _, _, c in self.levels]
        # bottom-up encoder
        self.stem = _conv(C, chs[0], sizes[0])
        nb = _per_level(blocks, L)
        self.enc = nn.ModuleList(nn.Sequential(*[_Res(chs[k], sizes[k]) for _ in range(nb[k])])
                                 for k in range(L))
        self.down = nn.ModuleList(nn.Conv2d(chs[k], chs[k + 1], 1) for k in range(L - 1))
        # top-down decoder
        self.top = _AddBias(chs[-1], *sizes[-1], init_std=0.1)
        self.up = nn.ModuleList(nn.Conv2d(chs[k + 1], chs[k], 1) for k in range(L - 1))
        self.bias = nn.ModuleList(_AddBias(chs[k], *sizes[k]) for k in range(L - 1))
        # parent_embedding > 0: the FiLMs read a learned embedding of the parents, and the coarsest
        # grid also gets a map of it (the parents then shape the layout, not only rescale features)
        self.pa_embed = self.pa_map = None
        self.map_level = max((k for k in range(L) if sizes[k] != (1, 1)), default=None)
        if parent_dim and parent_embedding:
            self.pa_embed = nn.Sequential(nn.Linear(parent_dim, parent_embedding), nn.SiLU())
            if self.map_level is not None:  # a 1x1 image has no grid to map
                self.pa_map = nn.Linear(parent_embedding, chs[self.map_level] * math.prod(sizes[self.map_level]))
        film_in = parent_embedding if self.pa_embed is not None else parent_dim
        self.pa_emb = nn.ModuleList(_FiLM(film_in, chs[k]) for k in range(L)) if parent_dim else None
        self.dec = nn.ModuleList(nn.Sequential(*[_Res(chs[k], sizes[k]) for _ in range(nb[k])])
                                 for k in range(L))
        self.head = GaussianHead(chs[0], C, sigma_min=sigma_min, kernel=1 if min(sizes[0]) == 1 else 3,
                                 scale=pixel_scale, size=sizes[0])
        # latents
        self.post = nn.ModuleDict()
        self.prior = nn.ModuleDict()
        self.zproj = nn.ModuleDict()
        for k in self.latent_ids:
            self.post[str(k)] = _Stats(2 * chs[k], chs[k], z_dim, sizes[k])
            self.prior[str(k)] = _Stats(chs[k], chs[k], z_dim, sizes[k])
            self.zproj[str(k)] = nn.Conv2d(z_dim, chs[k], 1)
        if latent_mode == "exogenous":
            # A parent-free stream carrying z_{<i} to the prior of z_i.
            top_latent = self.latent_ids[0]
            self.s_top = _AddBias(chs[top_latent], *sizes[top_latent], init_std=0.1)
            self.s_z = nn.ModuleDict({str(k): nn.Conv2d(z_dim, chs[k], 1) for k in self.latent_ids[:-1]})
            self.s_res = nn.ModuleDict({str(k): _Res(chs[k], sizes[k]) for k in self.latent_ids[:-1]})
            self.s_up = nn.ModuleDict({str(k): nn.Conv2d(chs[k + 1], chs[k], 1) for k in self.latent_ids[1:]})
        # pose_warp: the decoded image (mean and scale map) is moved by a similarity transform.
        # Rotation and shift: the first three channels of the top latent times a learned scale
        # (the scan's pose, part of the unit's noise), read directly rather than through a layer
        # started at zero, so the likelihood's gradient reaches the encoder from the first step.
        # A linear map of the parents adds to them and sets the log-magnification (head size).
        if pose_warp and z_dim < 3:
            raise MedCausalError(f"hvae: pose_warp needs z_dim >= 3 (a rotation and two shifts in the top "
                                 f"latent), got z_dim={z_dim}; pass pose_warp=False or a larger z_dim")
        self.pose_logscale = self.pose_pa = None
        if pose_warp:
            self.pose_logscale = _AddBias(3)
            with torch.no_grad():
                self.pose_logscale.bias.fill_(math.log(_POSE_SCALE))
            if parent_dim:
                self.pose_pa = nn.Linear(parent_dim, 4)
                nn.init.zeros_(self.pose_pa.weight)
                nn.init.zeros_(self.pose_pa.bias)
            # the top posterior also reads the scan's pose moments: a pooled conv feature hardly
            # sees a shift of one pixel (without them the pose stayed unlearned after 2000 steps)
            top = self.latent_ids[0]
            self.post[str(top)] = _Stats(2 * chs[top] + 3, chs[top], z_dim, sizes[top])
        self.latent_shapes = [(z_dim, *sizes[k]) for k in self.latent_ids]
        self.n_latent = sum(math.prod(s) for s in self.latent_shapes)

    # -- dispatch --------------------------------------------------------------
    def forward(self, op: str, *args, **kwargs):
        return getattr(self, op)(*args, **kwargs)

    @property
    def latent_noise_dim(self) -> int:
        return self.n_latent if self.mode == "exogenous" else 1 + 4 * self.n_latent

    # -- pieces ----------------------------------------------------------------
    def encode(self, x):
        a = self.stem(x)
        acts = []
        for k, block in enumerate(self.enc):
            a = block(a)
            acts.append(a)
            if k + 1 < len(self.enc):
                h, w, _ = self.levels[k + 1]
                a = self.down[k](F.adaptive_avg_pool2d(a, (h, w)) if (h, w) == (1, 1) else F.avg_pool2d(a, 2))
        if self.pose_logscale is not None:
            m = _pose_moments(x)[:, :, None, None] / _POSE_SCALE
            acts[-1] = torch.cat([acts[-1], m.expand(-1, -1, *acts[-1].shape[2:])], dim=1)
        return acts

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for s in self.latent_shapes:
            size = math.prod(s)
            out.append(flat[:, start:start + size].reshape(-1, *s))
            start += size
        return out

    def topdown(self, pa, acts=None, noise=None, how: str = "train", generator=None,
                alpha: float = 0.5, mediator_abduction: str = "mixture", hold: bool = False):
        """One top-down pass; ``how`` is ``train`` (reparameterized posterior samples),
        ``abduct`` (posterior means or samples; returns the latents' noise) or ``noise``
        (latents computed from ``noise``)."""
        n = pa.shape[0]
        L = len(self.levels)
        kl = torch.zeros(n, device=pa.device, dtype=pa.dtype) if how == "train" else None
        pieces: dict[str, list] = {"q_loc": [], "q_ls": [], "eps": [], "e": [], "z": [], "kl": []}
        if how == "noise":
            if self.mode == "exogenous":
                e_all = self._split(noise)
            else:
                flag = noise[:, :1]
                q_loc_all, q_ls_all, eps_all, e_all = (self._split(c) for c in
                                                       noise[:, 1:].chunk(4, dim=1))
        h = self.top(pa.new_zeros(n, *self.top.bias.shape[1:]))
        pe = self.pa_embed(pa) if self.pa_embed is not None else pa
        s = None
        for j, k in enumerate(range(L - 1, -1, -1)):
            if k < L - 1:
                hk, wk, _ = self.levels[k]
                h = self.bias[k](F.interpolate(self.up[k](h), size=(hk, wk), mode="nearest"))
            if self.pa_emb is not None:
                h = self.pa_emb[k](h, pe)
            if self.pa_map is not None and k == self.map_level:
                h = h + self.pa_map(pe).view(h.shape)
            if k in self.latent_ids:
                i = self.latent_ids.index(k)
                key = str(k)
                if self.mode == "exogenous":
                    if s is None:
                        s = self.s_top(pa.new_zeros(n, *self.s_top.bias.shape[1:]))
                    else:
                        hk, wk, _ = self.levels[k]
                        s = F.interpolate(self.s_up[key](s), size=(hk, wk), mode="nearest")
                    p_loc, p_ls = self.prior[key](s)
                else:
                    p_loc, p_ls = self.prior[key](h)
                if how in ("train", "abduct"):
                    q_loc, q_ls = self.post[key](torch.cat([h, acts[k]], dim=1))
                    if how == "train":
                        z = q_loc + torch.exp(q_ls) * torch.randn_like(q_loc)
                        pieces["kl"].append(_gaussian_kl(q_loc, q_ls, p_loc, p_ls).flatten(1).sum(1))
                        kl = kl + pieces["kl"][-1]
                    else:
                        eps = (torch.zeros_like(q_loc) if generator is None
                               else randn(q_loc.shape, generator, like=q_loc))
                        z = q_loc + torch.exp(q_ls) * eps
                        pieces["q_loc"].append(q_loc)
                        pieces["q_ls"].append(q_ls)
                        pieces["eps"].append(eps)
                        pieces["e"].append((z - p_loc) * torch.exp(-p_ls))
                else:  # from noise
                    z_prior = p_loc + torch.exp(p_ls) * e_all[i]
                    if self.mode == "exogenous":
                        z = z_prior
                    else:
                        q_loc, q_ls, eps = q_loc_all[i], q_ls_all[i], eps_all[i]
                        f = flag[:, :, None, None] > 0.5
                        if hold:
                            z_cf = q_loc + torch.exp(q_ls) * eps
                        elif mediator_abduction == "mixture":
                            r_loc = alpha * q_loc + (1 - alpha) * p_loc
                            r_var = alpha * torch.exp(2 * q_ls) + (1 - alpha) * torch.exp(2 * p_ls)
                            z_cf = r_loc + torch.sqrt(r_var) * eps
                        else:
                            z_cf = z_prior
                        z = torch.where(f, z_cf, z_prior)
                pieces["z"].append(z)
                h = h + self.zproj[key](z)
                if self.mode == "exogenous" and key in self.s_z:
                    s = self.s_res[key](s + self.s_z[key](z))
            h = self.dec[k](h)
        loc, ls = self.head(h)
        if self.pose_logscale is not None:
            z_top = pieces["z"][0].mean(dim=(2, 3))[:, :3]
            pose = z_top * torch.exp(self.pose_logscale(torch.zeros_like(z_top)))
            if self.pose_pa is not None:
                pose = F.pad(pose, (0, 1)) + self.pose_pa(pa)
            loc, ls = _similarity_warp(torch.cat([loc, ls], dim=1), pose).split(loc.shape[1], dim=1)
        return loc, ls, kl, pieces

    # -- operations (called through forward) -------------------------------------
    def elbo(self, x, pa):
        loc, ls, kl, _ = self.topdown(pa, acts=self.encode(x), how="train")
        return GaussianHead.nll(x, loc, ls), kl

    def kl_levels(self, x, pa):
        """``[n, latent levels]``: each level's KL term of the ELBO (top-down), one draw."""
        return torch.stack(self.topdown(pa, acts=self.encode(x), how="train")[3]["kl"], dim=1)

    def reconstruct(self, x, pa):
        """The decoder mean at the posterior-mean latents."""
        return self.topdown(pa, acts=self.encode(x), how="abduct")[0]

    def abduct(self, x, pa, generator=None):
        loc, ls, _, p = self.topdown(pa, acts=self.encode(x), how="abduct", generator=generator)
        flat = {k: torch.cat([t.flatten(1) for t in v], dim=1) for k, v in p.items() if k not in ("z", "kl")}
        if self.mode == "exogenous":
            lat = flat["e"]
        else:
            lat = torch.cat([torch.ones_like(flat["e"][:, :1]), flat["q_loc"], flat["q_ls"],
                             flat["eps"], flat["e"]], dim=1)
        return lat, loc, ls

    def decode(self, pa, lat, **kw):
        loc, ls, _, _ = self.topdown(pa, noise=lat, how="noise", **kw)
        return loc, ls

    def latents(self, pa, lat, **kw):
        """The latents ``[z_top, ..., z_bottom]`` a noise decodes to under parents ``pa``."""
        return self.topdown(pa, noise=lat, how="noise", **kw)[3]["z"]

    def latent_noise_like(self, n, generator=None, like=None):
        e = randn((n, self.n_latent), generator, like=like)
        if self.mode == "exogenous":
            return e
        zeros = torch.zeros(n, 1 + 3 * self.n_latent, dtype=e.dtype, device=e.device)
        return torch.cat([zeros, e], dim=1)


class _CounterfactualObjective(nn.Module):
    """The constrained counterfactual objective as a per-row loss for the one training loop:
    ``nll_pred(x*, pa*) + lambda (negELBO(x, pa) - target) / D`` (``D`` pixels: the bound
    per pixel, as in the paper), ``lambda = softplus(lambda_rate * r) >= 0`` ascended by
    gradient reversal (the Lagrangian's saddle point); ``lambda_rate`` speeds the
    multiplier up relative to the network under the one learning rate."""

    def __init__(self, mech, predictor_nll, target: float, intervene, lambda_rate: float = 10.0):
        super().__init__()
        self.mech = mech
        self.predictor_nll = predictor_nll
        self.target = float(target)
        self.intervene = intervene
        self.lambda_rate = float(lambda_rate)
        self.raw_lambda = nn.Parameter(torch.zeros(()))

    def multiplier(self) -> float:
        return float(F.softplus(self.lambda_rate * self.raw_lambda.detach()))

    def forward(self, batch):
        x, pa = batch["x"], batch["pa"]
        pa_cf = self.intervene(pa)
        x_cf = self.mech._counterfactual(x, pa, pa_cf, ema=False)
        lam = F.softplus(self.lambda_rate * grad_reverse(self.raw_lambda))
        gap = (self.mech.loss(x, pa) - self.target) / self.mech.n_pixels
        return self.predictor_nll(x_cf, pa_cf) + lam * gap


def _shuffle_parents(pa: torch.Tensor) -> torch.Tensor:
    """Default counterfactual parents for fine-tuning: another row's parents."""
    return pa[torch.randperm(pa.shape[0], device=pa.device)]


class PixelNoiseVAE(AveragedWeights, Mechanism):
    """Shared machinery of the VAE image mechanisms (``hvae``, ``cvae``).

    Subclasses build ``self.net`` with the operations ``elbo``, ``abduct``, ``decode``,
    ``reconstruct``, ``latent_noise_like`` and the attribute ``latent_noise_dim``, then
    call :meth:`_init_ema`. This class adds the pixel noise ``u = (x - mu) / sigma``,
    the EMA of the weights, input checks and counterfactual fine-tuning.
    """

    abduction: ClassVar[str] = "amortized"
    supports: ClassVar[tuple[str, ...]] = ("image",)
    has_log_prob: ClassVar[bool] = False
    # Latents re-derived from their noise and the pixel noise re-applied reproduce x to float32
    # rounding (measured: <= 5e-7 untrained, <= 2e-6 on trained 64x64 brain models); images in [0, 1].
    reconstruction_tolerance: ClassVar[float] = 1e-4
    #: settings for the training loop (CausalModel.fit's defaults are tuned for tables).
    train_settings: ClassVar[dict] = TRAIN_SETTINGS

    net: nn.Module

    def _check_variable(self, variable) -> None:
        if getattr(variable, "kind", None) != "image" or len(variable.shape) != 3:
            raise MedCausalError(f"mechanism {self.name!r} models 2D images (C, H, W); "
                                 f"got variable {variable!r}")

    # -- checks ------------------------------------------------------------------
    def _check(self, value: torch.Tensor | None, parents: torch.Tensor):
        """Shape checks; returns ``(value, parents)`` in the weights' dtype (float64 or integer
        inputs are converted)."""
        if parents.dim() != 2 or parents.shape[1] != self.parent_dim:
            raise DataError(f"{self.name}: parents must be [n, {self.parent_dim}] "
                            f"({self.parent_dims}), got {tuple(parents.shape)}")
        if value is not None:
            want = (parents.shape[0], *self.variable.shape)
            if tuple(value.shape) != want:
                raise DataError(f"{self.name}: image batch must have shape {want} (n, C, H, W; "
                                f"channel-first), got {tuple(value.shape)}")
            value = value.to(self._dtype())
        return value, parents.to(self._dtype())

    def _check_finite_parents(self, parents: torch.Tensor) -> None:
        # Queries only: loss() runs per record under vmap (DP), where a data-dependent check fails.
        if not torch.isfinite(parents).all():
            raise DataError(f"{self.name}: parents have {int((~torch.isfinite(parents)).sum())} non-finite "
                            f"value(s) ({self.parent_dims}); a NaN parent would give a NaN image")

    @property
    def n_pixels(self) -> int:
        return math.prod(self.variable.shape)

    def _query_kwargs(self) -> dict:
        return {}

    # -- the verbs -----------------------------------------------------------------
    def loss(self, value, parents):
        """Negative ELBO per image (nats): pixel NLL + beta * KL."""
        value, parents = self._check(value, parents)
        nll, kl = self.net("elbo", value, parents)
        return nll + self.beta * kl

    def elbo_terms(self, value, parents, ema: bool = False) -> dict[str, torch.Tensor]:
        """Per-row ``{"nll", "kl"}`` (nats); the ELBO is ``-(nll + kl)``."""
        value, parents = self._check(value, parents)
        nll, kl = self._run("elbo", value, parents, ema=ema)
        return {"nll": nll, "kl": kl}

    def latent_kl(self, value, parents, ema: bool | None = None) -> torch.Tensor:
        """``[n, groups]``: the ELBO's KL term per latent group, in nats per image (``hvae``: one
        column per latent level, coarsest first, each a one-draw estimate as in the ELBO, since a
        level's prior depends on the draws above it; ``cvae``: its one code, in closed form). A
        group near 0 is unused (posterior collapse): it carries nothing of the image, and a
        counterfactual then changes the scan by the decoder mean's change alone,
        ``mu(pa*) - mu(pa)``, the same for every patient with the same parents. Like the queries it
        uses the averaged weights unless ``ema=False`` (:meth:`elbo_terms` defaults to the live ones).

        >>> from medcausal.graph import Image
        >>> m = HVAEMechanism(Image((1, 16, 16)), parents=1, channels=[8, 16], z_dim=3, latent_levels=2)
        >>> m.latent_kl(torch.rand(3, 1, 16, 16), torch.randn(3, 1)).shape
        torch.Size([3, 2])
        """
        value, parents = self._check(value, parents)
        with torch.no_grad():
            return self._run("kl_levels", value, parents, ema=ema)

    def noise_like(self, n, generator=None):
        lat = self.net.latent_noise_like(n, generator)
        return torch.cat([lat, randn((n, self.n_pixels), generator, like=lat)], dim=1)

    def abduct(self, value, parents, generator=None, ema: bool | None = None):
        value, parents = self._check(value, parents)
        if not torch.isfinite(value).all():
            raise DataError(f"{self.name}: image batch has {int((~torch.isfinite(value)).sum())} "
                            "non-finite value(s)")
        self._check_finite_parents(parents)
        # the posterior means, unless abduct_sample: then drawn (by torch's global RNG without a generator)
        gen = (generator if generator is not None else torch.default_generator) if self.abduct_sample else None
        lat, loc, ls = self._run("abduct", value, parents, generator=gen, ema=ema)
        u = (value - loc) * torch.exp(-ls)
        return torch.cat([lat, u.flatten(1)], dim=1)

    def sample(self, parents, noise=None, generator=None, ema: bool | None = None):
        _, parents = self._check(None, parents)
        self._check_finite_parents(parents)
        n = parents.shape[0]
        if noise is None:
            noise = self.noise_like(n, generator).to(parents)
        width = self.net.latent_noise_dim + self.n_pixels
        if noise.dim() != 2 or noise.shape != (n, width):
            raise DataError(f"{self.name}: noise must be [{n}, {width}] (latents + pixels), "
                            f"got {tuple(noise.shape)}")
        noise = noise.to(parents.dtype)
        lat, u = noise[:, :self.net.latent_noise_dim], noise[:, self.net.latent_noise_dim:]
        loc, ls = self._run("decode", parents, lat, ema=ema, **self._query_kwargs())
        return loc + torch.exp(ls) * u.reshape(loc.shape)

    def _counterfactual(self, value, parents, new_parents, ema: bool | None = None, generator=None):
        return self.sample(new_parents, noise=self.abduct(value, parents, generator=generator, ema=ema),
                           ema=ema)

    def counterfactual(self, value, parents, new_parents, generator=None):
        """Abduction -> action -> prediction for this variable alone: ``x`` under ``new_parents``.

        >>> from medcausal.graph import Image
        >>> m = HVAEMechanism(Image((1, 16, 16)), parents=1, channels=[8, 16], z_dim=3, latent_levels=2)
        >>> x, pa = torch.rand(2, 1, 16, 16), torch.zeros(2, 1)
        >>> bool(torch.allclose(m.counterfactual(x, pa, pa), x, atol=1e-4))
        True
        """
        with torch.no_grad():
            return self._counterfactual(value, parents, new_parents, generator=generator)

    def reconstruct(self, value, parents):
        """The decoder mean at the posterior-mean latents (no pixel noise): the VAE's own
        reconstruction, whose error is what the pixel noise ``u`` carries.

        >>> from medcausal.graph import Image
        >>> m = HVAEMechanism(Image((1, 16, 16)), parents=0, channels=[8, 16], z_dim=3, latent_levels=2)
        >>> m.reconstruct(torch.rand(2, 1, 16, 16), torch.zeros(2, 0)).shape
        torch.Size([2, 1, 16, 16])
        """
        value, parents = self._check(value, parents)
        with torch.no_grad():
            return self._run("reconstruct", value, parents)

    # -- standalone training -----------------------------------------------------------
    def fit(self, value: torch.Tensor, parents: torch.Tensor, *, max_steps: int | None = None,
            max_epochs: int = 200, batch_size: int | None = None, lr: float | None = None,
            patience: int | None = None, val_fraction: float = 0.1, seed: int = 0,
            verbose: bool | None = None):
        """Train this mechanism alone on ``(value, parents)`` with :func:`medcausal.train.train`
        and :data:`TRAIN_SETTINGS` (``CausalModel.fit`` trains it jointly with the others);
        returns the :class:`~medcausal.train.TrainResult`.

        >>> from medcausal.graph import Image
        >>> m = HVAEMechanism(Image((1, 16, 16)), parents=1, channels=[8, 16], z_dim=3, latent_levels=2)
        >>> m.fit(torch.rand(40, 1, 16, 16), torch.randn(40, 1), max_steps=3, verbose=False).steps
        3
        """
        from ..train import TrainConfig, forked_rng, train

        self._check(value, parents)
        s = self.train_settings
        config = TrainConfig(max_epochs=max_epochs, max_steps=max_steps,
                             batch_size=batch_size or s["batch_size"], lr=lr or s["lr"],
                             patience=patience or s["patience"], val_fraction=val_fraction, seed=seed,
                             verbose=verbose)
        with forked_rng(config.device, seed=seed):  # the caller's random state is left as it was
            return train(StandaloneLoss(self), {"x": value, "pa": parents}, config)

    # -- counterfactual fine-tuning -------------------------------------------------
    def finetune_counterfactual(self, value: torch.Tensor, parents: torch.Tensor,
                                predictor_nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                                intervene: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                elbo_slack: float = 0.01, max_steps: int = 200, batch_size: int = 32,
                                lr: float = 1e-4, seed: int = 0, verbose: bool | None = None):
        """Counterfactual fine-tuning (Ribeiro et al. 2023, Sec. 3.4), off unless called.

        Minimizes the frozen anti-causal predictor's negative log-likelihood of the
        counterfactual parents given the counterfactual image, ``predictor_nll(x*, pa*)``
        (e.g. :meth:`medcausal.metrics.predictors.AntiCausalPredictor.parent_nll`),
        subject to the negative ELBO staying within ``elbo_slack`` (relative) of its
        value before fine-tuning, via a Lagrange multiplier ascended in the same loop.
        It starts from the averaged (EMA) weights that queries use, and the average restarts
        its warm-up, so queries after fine-tuning answer with the fine-tuned weights.
        ``intervene(pa) -> pa*`` draws counterfactual parents (default: another row's
        parents). Trained with :func:`medcausal.train.train`; returns its result, with the
        final ``lagrange_multiplier`` and the ``elbo_target`` (nats per image) attached.

        >>> from medcausal.graph import Image
        >>> m = HVAEMechanism(Image((1, 16, 16)), parents=1, channels=[8, 16], z_dim=3, latent_levels=2)
        >>> x, pa = torch.rand(8, 1, 16, 16), torch.randn(8, 1)
        >>> nll = lambda img, p: (img.mean((1, 2, 3)) - p[:, 0]) ** 2
        >>> m.finetune_counterfactual(x, pa, nll, max_steps=2, batch_size=4, verbose=False).steps
        2
        """
        from ..train import TrainConfig, forked_rng, train

        self._check(value, parents)
        self.restart_average()  # fine-tune the weights queries use; the average then follows it
        with forked_rng(seed=seed):  # the caller's random state is left as it was
            with torch.no_grad():
                was = self.training
                self.eval()
                base = float(self.loss(value, parents).mean())
                self.train(was)
            target = base + elbo_slack * abs(base)
            objective = _CounterfactualObjective(self, predictor_nll, target, intervene or _shuffle_parents)
            frozen = [p for p in getattr(predictor_nll, "__self__", nn.Module()).parameters() if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
            try:
                steps_per_epoch = max(1, len(value) // batch_size)
                config = TrainConfig(max_epochs=max(1, math.ceil(max_steps / steps_per_epoch)), max_steps=max_steps,
                                     batch_size=batch_size, lr=lr, val_fraction=0.0, patience=10 ** 9,
                                     seed=seed, verbose=verbose,
                                     spike_guard=None)  # the multiplier's term jumps by design once it binds
                result = train(objective, {"x": value, "pa": parents}, config)
                result.lagrange_multiplier, result.elbo_target = objective.multiplier(), target
            finally:
                for p in frozen:
                    p.requires_grad_(True)
        self.eval()
        return result


@register
class HVAEMechanism(PixelNoiseVAE):
    """Conditional hierarchical VAE image mechanism (see the module docstring).

    Hyperparameters: ``channels`` (width per resolution, full resolution first; levels
    stop at ``min_res``), ``blocks`` (residual blocks per level in encoder and decoder: an
    int, or a list from full resolution down whose last entry repeats; the default
    ``(0, 1)`` spends none at full resolution, whose detail the pixel noise carries),
    ``z_dim`` (latent channels per latent level), ``latent_levels`` (how many of the
    coarsest levels, the global 1x1 one included, carry latents), ``latent_mode``
    (``"exogenous"`` or ``"mediator"``), ``mediator_abduction`` (``"mixture"`` or
    ``"prior"``) and ``alpha`` (the mixture's weight on the posterior), ``beta`` (KL
    weight), ``sigma_min`` (pixel scale floor), ``pixel_scale`` (``"map"`` or
    ``"decoder"``), ``ema_decay``/``use_ema``, ``abduct_sample`` (draw the posterior
    latents instead of taking their mean), ``min_res`` (coarsest grid before the global
    level), ``parent_embedding`` (0: each level's FiLM is affine in the parents; ``k > 0``:
    the FiLMs read a learned ``k``-wide embedding of them, and the coarsest grid gets a map
    of it; ignored without parents), ``pose_warp`` (the decoded image moved by a similarity
    transform: rotation and shift from the top latent's first three channels, which needs
    ``z_dim >= 3``, magnification from the parents; ``False``: the paper's ladder). The
    defaults (about 0.8 M weights) train on 64x64 scans at roughly 150-180 images/s on one CPU
    thread (``brain_counterfactuals.md``); ``mediator_abduction`` and ``alpha`` may be changed at
    query time (they are read by ``sample``).

    >>> from medcausal.graph import Image
    >>> m = HVAEMechanism(Image((1, 16, 16)), parents=1, channels=[8, 16], z_dim=3,
    ...                   latent_levels=2, latent_mode="mediator", mediator_abduction="prior")
    >>> x, pa = torch.rand(2, 1, 16, 16), torch.randn(2, 1)
    >>> noise = m.abduct(x, pa)
    >>> bool(torch.allclose(m.sample(pa, noise=noise), x, atol=1e-4))
    True
    >>> with m.holding_latents():  # direct effect: the latents keep their abducted values
    ...     direct = m.sample(pa + 1, noise=noise)
    """

    name = "hvae"
    query_settings = ("mediator_abduction", "alpha")

    def __init__(self, variable, parents, channels: list[int] | tuple[int, ...] = (8, 16, 32, 64, 64),
                 blocks: int | list[int] | tuple[int, ...] = (0, 1), z_dim: int = 4, latent_levels: int = 3,
                 latent_mode: str = "exogenous",
                 mediator_abduction: str = "mixture", alpha: float = 0.5, beta: float = 1.0,
                 sigma_min: float = 1e-3, ema_decay: float = 0.999, use_ema: bool = True,
                 abduct_sample: bool = False, min_res: int = 4, pixel_scale: str = "map",
                 parent_embedding: int = 0, pose_warp: bool = True):
        blocks = blocks if isinstance(blocks, int) else list(blocks)
        super().__init__(variable, parents, channels=list(channels), blocks=blocks, z_dim=z_dim,
                         latent_levels=latent_levels, latent_mode=latent_mode,
                         mediator_abduction=mediator_abduction, alpha=alpha, beta=beta,
                         sigma_min=sigma_min, ema_decay=ema_decay, use_ema=use_ema,
                         abduct_sample=abduct_sample, min_res=min_res, pixel_scale=pixel_scale,
                         parent_embedding=parent_embedding, pose_warp=bool(pose_warp))
        self._check_variable(variable)
        if latent_mode not in ("exogenous", "mediator"):
            raise MedCausalError(f"hvae: latent_mode must be 'exogenous' or 'mediator', got {latent_mode!r}")
        if mediator_abduction not in ("mixture", "prior"):
            raise MedCausalError(f"hvae: mediator_abduction must be 'mixture' or 'prior', "
                                 f"got {mediator_abduction!r}")
        if not 0.0 <= alpha <= 1.0:
            raise MedCausalError(f"hvae: alpha must be in [0, 1], got {alpha}")
        if not beta >= 0:  # also refuses NaN
            raise MedCausalError(f"hvae: beta (KL weight) must be >= 0, got {beta}")
        if isinstance(parent_embedding, bool) or not isinstance(parent_embedding, int) or parent_embedding < 0:
            raise MedCausalError(f"hvae: parent_embedding must be an integer >= 0 (0: FiLM from the raw "
                                 f"parents), got {parent_embedding!r}")
        self.latent_mode, self.mediator_abduction, self.alpha = latent_mode, mediator_abduction, float(alpha)
        self.beta, self.abduct_sample = float(beta), bool(abduct_sample)
        self._hold = False
        self.net = _HVAENet(variable.shape, self.parent_dim, list(channels), blocks, int(z_dim),
                            int(latent_levels), latent_mode, float(sigma_min), min_res=int(min_res),
                            pixel_scale=pixel_scale, parent_embedding=parent_embedding,
                            pose_warp=bool(pose_warp))
        self._init_ema(ema_decay, use_ema)

    @classmethod
    def saved_hparams(cls, hparams: dict, state, prefix: str) -> dict:
        # Files written before pose_warp was on by default do not name it: their weights tell.
        if "pose_warp" in hparams:
            return hparams
        return {**hparams, "pose_warp": prefix + "net.pose_logscale.bias" in state}

    def _query_kwargs(self) -> dict:
        return {"alpha": self.alpha, "mediator_abduction": self.mediator_abduction, "hold": self._hold}

    def latents(self, parents: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
        """The latents (top-down, each ``[n, z_dim, h, w]``) that ``noise`` decodes to under
        ``parents``, with the current query settings: in ``exogenous`` mode they do not depend
        on the parents; in ``mediator`` mode they do, unless :meth:`holding_latents`.

        >>> from medcausal.graph import Image
        >>> m = HVAEMechanism(Image((1, 16, 16)), parents=1, channels=[8, 16], z_dim=3, latent_levels=2)
        >>> [tuple(z.shape) for z in m.latents(torch.zeros(3, 1), m.noise_like(3))]
        [(3, 3, 1, 1), (3, 3, 8, 8)]
        """
        _, parents = self._check(None, parents)
        width = self.net.latent_noise_dim + self.n_pixels
        if noise.dim() != 2 or noise.shape != (parents.shape[0], width):
            raise DataError(f"{self.name}: noise must be [{parents.shape[0]}, {width}] (latents + pixels), "
                            f"got {tuple(noise.shape)}")
        lat = noise[:, :self.net.latent_noise_dim].to(parents.dtype)
        with torch.no_grad():
            return self._run("latents", parents, lat, **self._query_kwargs())

    @contextlib.contextmanager
    def holding_latents(self):
        """Within this block, counterfactuals keep the abducted latents (the direct effect).

        A no-op for ``latent_mode="exogenous"``, whose latents never move.
        """
        old, self._hold = self._hold, True
        try:
            yield self
        finally:
            self._hold = old

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, latent_mode={self.latent_mode}, "
                f"levels={[(h, w, c) for h, w, c in self.net.levels]}, latents={self.net.n_latent}")

