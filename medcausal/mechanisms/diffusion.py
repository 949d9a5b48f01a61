"""``diffusion``: a conditional diffusion model per variable (DCM).

Diffusion-based causal models (Chao, Blöbaum & Kasiviswanathan, TMLR 2024): each
variable ``x`` (a scalar or a vector, standardized) gets a network on ``(x_t, t, pa)``
trained with the DDPM denoising objective on the noised values

    x_t = sqrt(abar_t) x + sqrt(1 - abar_t) e,   e ~ N(0, I),   t uniform on 1..T,

for a fixed variance schedule ``beta_1..beta_T`` (``abar_t = prod_{s<=t} (1 - beta_s)``,
``abar_0 = 1``); its noise prediction is ``eps(x_t, t, pa)``. The exogenous noise of a
unit is its deterministic DDIM encoding (Song et al. 2021, eta = 0): DDIM run *forward*
from the observed value under the observed parents to ``t = T``. Prediction runs DDIM
*backward* from that latent under the new parents. One DDIM move from level ``a`` to
level ``b`` with noise prediction ``e`` is

    x_b = sqrt(abar_b) (x_a - sqrt(1 - abar_a) e) / sqrt(abar_a) + sqrt(1 - abar_b) e .

Decoding evaluates ``e = eps(x_b, b, pa)`` at the start of each backward move ``b -> a``.
The exact inverse of that move needs ``e`` at its *end*: encoding solves
``y = move(x_a; eps(y, b, pa))`` by (Anderson-accelerated) fixed-point iteration from the explicit guess
(``inversion_iters`` at most, until the update is below ``inversion_tol``), so
``decode(encode(x)) = x`` to ~1e-5 (the tests measure it; plain explicit DDIM
inversion, ``inversion_iters=0``, is off by 0.1-0.4 sd at 25-50 steps). Abduction is
``deterministic-approximate``; the loss is the denoising objective, so there is no
exact likelihood. Abduction and prediction are batched over all units: one network
call per DDIM step when decoding, 2 or more per step when encoding.

Choices beyond the paper, each measured on the DCM benchmark SCMs (see
``benchmarks/diffusion_steps.py``, ``benchmarks/diffusion_preconditioner.py`` and the
tests): the network predicts ``v = sqrt(abar) e - sqrt(1 - abar) x`` (Salimans & Ho 2022;
``prediction="eps"`` is the paper's parametrization, 2-7x worse counterfactuals here), its
output layer starts near 0 (``init_scale``; for standardized data that is the N(0, 1)
denoiser), and each row's loss averages ``draws`` noise levels stratified over ``1..T``.
A location-scale preconditioner (``loc_scale``) ``x~ = (x - mu(pa)) / sigma(pa)``, fitted
by Gaussian likelihood, hands the diffusion the residual; the denoiser is conditioned on
``(mu, log sigma)`` (``condition="affine"``) rather than on the parents (``"parents"``, the
paper's input) or on both (``"both"``). Why: counterfactual parents often lie off the
training manifold (on the additive diamond, ``do(x3)`` pairs every unit's ``x2`` with one
``x3``), and a denoiser of the raw parents extrapolates there arbitrarily (CF MSE x100 of
that query 129 with the denoiser vs 6 with the preconditioner alone); ``(mu, log sigma)``
stays in its training range. Measured (CF MSE x100, all variables diffusion, flow in
brackets): non-additive triangle affine 2.5 / both 7.5 / parents 22.0 (1.9); additive
diamond 2.5 / 2.6 / 13.9 (2.4); non-additive vector 7.4 / 8.6 / 7.4 (7.6). The cost: a
residual shape that depends on the parents in other ways (the vector SCM's rotating noise)
is only as well resolved as ``(mu, log sigma)`` resolves the parents; with only ``x3``
modelled by diffusion (the slow vector test) the mean CF MSE over fit seeds 0-2 is 0.189
(affine), 0.275 (both), 0.197 (parents) against flow 0.172, each spreading 0.03-0.14 over
seeds. The denoising
loss's value is counted in the units of ``x`` (times ``sigma^2``, so model selection cannot
prefer a wider preconditioner), its gradient is that of the standardized residual with every
row weighted equally (``sigma^2``-weighted gradients left the rows of small ``sigma``, where
the residual's shape matters most, untrained: the non-additive triangle stopped at epoch 23
near its Gaussian start, CF MSE x100 18.8, now 2.5). The schedule follows the paper
(``T = 100``, ``beta`` linear from 1e-4 to 0.1); ``steps`` (the DDIM steps of encoding and
decoding) defaults to 25, the knee of the accuracy-vs-time curve (non-additive triangle:
CF MSE x100 2.64 / 2.12 / 2.03 / 2.01 at 10 / 25 / 50 / 100 steps, 25 within 6% of 100 at 31%
of the time; on the additive diamond 2.55-2.63 whatever the steps;
``benchmarks/results/diffusion_steps*.md``). Training keeps the *last* denoiser
weights, averaged (EMA, ``ema_decay``), for ``fit_defaults``' 300 epochs, not the
best-validation epoch, because the denoising loss flattens long before the counterfactuals
converge (see ``select_by_validation`` below). The conditioning measurements
(``diffusion_preconditioner*.md``) predate that choice; the current figures are in
``benchmarks/results/tabular_scm*.md``. Queries hand a unit whose preconditioner location
lies beyond ``location_window`` (8 sd) to the Gaussian, the preconditioner alone, because
the denoiser extrapolates arbitrarily there (see ``_window``), show the denoiser the nearest
conditioning inside the training rows' box and clamp ``log sigma`` to it (``training_box``;
see :meth:`DiffusionMechanism._query`), and clamp abducted latents to ``±latent_bound`` (5;
see :meth:`DiffusionMechanism.abduct`). All act only on queries.

The preconditioner is a deep ensemble (Lakshminarayanan et al. 2017): ``loc_scale_members``
(5) MLPs, each fitted on its own Gaussian likelihood, averaged. Why: where counterfactual
parents leave the training manifold, one MLP's extrapolation depends on its initialization
(the additive diamond's ``do(x2)`` error on ``x3`` ranged 0.8-11 over init seeds), and the
preconditioner's error there is most of the diffusion's (on those queries the same fit with
the denoiser switched off is within 3%). Averaging shrinks that variance. Measured on fit
seeds 0-2, CF MSE x100 of 1 -> 5 members: additive diamond 3.00 -> 2.52, non-additive
triangle 2.73 -> 2.25; 10 members 3.84 and 2.39 (one diamond seed whose x4 denoiser learnt a
spurious dependence on its conditioning: 6.31). Wider or narrower members extrapolate worse
(5 members of 128x128: diamond 5.01; of 32x32: 3.58 and 5.88 on seeds 0 and 1). On the
vector SCM, seed 0: additive 4.56 -> 2.92, non-additive 6.38 -> 6.29. The ensemble costs
25-35% more fitting time (diamond: 90-98 -> 121-124 CPU s). Tried and not kept (each
helped one SCM and hurt others): keeping each member at its best validation epoch, and
clamping the denoiser's conditioning alone to its training range at query time. Queries now
clamp both the conditioning and the preconditioner's scale (``training_box``, see
:meth:`DiffusionMechanism._query`).

>>> import torch
>>> from medcausal.graph import Continuous
>>> m = DiffusionMechanism(Continuous(dim=2), parents=1, hidden=[16, 16], steps=20)
>>> pa, x = torch.randn(5, 1), torch.randn(5, 2)
>>> u = m.abduct(x, pa)                     # DDIM encoding: the units' noise
>>> u.shape
torch.Size([5, 2])
>>> bool((m.sample(pa, noise=u) - x).abs().max() < 1e-3)   # DDIM decoding reproduces x
True
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch
from torch import nn

from ..errors import MedCausalError, OutOfSupportWarning, warn
from .base import AveragedWeights, Mechanism, mlp, randn
from .registry import register

__all__ = ["DiffusionMechanism", "linear_beta_schedule", "ddim_timesteps", "ddim_move", "ddim_invert_move"]


def linear_beta_schedule(num_train_timesteps: int, beta_start: float = 1e-4,
                         beta_end: float = 0.1) -> torch.Tensor:
    """``abar_t`` for ``t = 0..T`` of a linear beta schedule (float64, ``abar_0 = 1``).

    >>> abar = linear_beta_schedule(100)
    >>> abar.shape, float(abar[0])
    (torch.Size([101]), 1.0)
    >>> round(float(abar[-1]), 4)   # prod(1 - beta_t): the signal left at t = T
    0.0056
    """
    if num_train_timesteps < 1:
        raise MedCausalError(f"diffusion: num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise MedCausalError(f"diffusion: need 0 < beta_start <= beta_end < 1, got "
                             f"beta_start={beta_start}, beta_end={beta_end}")
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The DDIM grid ``0 = t_0 < t_1 < ... < t_S = T`` (evenly spaced, rounded).

    >>> ddim_timesteps(100, 4)
    [0, 25, 50, 75, 100]
    """
    if not 1 <= steps <= num_train_timesteps:
        raise MedCausalError(f"diffusion: steps must be in [1, {num_train_timesteps}] "
                             f"(num_train_timesteps), got {steps}")
    grid = torch.linspace(0, num_train_timesteps, steps + 1).round().long().tolist()
    return sorted(set(grid))


