r"""``image-diffusion``: counterfactual scans by DDIM inversion on MONAI's diffusion UNet.

After Sanchez & Tsaftaris, *Diffusion Causal Models for Counterfactual Estimation*
(Diff-SCM, CLeaR 2022) and Komanduri et al., *Causal Diffusion Autoencoders* (ECAI 2024).
The image ``x`` (float ``[n, C, H, W]`` or ``[n, C, D, H, W]``, intensities roughly in
[0, 1]; the network sees ``2 x - 1``) given its parents ``pa`` is modelled by a
conditional denoiser: MONAI's ``DiffusionModelUNet`` (``spatial_dims`` 2 or 3 from the
variable's shape) trained with MONAI's ``DDPMScheduler`` (``T`` steps, ``prediction``
``"v"`` or ``"eps"``) on

    x_t = sqrt(abar_t) x + sqrt(1 - abar_t) e,   e ~ N(0, I).

**Conditioning.** The parent vector goes through an MLP to an embedding that is added
to the UNet's time embedding, so it modulates every residual block. Classifier-free
guidance (Ho & Salimans 2022): during training the parent embedding of a fraction
``cfg_dropout`` of the rows is replaced by a learned null embedding (the rows are a
stratified subset of the batch: ``floor`` or ``ceil`` of ``cfg_dropout * n`` rows, so every
batch of ``>= 1 / cfg_dropout`` rows has some and the null embedding receives gradient in
every loss call). At query time the
noise prediction is ``e_null + w (e_pa - e_null)`` with ``w = guidance`` (``w = 1``:
the plain conditional model, one network call per step; ``w > 1``: two).

**Semantic code** (``semantic_dim > 0``, in the spirit of CausalDiffAE): a small
convolutional encoder maps the image to a code ``z`` (a Gaussian posterior, KL-regularized
to N(0, I) with weight ``semantic_kl``) whose projection is added to the conditioning, so
a unit's identity is carried by a compact code as well as by the inverted noise. The code
is abducted (posterior mean) and held fixed under interventions.

**Abduction** (``deterministic-approximate``): deterministic DDIM inversion (eta = 0) of
the observed scan under its *observed* parents from level 0 to level ``depth * T``
(Diff-SCM's progression ratio; ``depth = 1`` by default: full inversion), in
``round(steps * depth)`` moves. Each inversion move is solved by Anderson-accelerated
fixed-point iteration (``inversion_iters`` at most, until the update is below
``inversion_tol``) so that it is the exact inverse of the generation move, as in
:mod:`medcausal.mechanisms.diffusion` (whose ``ddim_move`` and ``ddim_invert_move`` it
reuses). On a trained denoiser the first, low-noise move is the hard one (the denoiser is
close to a projection onto the data there, so plain iteration contracts slowly): on the
brain benchmark's 32x32 model plain iteration capped at 4 left a 2e-2 round-trip error,
Anderson capped at 20 about 1e-3 at nearly the same number of network calls
(``benchmarks/results/ddim_inversion.md``). **Prediction**: DDIM generation from that latent under
the new parents, with the same guidance. The noise of a unit is one flat tensor
``[semantic code, latent at depth * T]`` per row; ``noise_like`` draws it from the prior
N(0, I), which is the model's noise distribution at ``depth = 1`` only
(``sample(pa)`` without noise always generates from full depth).

**The two knobs** (query-time settings; no retraining; ``set_knobs`` or per call of
:meth:`ImageDiffusionMechanism.counterfactual`):

- ``depth`` in (0, 1]: how far the scan is noised before it is re-generated. Small depth
  keeps the scan close to the original (*minimality*: only detail the last few denoising
  steps control can change) but the new parents can only make small changes
  (*effectiveness* falls); full depth lets the parents reshape the whole image, and the
  unit's identity is then carried only by the deterministic latent (and the code).
- ``guidance`` ``w >= 1``: amplifies the parents' effect on each denoising step (more
  effective counterfactuals), at the cost of minimality and realism (over-saturated
  images when ``w`` is large). Needs ``cfg_dropout > 0`` at training to differ from 1.
  The default is ``w = 1`` (no guidance): on the 32x32 brain benchmark, ``w = 2`` doubled
  the true-counterfactual MAE, and ``w = 1.5`` / ``2`` raised the FID of fresh samples from
  0.29 to 12 / 40 (the real-vs-real floor there is 0.14).

Both knobs leave null interventions exact: ``sample(pa, noise=abduct(x, pa))`` returns
``x`` within :attr:`reconstruction_tolerance` for any depth and guidance, since
generation and inversion use the same noise predictions.

Weights are averaged (EMA with warm-up, updated after each optimizer step of the training
loop); queries use the averaged weights unless ``use_ema=False``, and training keeps the
last weights rather than those of the best validation epoch (``select_by_validation``; as
for the tabular ``diffusion``, the denoising loss is a poor guide to the counterfactuals).

>>> import torch
>>> from medcausal.graph import Image
>>> m = ImageDiffusionMechanism(Image((1, 16, 16)), parents=2, channels=[8, 16], steps=10,
...                             norm_num_groups=4, cfg_dropout=0.2).eval()
>>> x, pa = torch.rand(3, 1, 16, 16), torch.randn(3, 2)
>>> m.loss(x, pa).shape
torch.Size([3])
>>> with torch.no_grad():
...     u = m.abduct(x, pa)                                  # full-depth DDIM inversion
...     again = m.sample(pa, noise=u)                        # generation under the same parents
...     cf = m.counterfactual(x, pa, pa + 1.0, depth=0.5, guidance=2.0)   # the two knobs
>>> bool((again - x).abs().max() < m.reconstruction_tolerance), cf.shape
(True, torch.Size([3, 1, 16, 16]))
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from ..errors import DataError, MedCausalError
from .base import AveragedWeights, Mechanism, StandaloneLoss, mlp, randn
from .diffusion import ddim_invert_move, ddim_move
from .registry import register

__all__ = ["ImageDiffusionMechanism", "TRAIN_SETTINGS", "ddim_grid"]

#: Training settings (``fit``'s defaults; CausalModel.fit's are tuned for tables).
TRAIN_SETTINGS = {"batch_size": 32, "lr": 1e-3, "max_epochs": 200, "patience": 20}

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def ddim_grid(end: int, steps: int) -> list[int]:
    """The DDIM levels ``0 = k_0 < ... < k_S = end`` (evenly spaced, rounded, unique).

    >>> ddim_grid(1000, 4), ddim_grid(300, 3)
    ([0, 250, 500, 750, 1000], [0, 100, 200, 300])
    """
    if end < 1 or steps < 1:
        raise MedCausalError(f"image-diffusion: need end >= 1 and steps >= 1, got end={end}, steps={steps}")
    return sorted(set(torch.linspace(0, end, min(steps, end) + 1).round().long().tolist()))


def _spread(n: int, device, dtype=torch.float32, golden: bool = True) -> torch.Tensor:
    """``n`` points in [0, 1) from one uniform offset ``o`` (for a single row: a plain uniform
    draw, so the per-record loss under ``vmap`` keeps its distribution). ``golden``: the
    low-discrepancy sequence ``frac(o + i g)`` (the timesteps); otherwise the stratified
    ``(i + o) / n`` (the dropped rows: exactly ``floor`` or ``ceil`` of ``p n`` fall below
    ``p``; these are the first rows of a batch, which the training loop shuffles)."""
    offset = torch.rand(1, device=device, dtype=dtype)
    i = torch.arange(n, device=device, dtype=dtype)
    return torch.remainder(offset + _GOLDEN * i, 1.0) if golden else (i + offset) / max(n, 1)


class _Cond(nn.Module):
    """The conditioning embedding: MLP(parents) (or the null embedding for dropped rows) plus a
    projection of the semantic code; it replaces the UNet's class embedding, so its input is the
    float tensor ``[parents, drop flag, code]``."""

    def __init__(self, parent_dim: int, semantic_dim: int, emb_dim: int, hidden: int, cfg: bool):
        super().__init__()
        self.parent_dim, self.semantic_dim = parent_dim, semantic_dim
        self.parents = mlp(parent_dim, emb_dim, (hidden,)) if parent_dim else None
        self.null = nn.Parameter(0.02 * torch.randn(emb_dim)) if (cfg and parent_dim) else None
        self.code = nn.Linear(semantic_dim, emb_dim) if semantic_dim else None

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        p = self.parent_dim
        out = 0.0
        if self.parents is not None:
            emb = self.parents(c[:, :p])
            if self.null is not None:
                drop = c[:, p:p + 1]
                emb = emb * (1 - drop) + self.null * drop
            out = out + emb
        if self.code is not None:
            out = out + self.code(c[:, p + 1:])
        return out


class _Encoder(nn.Module):
    """Image -> Gaussian posterior of the semantic code (mean, log-variance)."""

    def __init__(self, dims: int, c_in: int, ch: int, levels: int, semantic_dim: int):
        super().__init__()
        Conv = nn.Conv2d if dims == 2 else nn.Conv3d
        layers, c = [], c_in
        for i in range(levels):
            layers += [Conv(c, ch * 2 ** i, 3, stride=2, padding=1), nn.SiLU()]
            c = ch * 2 ** i
        self.conv = nn.Sequential(*layers)
        self.head = nn.Linear(c, 2 * semantic_dim)

    def forward(self, x):
        h = self.conv(x).flatten(2).mean(-1)
        mu, logvar = self.head(h).chunk(2, dim=-1)
        return mu, logvar.clamp(-10.0, 5.0)


class _Net(nn.Module):
    """UNet + conditioning + optional encoder; ``forward(op, ...)`` dispatches, so the EMA
    weights can be swapped in with ``torch.func.functional_call``."""

    def __init__(self, shape, parent_dim, channels, num_res_blocks, attention_levels, norm_num_groups,
                 num_head_channels, cond_hidden, cfg, semantic_dim, init_scale):
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        dims = len(shape) - 1
        self.conditioned = parent_dim > 0 or semantic_dim > 0
        self.unet = DiffusionModelUNet(
            spatial_dims=dims, in_channels=shape[0], out_channels=shape[0], channels=list(channels),
            num_res_blocks=num_res_blocks, attention_levels=list(attention_levels),
            norm_num_groups=norm_num_groups, num_head_channels=num_head_channels,
            num_class_embeds=1 if self.conditioned else None)
        # MONAI zero-initializes the output convolution and each residual block's last layer
        # (and the attention output): no gradient would reach anything else on the first step.
        # Start them small instead.
        for mod in self.unet.modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, (nn.Conv2d, nn.Conv3d, nn.Linear)) and w is not None and not w.detach().any():
                mod.reset_parameters()
                with torch.no_grad():
                    for p in mod.parameters():
                        p.mul_(init_scale)
        if self.conditioned:
            emb_dim = self.unet.class_embedding.embedding_dim
            self.unet.class_embedding = _Cond(parent_dim, semantic_dim, emb_dim, cond_hidden, cfg)
        self.encoder = _Encoder(dims, shape[0], int(channels[0]), len(channels), semantic_dim) \
            if semantic_dim else None

    def forward(self, op: str, *args):
        if op == "unet":
            x, t, c = args
            return self.unet(x, timesteps=t, class_labels=c if self.conditioned else None)
        if op == "encode":
            return self.encoder(args[0])
        raise ValueError(op)


@register
class ImageDiffusionMechanism(AveragedWeights, Mechanism):
    """Conditional diffusion model of an image variable with DDIM-inversion abduction.

    Hyperparameters (JSON-serializable): ``channels``, ``num_res_blocks``,
    ``attention_levels`` (default: none), ``norm_num_groups``, ``num_head_channels`` of
    MONAI's ``DiffusionModelUNet``; ``cond_hidden`` width of the parent MLP;
    ``num_train_timesteps`` ``T``, ``schedule``/``beta_start``/``beta_end`` of MONAI's
    ``DDPMScheduler``; ``prediction`` ``"v"`` or ``"eps"``; ``steps`` DDIM steps for a
    full-depth inversion or generation; ``depth`` (progression ratio) and ``guidance``
    (the two counterfactual knobs, see the module docstring); ``cfg_dropout`` fraction
    of rows trained without parents; ``semantic_dim`` (0: off) and ``semantic_kl``;
    ``inversion_iters``/``inversion_tol``/``inversion_window`` of the fixed-point solve
    (Anderson acceleration over the last ``inversion_window`` iterates; 0: plain); ``ema_decay``,
    ``use_ema``; ``init_scale`` of the layers MONAI starts at zero.

    >>> from medcausal.graph import Image
    >>> m = ImageDiffusionMechanism(Image((1, 8, 8, 8)), parents=1, channels=[4, 8],
    ...                             norm_num_groups=4, steps=4)        # a 3D volume
    >>> m.noise_like(2).shape                                         # flat: C*D*H*W per row
    torch.Size([2, 512])
    """

    name = "image-diffusion"
    query_settings = ("depth", "guidance")
    select_by_validation = False  # keep the last (averaged) weights; see the module docstring
    abduction = "deterministic-approximate"
    supports = ("image",)
    # Not yet verified exact under DP-SGD: torch.func.vmap cannot trace the batch-level
    # classifier-free-guidance dropout, and Opacus's ghost clipping of MONAI's UNet misses the
    # one-row-at-a-time gradients by ~1e-3 (tests/privacy/test_per_sample.py); so it refuses.
    dp_compatible = False
    dp_incompatible_reason = ("per-record gradients of its MONAI UNet with batch-level condition dropout are not "
                              "verified exact (vmap cannot trace the dropout; ghost clipping errs by ~1e-3); "
                              "use 'hvae' or 'cvae' for private image models")
    has_log_prob = False
    # Max |sample(pa, abduct(x, pa)) - x| in intensity units with the default solver
    # (Anderson, window 3, at most 20 iterations, inversion_tol=1e-4 on the [-1, 1] scale):
    # measured in tests/mechanisms/test_image_diffusion.py (small nets) and, on a denoiser trained
    # as in the brain benchmark, in benchmarks/results/ddim_inversion.md.
    reconstruction_tolerance: ClassVar[float] = 5e-3
    fit_defaults: ClassVar[dict] = {"max_epochs": 200, "patience": 20}
    train_settings: ClassVar[dict] = TRAIN_SETTINGS

    def __init__(self, variable, parents, channels=(32, 64, 64), num_res_blocks: int = 1,
                 attention_levels=None, norm_num_groups: int = 16, num_head_channels: int = 8,
                 cond_hidden: int = 128, num_train_timesteps: int = 1000, schedule: str = "linear_beta",
                 beta_start: float = 1e-4, beta_end: float = 0.02, prediction: str = "v", steps: int = 50,
                 depth: float = 1.0, guidance: float = 1.0, cfg_dropout: float = 0.1, semantic_dim: int = 0,
                 semantic_kl: float = 1e-3, inversion_iters: int = 20, inversion_tol: float = 1e-4,
                 inversion_window: int = 3, ema_decay: float = 0.999, use_ema: bool = True, init_scale: float = 0.1):
        channels = [int(c) for c in channels]
        attention_levels = [False] * len(channels) if attention_levels is None else [bool(a) for a in attention_levels]
        super().__init__(variable, parents, channels=channels, num_res_blocks=int(num_res_blocks),
                         attention_levels=attention_levels, norm_num_groups=int(norm_num_groups),
                         num_head_channels=int(num_head_channels), cond_hidden=int(cond_hidden),
                         num_train_timesteps=int(num_train_timesteps), schedule=str(schedule),
                         beta_start=float(beta_start), beta_end=float(beta_end), prediction=str(prediction),
                         steps=int(steps), depth=float(depth), guidance=float(guidance),
                         cfg_dropout=float(cfg_dropout), semantic_dim=int(semantic_dim),
                         semantic_kl=float(semantic_kl), inversion_iters=int(inversion_iters),
                         inversion_tol=float(inversion_tol), inversion_window=int(inversion_window),
                         ema_decay=float(ema_decay), use_ema=bool(use_ema), init_scale=float(init_scale))
        shape = tuple(getattr(variable, "shape", ()) or ())
        if getattr(variable, "kind", None) != "image" or len(shape) not in (3, 4):
            raise MedCausalError(f"image-diffusion models images (C, H, W) or volumes (C, D, H, W); "
                                 f"got variable {variable!r}")
        self.shape = shape
        if not channels or min(channels) < 1 or int(norm_num_groups) < 1 or int(num_head_channels) < 1:
            raise MedCausalError(f"image-diffusion: need channels a non-empty list of widths >= 1, "
                                 f"norm_num_groups >= 1 and num_head_channels >= 1; got channels {channels}, "
                                 f"norm_num_groups={norm_num_groups}, num_head_channels={num_head_channels}")
        if int(num_train_timesteps) < 1:
            raise MedCausalError(f"image-diffusion: num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise MedCausalError(f"image-diffusion: need 0 < beta_start <= beta_end < 1, got "
                                 f"beta_start={beta_start}, beta_end={beta_end}")
        down = 2 ** (len(channels) - 1)
        if any(s % down for s in shape[1:]):
            raise MedCausalError(f"image-diffusion: image shape {shape} is not divisible by {down} "
                                 f"(channels {channels}: {len(channels) - 1} downsamplings)")
        if any(c % int(norm_num_groups) for c in channels):
            raise MedCausalError(f"image-diffusion: norm_num_groups={norm_num_groups} must divide every "
                                 f"entry of channels {channels}")
        if len(attention_levels) != len(channels):
            raise MedCausalError(f"image-diffusion: attention_levels needs {len(channels)} entries "
                                 f"(one per channels entry), got {attention_levels}")
        if prediction not in ("v", "eps"):
            raise MedCausalError(f"image-diffusion: prediction must be 'v' or 'eps', got {prediction!r}")
        if not 0.0 <= cfg_dropout < 1.0:
            raise MedCausalError(f"image-diffusion: cfg_dropout must be in [0, 1), got {cfg_dropout}")
        if int(semantic_dim) < 0 or int(inversion_iters) < 0 or int(inversion_window) < 0 or int(steps) < 1:
            raise MedCausalError(f"image-diffusion: need semantic_dim >= 0, inversion_iters >= 0, "
                                 f"inversion_window >= 0, steps >= 1; got {semantic_dim}, {inversion_iters}, "
                                 f"{inversion_window}, {steps}")
        from monai.networks.schedulers import DDPMScheduler

        self.T = int(num_train_timesteps)
        self.prediction = prediction
        self.cfg = cfg_dropout > 0 and self.parent_dim > 0
        self.cfg_dropout = float(cfg_dropout)
        self.semantic_dim = int(semantic_dim)
        self.semantic_kl = float(semantic_kl)
        self.inversion_iters, self.inversion_tol = int(inversion_iters), float(inversion_tol)
        self.inversion_window = int(inversion_window)
        self.n_pixels = math.prod(shape)
        self.steps = int(steps)
        self.set_knobs(depth=depth, guidance=guidance)
        sched = DDPMScheduler(self.T, schedule=schedule, beta_start=beta_start, beta_end=beta_end,
                              prediction_type="v_prediction" if prediction == "v" else "epsilon",
                              clip_sample=False)
        object.__setattr__(self, "scheduler", sched)  # no state: not a submodule
        abar = torch.cat([torch.ones(1, dtype=torch.float64), sched.alphas_cumprod.double()])
        self._abar64 = abar.tolist()  # level k = 0..T; the network sees timestep k - 1
        self.net = _Net(shape, self.parent_dim, channels, int(num_res_blocks), attention_levels,
                        int(norm_num_groups), int(num_head_channels), int(cond_hidden), self.cfg,
                        self.semantic_dim, float(init_scale))
        self._init_ema(ema_decay, use_ema)

    # -- knobs -------------------------------------------------------------------------
    def set_knobs(self, depth: float | None = None, guidance: float | None = None) -> "ImageDiffusionMechanism":
        """Set the query-time ``depth`` (progression ratio) and ``guidance`` scale."""
        if depth is not None:
            self.depth = self.hparams["depth"] = self._check_depth(depth)
        if guidance is not None:
            self.guidance = self.hparams["guidance"] = self._check_guidance(guidance)
        return self

    def _check_depth(self, depth) -> float:
        depth = float(depth)
        if not 0.0 < depth <= 1.0:
            raise MedCausalError(f"image-diffusion: depth (progression ratio) must be in (0, 1], got {depth}")
        return depth

    def _check_guidance(self, guidance) -> float:
        guidance = float(guidance)
        if guidance < 0 or not math.isfinite(guidance):
            raise MedCausalError(f"image-diffusion: guidance must be a finite number >= 0, got {guidance}")
        if guidance != 1.0 and not getattr(self, "cfg", True):
            raise MedCausalError("image-diffusion: guidance != 1 needs classifier-free training "
                                 "(cfg_dropout > 0) and at least one parent")
        return guidance

    def _grid(self, depth: float) -> list[int]:
        end = max(1, round(depth * self.T))
        return ddim_grid(end, max(1, round(self.steps * depth)))

    # -- checks ------------------------------------------------------------------------
    def _check(self, value, parents) -> None:
        if not torch.is_tensor(parents) or parents.dim() != 2 or parents.shape[1] != self.parent_dim:
            got = tuple(parents.shape) if torch.is_tensor(parents) else type(parents).__name__
            raise DataError(f"image-diffusion: parents must be [n, {self.parent_dim}] "
                            f"({list(self.parent_dims)}), got {got}")
        if not torch.isfinite(parents).all():
            raise DataError(f"image-diffusion: parents have {int((~torch.isfinite(parents)).sum())} non-finite "
                            f"value(s) ({list(self.parent_dims)}); a NaN parent would give a NaN image")
        if value is not None:
            want = (parents.shape[0], *self.shape)
            if not torch.is_tensor(value) or tuple(value.shape) != want:
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise DataError(f"image-diffusion: image batch must have shape {want} (n, C, *spatial), got {got}")
            if not torch.isfinite(value).all():
                raise DataError(f"image-diffusion: image batch has {int((~torch.isfinite(value)).sum())} "
                                "non-finite value(s)")

    # -- the network ---------------------------------------------------------------------
    def _cond(self, parents, drop, code) -> torch.Tensor:
        parts = [parents, drop.unsqueeze(-1).to(parents)]
        if code is not None:
            parts.append(code.to(parents))
        return torch.cat(parts, dim=-1)

    def eps(self, x_t, level: int, parents, code=None, guidance: float | None = None, ema=None):
        """Guided noise prediction at DDIM level ``level`` (1..T) on the [-1, 1] scale."""
        n = x_t.shape[0]
        w = self.guidance if guidance is None else guidance
        t = torch.full((n,), level - 1, device=x_t.device, dtype=torch.long)
        zeros = x_t.new_zeros(n)
        if w != 1.0:
            c = torch.cat([self._cond(parents, zeros, code), self._cond(parents, zeros + 1, code)])
            out = self._run("unet", torch.cat([x_t, x_t]), torch.cat([t, t]), c, ema=ema)
            e_cond, e_null = self._to_eps(out, torch.cat([x_t, x_t]), level).chunk(2)
            return e_null + w * (e_cond - e_null)
        out = self._run("unet", x_t, t, self._cond(parents, zeros, code), ema=ema)
        return self._to_eps(out, x_t, level)

    def _to_eps(self, out, x_t, level):
        if self.prediction == "eps":
            return out
        ab = self._abar64[level]
        return math.sqrt(ab) * out + math.sqrt(1.0 - ab) * x_t

    def _code(self, x_scaled, ema=None):
        if not self.semantic_dim:
            return None
        return self._run("encode", x_scaled, ema=ema)[0]

    # -- training ------------------------------------------------------------------------
    def loss(self, value, parents):
        """Per-row DDPM loss (mean squared error of the ``v``/``eps`` target per pixel), plus
        ``semantic_kl`` times the code's KL when the semantic encoder is on. Timesteps and the
        rows trained without parents are stratified over the batch (one uniform draw each), so
        the per-record loss also works under ``torch.func.vmap``."""
        self._check(value, parents)
        value, parents = self._cast(value, parents)
        n, dev = value.shape[0], value.device
        x0 = value * 2.0 - 1.0
        t = (_spread(n, dev) * self.T).long().clamp_max(self.T - 1)
        drop = (_spread(n, dev, golden=False) < self.cfg_dropout).to(value.dtype) if self.cfg else value.new_zeros(n)
        code, kl = None, 0.0
        if self.semantic_dim:
            mu, logvar = self._run("encode", x0, ema=False)
            code = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            kl = 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar).sum(-1)
        e = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(x0, e, t)
        target = e if self.prediction == "eps" else self.scheduler.get_velocity(x0, e, t)
        out = self._run("unet", x_t, t, self._cond(parents, drop, code), ema=False)
        return ((out - target) ** 2).flatten(1).mean(1) + self.semantic_kl * kl

    # -- DDIM ----------------------------------------------------------------------------
    def invert(self, x_scaled, parents, code=None, depth=None, guidance=None) -> torch.Tensor:
        """DDIM inversion on the [-1, 1] scale from level 0 to ``depth * T``."""
        guidance = None if guidance is None else self._check_guidance(guidance)
        grid = self._grid(self.depth if depth is None else self._check_depth(depth))
        ab, x = self._abar64, x_scaled
        for a, b in zip(grid[:-1], grid[1:]):
            x = ddim_invert_move(x, lambda y: self.eps(y, b, parents, code, guidance),  # noqa: B023
                                 ab[a], ab[b], self.inversion_iters, self.inversion_tol, self.inversion_window)
        return x

    def generate(self, latent, parents, code=None, depth=None, guidance=None) -> torch.Tensor:
        """DDIM generation on the [-1, 1] scale from level ``depth * T`` to 0."""
        guidance = None if guidance is None else self._check_guidance(guidance)
        grid = self._grid(self.depth if depth is None else self._check_depth(depth))
        ab, x = self._abar64, latent
        for b, a in zip(grid[:0:-1], grid[-2::-1]):
            x = ddim_move(x, self.eps(x, b, parents, code, guidance), ab[b], ab[a])
        return x

    # -- the three verbs ------------------------------------------------------------------
    def noise_like(self, n, generator=None):
        return randn((n, self.semantic_dim + self.n_pixels), generator)

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    def abduct(self, value, parents, generator=None, depth=None, guidance=None):
        """DDIM inversion; runs on the mechanism's device, returns on the device of ``value``."""
        self._check(value, parents)
        if value.shape[0] == 0:
            return value.new_zeros(0, self.semantic_dim + self.n_pixels, dtype=self._dtype())
        dev = self._device()
        x0 = value.to(dev, self._dtype()) * 2.0 - 1.0
        pa = parents.to(dev, x0.dtype)
        code = self._code(x0)
        lat = self.invert(x0, pa, code, depth, guidance).flatten(1)
        out = lat if code is None else torch.cat([code, lat], dim=1)
        return out.to(value.device)

    def sample(self, parents, noise=None, generator=None, depth=None, guidance=None):
        self._check(None, parents)
        n, width = parents.shape[0], self.semantic_dim + self.n_pixels
        if noise is None:
            noise = self.noise_like(n, generator).to(parents)
            depth = 1.0  # a fresh sample starts from pure noise
        if not torch.is_tensor(noise) or tuple(noise.shape) != (n, width):
            got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
            raise DataError(f"image-diffusion: noise must be [{n}, {width}] (semantic code + pixels), got {got}")
        if n == 0:
            return noise.new_zeros(0, *self.shape, dtype=self._dtype())
        dev = self._device()
        pa = parents.to(dev, self._dtype())
        noise = noise.to(pa)
        code = noise[:, :self.semantic_dim] if self.semantic_dim else None
        lat = noise[:, self.semantic_dim:].reshape(n, *self.shape)
        return ((self.generate(lat, pa, code, depth, guidance) + 1.0) / 2.0).to(parents.device)

    def counterfactual(self, value, parents, new_parents, depth=None, guidance=None, generator=None):
        """Abduction under ``parents``, then prediction under ``new_parents`` (same knobs)."""
        self._check(value, new_parents)
        noise = self.abduct(value, parents, depth=depth, guidance=guidance)
        return self.sample(new_parents, noise=noise, depth=depth, guidance=guidance)

    def reconstruct(self, value, parents):
        """The null counterfactual (DDIM round trip); equals ``value`` within the tolerance."""
        with torch.no_grad():
            return self.counterfactual(value, parents, parents)

    # -- standalone training ------------------------------------------------------------
    def fit(self, value: torch.Tensor, parents: torch.Tensor, *, max_steps: int | None = None,
            max_epochs: int = 200, batch_size: int | None = None, lr: float | None = None,
            patience: int | None = None, val_fraction: float = 0.1, seed: int = 0,
            verbose: bool | None = None, device: str | None = None):
        """Train this mechanism alone on ``(value, parents)`` with :func:`medcausal.train.train`
        (defaults from :data:`TRAIN_SETTINGS`) on ``device`` (default: where the mechanism's
        weights are, so ``mech.to("cuda").fit(...)`` trains on the GPU); returns the ``TrainResult``.
        It trains to ``max_steps``/``max_epochs`` and keeps the last (averaged) weights:
        ``patience`` only paces the learning-rate halving on validation plateaus
        (``select_by_validation = False``). Standard practice for diffusion models (final
        EMA weights); the measurement behind it is the tabular ``diffusion``'s, not an
        image benchmark's.

        >>> from medcausal.graph import Image
        >>> m = ImageDiffusionMechanism(Image((1, 16, 16)), parents=1, channels=[8, 16], norm_num_groups=4)
        >>> m.fit(torch.rand(40, 1, 16, 16), torch.randn(40, 1), max_steps=2, verbose=False).steps
        2
        """
        from ..train import TrainConfig, forked_rng, train

        self._check(value, parents)
        s = self.train_settings
        config = TrainConfig(max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size or s["batch_size"],
                             lr=lr or s["lr"], patience=patience or s["patience"], val_fraction=val_fraction,
                             seed=seed, verbose=verbose, device=str(device or self._device()))
        with forked_rng(config.device, seed=seed):  # the caller's random state is left as it was
            return train(StandaloneLoss(self), {"x": value, "pa": parents}, config)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, parent_dim={self.parent_dim}, T={self.T}, steps={self.steps}, "
                f"depth={self.depth}, guidance={self.guidance}, semantic_dim={self.semantic_dim}")