def ddim_move(x: torch.Tensor, eps: torch.Tensor, abar_a: float, abar_b: float) -> torch.Tensor:
    """One deterministic DDIM move of ``x`` from noise level ``abar_a`` to ``abar_b``.

    >>> x, e = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    >>> back = ddim_move(ddim_move(x, e, 1.0, 0.5), e, 0.5, 1.0)   # same eps: reversible
    >>> round(back.item(), 6)
    1.0
    """
    x0 = (x - math.sqrt(1.0 - abar_a) * eps) / math.sqrt(abar_a)
    return math.sqrt(abar_b) * x0 + math.sqrt(1.0 - abar_b) * eps


def ddim_invert_move(x: torch.Tensor, eps_at, abar_a: float, abar_b: float, iters: int,
                     tol: float, window: int = 3) -> torch.Tensor:
    """The exact inverse of a DDIM decoding move ``b -> a``: ``y`` with ``y = move(x; eps_at(y))``.

    Decoding evaluates the noise prediction at the start of its move, so encoding must
    solve for the end point ``y = g(y)``, ``g(y) = move(x; eps_at(y))``, from the explicit
    guess ``g(x)``: at most ``iters`` further evaluations of ``g``, until the update is
    below ``tol``. With ``window > 0`` the iteration is Anderson-accelerated (type II,
    Walker & Ni 2011; one least-squares mixing of the last ``window`` iterates per row):
    on a trained denoiser's low-noise moves, where plain iteration contracts slowly, it
    reaches the tolerance in a few steps (``benchmarks/results/ddim_inversion.md``);
    ``window=0`` is plain fixed-point iteration. The result is always ``g`` of the last
    iterate.

    >>> x = torch.tensor([[0.3]])
    >>> y = ddim_invert_move(x, lambda z: 0.5 * z, 0.9, 0.5, iters=50, tol=1e-7)
    >>> back = ddim_move(y, 0.5 * y, 0.5, 0.9)          # the decoding move from b to a
    >>> round(back.item(), 5)
    0.3
    """
    if iters < 0 or window < 0:
        raise MedCausalError(f"ddim_invert_move: need iters >= 0 and window >= 0, got iters={iters}, "
                             f"window={window}")

    def g(y):
        return ddim_move(x, eps_at(y), abar_a, abar_b)

    y = g(x)
    if iters < 1 or y.numel() == 0:
        return y
    shape, y = y.shape, y.flatten(1)
    f = g(y.view(shape)).flatten(1) - y  # g(y) - y: the update plain iteration would make
    dys: list[torch.Tensor] = []
    dfs: list[torch.Tensor] = []
    for _ in range(iters - 1):
        if f.abs().max().item() <= tol:
            break
        step = f
        if dys:  # mix the last iterates: minimize |f - dF gamma| per row
            dy, df = torch.stack(dys, -1), torch.stack(dfs, -1)  # [n, d, m]
            gram = (df.transpose(1, 2) @ df).double()
            ridge = 1e-10 * (1.0 + gram.diagonal(dim1=1, dim2=2).amax(-1))
            gram = gram + ridge[:, None, None] * torch.eye(len(dys), dtype=gram.dtype, device=gram.device)
            gamma = torch.linalg.solve(gram, (df.transpose(1, 2) @ f.unsqueeze(-1)).double()).to(f.dtype)
            step = f - ((dy + df) @ gamma).squeeze(-1)
        y_next = y + step
        f_next = g(y_next.view(shape)).flatten(1) - y_next
        if window > 0:
            dys, dfs = (dys + [y_next - y])[-window:], (dfs + [f_next - f])[-window:]
        y, f = y_next, f_next
    return (y + f).view(shape)


class _TimeEmbedding(nn.Module):
    """Sinusoidal features of ``t / T`` (fixed frequencies, no parameters)."""

    def __init__(self, n_freq: int):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32),
                             persistent=False)

    @property
    def dim(self) -> int:
        return 1 + 2 * self.freqs.numel()

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # s: [n, 1] in [0, 1]
        a = s * self.freqs
        return torch.cat([s, torch.sin(a), torch.cos(a)], dim=-1)


@register
class DiffusionMechanism(AveragedWeights, Mechanism):
    """Diffusion-based causal mechanism (DCM) for continuous scalars and vectors.

    Hyperparameters (JSON-serializable, saved in the model file): ``hidden`` widths of
    the MLP on ``(x_t, parents, embedding of t)``; ``num_train_timesteps`` ``T`` and the
    linear ``beta_start``/``beta_end`` schedule; ``steps`` DDIM steps of abduction and
    prediction; ``inversion_iters``/``inversion_tol`` the fixed-point solve of each
    encoding step; ``draws`` noise levels per row in the loss; ``time_freqs``
    sinusoidal frequencies of the step embedding; ``prediction`` ``"v"`` or ``"eps"``;
    ``init_scale`` the factor on the initial output layer; ``location_window`` (standardized
    units; ``None``: off) where queries hand a unit whose preconditioner location lies beyond it
    over to the Gaussian (see ``_window``); ``latent_bound`` the clamp on each coordinate of an
    abducted latent (``None``: off; see :meth:`abduct`); ``training_box`` whether queries clamp
    the denoiser's conditioning and ``log sigma`` to the training rows' range (see
    :meth:`_query`); ``loc_scale`` (and its MLPs' ``loc_scale_hidden``) the location-scale
    preconditioner, the average of ``loc_scale_members`` MLPs each fitted on its own likelihood;
    ``condition`` what the denoiser sees of the parents: ``"affine"`` the preconditioner's ``(mu, log sigma)`` (with
    ``loc_scale``), ``"parents"`` the parents, ``"both"`` the two side by side
    (without ``loc_scale`` every setting means ``"parents"``); ``ema_decay``/``use_ema`` the
    averaged denoiser weights that queries use (training keeps the last weights, not the
    best-validation ones: see ``select_by_validation``).

    >>> import torch
    >>> from medcausal.graph import Continuous
    >>> m = DiffusionMechanism(Continuous(), parents=2, hidden=[16], steps=10)
    >>> m.loss(torch.randn(8, 1), torch.randn(8, 2)).shape
    torch.Size([8])
    >>> m.noise_like(3).shape
    torch.Size([3, 1])
    """

    name = "diffusion"
    query_settings = ("steps",)
    # finalize() records the training box, made of records' values: under DP it is not run (no
    # private version is needed; queries then go without the box).
    skip_finalize_under_dp = True
    abduction = "deterministic-approximate"
    supports = ("continuous",)
    has_log_prob = False
    # Max |decode(encode(x)) - x| in standardized units with the default solver settings
    # (inversion_tol=1e-5); measured 1e-6 - 1e-4 on untrained and trained networks, 10 to
    # 100 steps (tests/mechanisms/test_diffusion.py, benchmarks/diffusion_steps.py).
    reconstruction_tolerance = 1e-3
    # The denoising validation loss is no guide to the counterfactuals: on the non-additive
    # triangle every mechanism's is flat within 0.01 from epoch ~20 while the CF MSE x100 falls
    # from 19.7 to 2.3 by epoch 150; its best-validation epochs (x2: 90, x3: 65) would keep
    # weights with CF MSE 10.6 (benchmarks/results/diffusion_training_curve_*.md). Without
    # averaging, the last weights wandered between 2.0 and 3.1 from epoch to epoch. So the loop
    # keeps the last weights, averaged (EMA), and trains the full max_epochs unless other
    # mechanisms' patience stops it first (fit_defaults: read by CausalModel.fit).
    select_by_validation = False
    fit_defaults: ClassVar[dict] = {"max_epochs": 300, "patience": 100}

    def __init__(self, variable, parents, hidden: tuple[int, ...] | list[int] = (128, 128, 128),
                 num_train_timesteps: int = 100, beta_start: float = 1e-4, beta_end: float = 0.1,
                 steps: int = 25, inversion_iters: int = 10, inversion_tol: float = 1e-5,
                 draws: int = 4, time_freqs: int = 6, prediction: str = "v", init_scale: float = 0.01,
                 loc_scale: bool = True, loc_scale_hidden: tuple[int, ...] | list[int] = (64, 64),
                 loc_scale_members: int = 5, condition: str = "affine", ema_decay: float = 0.995,
                 use_ema: bool = True,
                 location_window: float | None = 8.0, latent_bound: float | None = 5.0,
                 training_box: bool = True):
        super().__init__(variable, parents, hidden=list(hidden), num_train_timesteps=num_train_timesteps,
                         beta_start=beta_start, beta_end=beta_end, steps=steps,
                         inversion_iters=inversion_iters, inversion_tol=inversion_tol, draws=draws,
                         time_freqs=time_freqs, prediction=prediction, init_scale=init_scale,
                         loc_scale=bool(loc_scale), loc_scale_hidden=list(loc_scale_hidden),
                         loc_scale_members=int(loc_scale_members),
                         condition=condition, ema_decay=float(ema_decay), use_ema=bool(use_ema),
                         location_window=location_window, latent_bound=latent_bound,
                         training_box=training_box)
        for key, bound in (("location_window", location_window), ("latent_bound", latent_bound)):
            if bound is not None and not (isinstance(bound, numbers.Real) and not isinstance(bound, bool)
                                          and math.isfinite(bound) and bound > 0):
                raise MedCausalError(f"diffusion: {key} must be a finite number > 0 or None, got {bound!r}")
        self.location_window = None if location_window is None else float(location_window)
        self.latent_bound = None if latent_bound is None else float(latent_bound)
        if not isinstance(training_box, bool):
            raise MedCausalError(f"diffusion: training_box must be True or False, got {training_box!r}")
        self.training_box = training_box
        if condition not in ("affine", "parents", "both"):
            raise MedCausalError(f"diffusion: condition must be 'affine', 'parents' or 'both', "
                                 f"got {condition!r}")
        if prediction not in ("eps", "v"):
            raise MedCausalError(f"diffusion: prediction must be 'eps' or 'v', got {prediction!r}")
        self.prediction = prediction
        if int(draws) < 1 or int(inversion_iters) < 0:
            raise MedCausalError(f"diffusion: need draws >= 1 and inversion_iters >= 0, got "
                                 f"draws={draws}, inversion_iters={inversion_iters}")
        self.dim = int(variable.dim)
        self.T = int(num_train_timesteps)
        self.steps = int(steps)
        self.inversion_iters = int(inversion_iters)
        self.inversion_tol = float(inversion_tol)
        self.draws = int(draws)
        # The denoiser's conditioning: the preconditioner's (mu, log sigma) ("affine", with
        # loc_scale), the parents themselves ("parents"), or both side by side ("both").
        self.affine_cond = bool(loc_scale) and condition in ("affine", "both")
        self.parent_cond = not self.affine_cond or condition == "both"
        cond_dim = (self.dim + 1 if self.affine_cond else 0) + (self.parent_dim if self.parent_cond else 0)
        self.grid = ddim_timesteps(self.T, self.steps)  # validates steps
        abar = linear_beta_schedule(self.T, beta_start, beta_end)
        # float64 copy for the DDIM coefficients (python floats), float32 for training.
        self._abar64 = abar.tolist()
        self.register_buffer("abar", abar.float(), persistent=False)
        if int(time_freqs) < 0 or any(int(h) < 1 for h in hidden):
            raise MedCausalError(f"diffusion: need time_freqs >= 0 and hidden widths >= 1, got "
                                 f"time_freqs={time_freqs}, hidden={list(hidden)}")
        self.embed = _TimeEmbedding(int(time_freqs))
        dims = (self.dim + cond_dim + self.embed.dim, *[int(h) for h in hidden])
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(dims[-1], self.dim))
        self.net = nn.Sequential(*layers)
        # Location-scale preconditioner x~ = (x - mu(pa)) / sigma(pa), sigma one scalar per row
        # (isotropic, so a vector's noise map keeps its shape): fitted by Gaussian likelihood,
        # the diffusion models x~ given (mu, log sigma) or pa. Units far outside the training
        # range then reach the denoiser as residuals of ordinary size.
        if int(loc_scale_members) < 1:
            raise MedCausalError(f"diffusion: loc_scale_members must be >= 1, got {loc_scale_members}")
        self.loc_scale = nn.ModuleList(
            mlp(self.parent_dim, self.dim + 1, tuple(int(h) for h in loc_scale_hidden))
            for _ in range(int(loc_scale_members))) if loc_scale else None
        with torch.no_grad():
            # Start near output 0: with prediction "v" that is the denoiser of a standard normal
            # variable (x0 = sqrt(abar) x_t), the right start for standardized data; and
            # mu = 0, sigma = 1.
            last = [self.net[-1]] + ([m[-1] for m in self.loc_scale] if loc_scale else [])
            for layer in last:
                for p in layer.parameters():
                    p.mul_(init_scale)
        # The box (per-coordinate min and max) of (mu, log sigma, parents) over the training rows,
        # recorded by finalize(); +-inf: unknown (under DP, and in model files from before it).
        box_dim = self.dim + 1 + self.parent_dim
        self.register_buffer("box_lo", torch.full((box_dim,), -math.inf))
        self.register_buffer("box_hi", torch.full((box_dim,), math.inf))
        self._init_ema(ema_decay, use_ema)  # of the denoiser (the preconditioner keeps its last weights)
        self._register_load_state_dict_pre_hook(self._upgrade_state)

    def _upgrade_state(self, state_dict, prefix, *args) -> None:
        """Read model files written before the preconditioner became an ensemble or before the
        training box was recorded (it stays unknown): queries answer exactly as they did (but for
        ``latent_bound``)."""
        for key, fill in (("box_lo", -math.inf), ("box_hi", math.inf)):
            state_dict.setdefault(prefix + key, torch.full_like(getattr(self, key), fill))
        if self.loc_scale is None:
            return
        # One MLP ("loc_scale.<layer>.<param>"): it becomes member 0. Files list the members they
        # have (the model file keeps the user's settings, not the defaults of its time).
        head = prefix + "loc_scale."
        old = [k for k in state_dict if k.startswith(head) and k[len(head):].count(".") == 1]
        for k in old:
            state_dict[head + "0." + k[len(head):]] = state_dict.pop(k)
        members = {int(k[len(head):].split(".")[0]) for k in state_dict if k.startswith(head)}
        if members and len(members) < len(self.loc_scale):
            self.loc_scale = nn.ModuleList(self.loc_scale[:len(members)])
            self.hparams["loc_scale_members"] = len(members)

    # -- the noise-prediction network ---------------------------------------------
    def _cond(self, parents: torch.Tensor, mu: torch.Tensor | None = None,
              log_sigma: torch.Tensor | None = None) -> torch.Tensor:
        """What the denoiser is conditioned on: ``(mu, log sigma)`` of the preconditioner
        (``condition="affine"``; no gradient flows back into the preconditioner), the parents
        (``"parents"``), or ``(mu, log sigma, parents)`` (``"both"``)."""
        if not self.affine_cond:
            return parents
        if mu is None:
            mu, log_sigma = self._affine(parents)
        affine = torch.cat([mu, log_sigma], dim=-1).detach()
        return torch.cat([affine, parents], dim=-1) if self.parent_cond else affine

    def _raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, ema: bool | None = None) -> torch.Tensor:
        s = (t.to(x_t.dtype) / self.T).reshape(-1, 1)
        return self._run(torch.cat([x_t, cond.to(x_t.dtype), self.embed(s)], dim=-1), ema=ema)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """The noise prediction of abduction and prediction: the Gaussian denoiser's
        ``sqrt(1 - abar) x_t`` plus the network's departure from it, the departure faded out
        (``_window``) where the preconditioner's location leaves the range of any training data."""
        if not torch.is_tensor(t):
            t = torch.full((x_t.shape[0],), int(t), device=x_t.device)
        out = self._raw(x_t, t, cond)
        ab = self.abar[t].unsqueeze(-1)
        gauss = (1 - ab).sqrt() * x_t
        departure = out - gauss if self.prediction == "eps" else ab.sqrt() * out
        return gauss + self._window(cond) * departure

    def _window(self, cond: torch.Tensor) -> torch.Tensor | float:
        """``sigmoid(4 (location_window - max |mu|))`` per row: 1 within a few sd of the
        variable's mean, 0 beyond ``location_window`` sd, where the denoiser never saw data.

        Why: a unit far outside the training data (on the additive diamond, one factual unit
        with ``x1 = -4.8``, ``x3 = 202``) reaches the denoiser with a location ``mu`` far outside
        its training range; the denoiser extrapolates there arbitrarily (that one unit's squared
        error 297, the query's CF MSE x100 76.7), while the Gaussian, i.e. the preconditioner alone,
        answers it as a location-scale model (the query's CF MSE 2.8; with this window 3.2). The
        window hands such units to the Gaussian, like the linear tails of a spline flow. Only
        queries use it; training is unchanged.
        Measured on the same trained models, fit seeds 0-2 of the eight scalar DCM SCMs (CF MSE
        x100, no window -> ``location_window=8``): additive diamond seeds 1 and 2 7.47 -> 2.58 and
        4.00 -> 3.20, seed 0 3.16 -> 3.22; every other SCM and seed within 0.6%. Bounds 3 and 4
        cost the non-additive triangle up to 30% and 8% (seed 0 2.33 -> 3.04 at 3): rows inside
        the training range need the denoiser.

        Tried and not kept: fading the departure also where the conditioning leaves the box
        (per-coordinate min and max) of the training rows' conditioning, linearly to 0 at a
        margin beyond it. It rescued the additive diamond's fit seed 4 (CF MSE x100 15.20 ->
        6.74 at margin 0.1: ``do(x3)`` gave x4 a ``log sigma`` of -0.27 where training spans
        [-1.59, -0.62], and the denoiser mapped a latent of 0.06 to a residual of 6.4) but cost
        the vector SCM its lead (additive, fit seeds 0-2: 3.99 -> 5.42 at margin 0.1, 5.04 at 1.0;
        the additive mechanism's 5.27) and the additive chain 12% (0.136 -> 0.152);
        ``benchmarks/results/diffusion_range_window_tried.md``."""
        if self.location_window is None or not self.affine_cond:
            return 1.0
        far = cond[:, :self.dim].abs().amax(-1, keepdim=True)
        return torch.sigmoid(4.0 * (self.location_window - far))

    def finalize(self, value: torch.Tensor, parents: torch.Tensor) -> None:
        """Record the training box: the per-coordinate min and max of ``(mu, log sigma, parents)``
        over the training rows (see :meth:`_query`). Under DP it is skipped (the box is made of
        records' values: ``skip_finalize_under_dp``) and queries go without it."""
        if len(parents):
            with torch.no_grad():
                parents = parents.to(self._dtype())
                box = torch.cat([*self._affine(parents), parents], dim=-1)
                self.box_lo.copy_(box.amin(0))
                self.box_hi.copy_(box.amax(0))

    def _query(self, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``mu``, ``log sigma`` and the denoiser's conditioning that queries use.

        With ``training_box`` (and a box recorded by :meth:`finalize`) the denoiser sees the
        nearest conditioning inside the training rows' box, and ``log sigma`` is clamped to its
        training range; ``mu`` is not (a location outside the training range is what an
        intervention may ask for). Why: off the training manifold the preconditioner's
        ``log sigma`` and the denoiser extrapolate arbitrarily. On the additive diamond (fit
        seed 4) ``do(x3)`` gave x4 a ``log sigma`` of -0.27 where training spans [-1.59, -0.62],
        and the denoiser mapped a latent of 0.06 to a residual of 6.4. Measured on the same
        fitted models, fit seeds 0-5 (CF MSE x100 without -> with the box;
        ``benchmarks/results/diffusion_latent_bound_training_box_*.md``): non-additive triangle
        2.197 -> 1.951, additive diamond 5.205 -> 3.97 (seed 4 15.2 -> 8.9, seed 5 7.2 -> 5.1, but
        seeds 0-3 5-19% worse), vector additive (seeds 0-2) 3.99 -> 4.38, every other SCM within
        2%. Clamping the conditioning alone, without the scale, helped less (triangle 2.14,
        diamond 4.15) and cost the vector as much. With the box the location window rarely acts
        (it reads the clamped location); it still guards fits without a box.

        Tried and not kept (``benchmarks/results/diffusion_query_variants_tried_*.md``, same fits):
        the *nearest training row's* conditioning instead of the box's nearest point (additive
        diamond 3.97 -> 3.18, but non-additive vector 6.95 -> 7.46, and the model would have to
        keep one conditioning per training record); clamping ``mu`` as well, a bounded location
        like a flow's spline (additive diamond 2.36, meeting 1.2x flow, but additive triangle
        0.40 -> 1.81 and additive vector 4.38 -> 10.6, losing its lead: a counterfactual location
        beyond the training range is right there). Which extrapolation is right off the training
        manifold is not in the data. Outside queries, reading the preconditioner's parents
        robustly scaled (median, IQR) made the additive diamond worse on fit seeds 0-2 (2.60, 2.52,
        2.43 -> 2.89, 3.40, 4.35), though an ensemble of x4's location alone fitted that way
        extrapolated better to the ``do(x3)`` parents (MSE x100 12-34 -> 2.3-5.5, init seeds 0-3)."""
        mu, log_sigma = self._affine(parents)
        if not self.training_box:
            return mu, log_sigma, self._cond(parents, mu, log_sigma)
        d, lo, hi = self.dim, self.box_lo.to(parents), self.box_hi.to(parents)
        log_sigma = log_sigma.clamp(lo[d:d + 1], hi[d:d + 1])
        inside = self._cond(parents.clamp(lo[d + 1:], hi[d + 1:]), mu.clamp(lo[:d], hi[:d]), log_sigma)
        return mu, log_sigma, inside

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int, parents: torch.Tensor) -> torch.Tensor:
        """Predicted noise at integer step(s) ``t`` (an int or ``[n]``) given the parents."""
        return self._eps(x_t, t, self._query(parents)[2])

    def _check(self, value: torch.Tensor | None, parents: torch.Tensor) -> None:
        if parents.dim() != 2 or parents.shape[1] != self.parent_dim:
            raise MedCausalError(f"diffusion: parents must have shape [n, {self.parent_dim}] "
                                 f"({list(self.parent_dims)}), got {tuple(parents.shape)}")
        if value is not None and (value.dim() != 2 or value.shape[1] != self.dim
                                  or value.shape[0] != parents.shape[0]):
            raise MedCausalError(f"diffusion: value must have shape [{parents.shape[0]}, {self.dim}], "
                                 f"got {tuple(value.shape)}")

    def _members(self, parents: torch.Tensor) -> torch.Tensor:
        """Each preconditioner member's ``(mu, log sigma)``: ``[members, n, dim + 1]``."""
        out = torch.stack([m(parents) for m in self.loc_scale])
        return torch.cat([out[..., :self.dim], out[..., self.dim:].clamp(-7.0, 7.0)], -1)

    def _affine(self, parents: torch.Tensor, members: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu(pa)`` ``[n, dim]`` and ``log sigma(pa)`` ``[n, 1]`` of the preconditioner: the
        average of its members' (``members``: their outputs when already computed)."""
        if self.loc_scale is None:
            zero = parents.new_zeros(parents.shape[0], 1)
            return zero.expand(-1, self.dim), zero
        out = (self._members(parents) if members is None else members).mean(0)
        return out[:, :self.dim], out[:, self.dim:]

    # -- training -------------------------------------------------------------------
    def loss(self, value, parents):
        """The DDPM denoising loss per row, averaged over ``draws`` noise levels.

        Each row's ``draws`` steps are stratified over ``1..T`` (one uniform offset per
        row), so every row sees every range of noise levels and the per-row loss has a
        low variance. With ``prediction="v"`` the network predicts
        ``v = sqrt(abar) e - sqrt(1 - abar) x`` (Salimans & Ho 2022) and is trained on it;
        its noise prediction is ``sqrt(1 - abar) x_t + sqrt(abar) v``. With ``loc_scale`` the
        loss adds the mean of the preconditioner members' Gaussian NLLs; the denoising loss's
        value is in the units of ``x`` (times ``sigma^2``), its gradient that of the standardized
        residuals (unweighted). No ``.item()`` and no permutation: the loss works per record
        under ``torch.func.vmap`` (DP-SGD).
        """
        self._check(value, parents)
        value, parents = self._cast(value, parents)
        # Gaussian NLL (up to a constant) trains the preconditioner, each member on its own;
        # the denoiser sees the residuals of their average, held fixed (no gradient through them).
        nll, each = 0.0, None
        if self.loc_scale is not None:
            each = self._members(parents)
            z_each = (value - each[..., :self.dim]) * torch.exp(-each[..., self.dim:])
            nll = ((0.5 * z_each ** 2).sum(-1) + self.dim * each[..., self.dim]).mean(0)
        mu, log_sigma = self._affine(parents, each)
        z = (value - mu) * torch.exp(-log_sigma)
        value = z.detach()
        cond = self._cond(parents, mu, log_sigma)
        n, k = value.shape[0], self.draws
        offset = torch.rand(1, n, device=value.device)
        strata = torch.arange(k, device=value.device, dtype=offset.dtype).unsqueeze(1)
        t = (1 + ((strata + offset) / k * self.T).long().clamp_max(self.T - 1)).reshape(-1)  # [k n]
        x0 = value.repeat(k, 1)
        e = torch.randn_like(x0)
        ab = self.abar[t].unsqueeze(-1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * e
        out = self._raw(x_t, t, cond.repeat(k, 1), ema=False)
        target = e if self.prediction == "eps" else ab.sqrt() * e - (1 - ab).sqrt() * x0
        denoise = ((out - target) ** 2).sum(-1).reshape(k, n).mean(0)
        if self.loc_scale is not None:
            # Value: the denoising loss in the units of x (times sigma^2), so that model selection
            # cannot prefer a wider preconditioner for shrinking the residuals. Gradient: that of
            # the standardized residuals, every row weighted equally (sigma^2 weights would leave
            # the rows of small sigma, where a residual's shape matters most, untrained).
            w = torch.exp(2 * log_sigma.squeeze(-1)).detach()
            denoise = denoise + (w - 1) * denoise.detach()
        return denoise + nll

    # -- the three verbs -------------------------------------------------------------
    def noise_like(self, n, generator=None):
        return randn((n, self.dim), generator)

    def encode(self, value: torch.Tensor, parents: torch.Tensor, steps: int | None = None,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM forward from ``value`` (t = 0) to the latent at ``t = T`` (``cond``: the
        denoiser's conditioning when already computed, else the one queries use,
        ``_query(parents)``)."""
        self._check(value, parents)
        grid = self.grid if steps is None else ddim_timesteps(self.T, steps)
        ab, cond = self._abar64, self._query(parents)[2] if cond is None else cond
        x = value
        for a, b in zip(grid[:-1], grid[1:]):
            x = ddim_invert_move(x, lambda y: self._eps(y, b, cond), ab[a], ab[b],  # noqa: B023
                                 self.inversion_iters, self.inversion_tol)
        return x

    def decode(self, latent: torch.Tensor, parents: torch.Tensor, steps: int | None = None,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM backward from the latent at ``t = T`` to a value at ``t = 0`` (``cond`` as for
        :meth:`encode`)."""
        self._check(latent, parents)
        grid = self.grid if steps is None else ddim_timesteps(self.T, steps)
        ab, cond = self._abar64, self._query(parents)[2] if cond is None else cond
        x = latent
        for b, a in zip(grid[:0:-1], grid[-2::-1]):
            x = ddim_move(x, self._eps(x, b, cond), ab[b], ab[a])
        return x

    def set_steps(self, steps: int) -> "DiffusionMechanism":
        """Use ``steps`` DDIM steps from now on (a query-time setting; no retraining).

        >>> from medcausal.graph import Continuous
        >>> DiffusionMechanism(Continuous(), parents=0, hidden=[8]).set_steps(10).grid[:3]
        [0, 10, 20]
        """
        self.grid = ddim_timesteps(self.T, int(steps))
        self.steps = self.hparams["steps"] = int(steps)
        return self

    def abduct(self, value, parents, generator=None):
        """The unit's noise: its DDIM encoding, each coordinate clamped to ``±latent_bound``.

        Why the clamp: the latent's prior is N(0, I), so a coordinate beyond 5 (probability
        6e-7) says the model is wrong at this unit, not that the unit is that extreme. It
        happens where the factual parents lie far outside the training data and the
        preconditioner extrapolates ``sigma(pa)`` too small: on the non-additive triangle (fit
        seed 4) one unit with ``x1 = -4.8, x2 = 14.4`` got ``sigma = 0.006`` (standardized), a
        residual of -83 sd and a latent of -90, decoded under ``do(x2=0.48)`` to ``x3 = -20``
        (true 5.25): 95% of that fit's CF MSE. Inside the bound the encoding is unchanged, so
        ``sample(pa, abduct(x, pa))`` still reproduces ``x``; for a clamped unit it does not,
        and an ``OutOfSupportWarning`` says how many units were clamped. Measured in
        ``benchmarks/results/diffusion_latent_bound_*.md``.
        """
        self._check(value, parents)
        value, parents = self._cast(value, parents)
        mu, log_sigma, cond = self._query(parents)
        latent = self.encode((value - mu) * torch.exp(-log_sigma), parents, cond=cond)
        if self.latent_bound is None:
            return latent
        clamped = int((latent.abs() > self.latent_bound).any(-1).sum())
        if clamped:
            warn(f"diffusion: {clamped} of {len(latent)} units abducted to a latent beyond +-{self.latent_bound:g} "
                 f"(probability < 6e-7 under the N(0, I) prior): the model does not describe them; their "
                 f"latents are clamped, so their counterfactuals are the model's nearest plausible answer",
                 OutOfSupportWarning)
        return latent.clamp(-self.latent_bound, self.latent_bound)

    def sample(self, parents, noise=None, generator=None):
        self._check(None, parents)
        parents = parents.to(self._dtype())
        if noise is None:
            noise = self.noise_like(parents.shape[0], generator).to(parents)
        if noise.dim() != 2 or noise.shape != (parents.shape[0], self.dim):
            raise MedCausalError(f"diffusion: noise must have shape [{parents.shape[0]}, {self.dim}], "
                                 f"got {tuple(noise.shape)}")
        mu, log_sigma, cond = self._query(parents)
        return mu + torch.exp(log_sigma) * self.decode(noise.to(parents), parents, cond=cond)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, parent_dim={self.parent_dim}, T={self.T}, steps={self.steps}, "
                f"inversion_iters={self.inversion_iters}")
