"""The ``diffusion`` mechanism (DCM) and the vector ground-truth SCM it is measured on.

Schedule and DDIM code against closed forms; encode -> decode round trips; a fitted
1-parent toy whose counterfactuals must beat fresh interventional samples by far;
``scm("vector")``'s structure, noise recovery and exact counterfactuals.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.errors import DataError, InterventionError, MedCausalError
from medcausal.graph import Continuous
from medcausal.mechanisms import registry
from medcausal.mechanisms.diffusion import (DiffusionMechanism, ddim_invert_move, ddim_move, ddim_timesteps,
                                            linear_beta_schedule)
from medcausal.metrics import counterfactual_mse
from medcausal.synthetic import scm


# --------------------------------------------------------------------------- schedule
def test_registered_and_declared():
    cls = registry.get("diffusion")
    assert cls is DiffusionMechanism
    assert cls.abduction == "deterministic-approximate" and cls.supports == ("continuous",)
    assert cls.has_log_prob is False


def test_linear_schedule_matches_closed_form():
    T, b0, b1 = 100, 1e-4, 0.1
    abar = linear_beta_schedule(T, b0, b1).numpy()
    betas = b0 + (b1 - b0) * np.arange(T) / (T - 1)
    expected = np.concatenate([[1.0], np.cumprod(1 - betas)])
    np.testing.assert_allclose(abar, expected, rtol=1e-12)
    assert np.all(np.diff(abar) < 0) and 0 < abar[-1] < 0.01


def test_linear_schedule_matches_monai():
    schedulers = pytest.importorskip("monai.networks.schedulers")
    ref = schedulers.DDPMScheduler(num_train_timesteps=100, schedule="linear_beta",
                                   beta_start=1e-4, beta_end=0.1)
    ours = linear_beta_schedule(100, 1e-4, 0.1)[1:]
    np.testing.assert_allclose(ours.numpy(), ref.alphas_cumprod.double().numpy(), rtol=1e-5)


def test_ddim_grid_and_bad_settings():
    assert ddim_timesteps(100, 100) == list(range(101))
    grid = ddim_timesteps(100, 7)
    assert grid[0] == 0 and grid[-1] == 100 and len(grid) == 8 and grid == sorted(set(grid))
    with pytest.raises(MedCausalError, match="steps"):
        DiffusionMechanism(Continuous(), 1, steps=0)
    with pytest.raises(MedCausalError, match="steps"):
        DiffusionMechanism(Continuous(), 1, num_train_timesteps=10, steps=11)
    with pytest.raises(MedCausalError, match="prediction"):
        DiffusionMechanism(Continuous(), 1, prediction="x0")
    with pytest.raises(MedCausalError, match="beta"):
        DiffusionMechanism(Continuous(), 1, beta_start=0.2, beta_end=0.1)
    m = DiffusionMechanism(Continuous(dim=2), 3, hidden=[8])
    with pytest.raises(MedCausalError, match=r"parents must have shape \[n, 3\]"):
        m.loss(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(MedCausalError, match=r"value must have shape \[4, 2\]"):
        m.abduct(torch.zeros(4, 1), torch.zeros(4, 3))


class _GaussianOracle(DiffusionMechanism):
    """DDIM driven by the exact noise prediction of data ~ N(mu, Sigma) (no parents).

    x_t ~ N(sqrt(abar) mu, C_t), C_t = abar Sigma + (1 - abar) I, so the optimal noise
    prediction is E[e | x_t] = sqrt(1 - abar) C_t^-1 (x_t - sqrt(abar) mu).
    """

    def __init__(self, mu, sigma, **kw):
        super().__init__(Continuous(dim=len(mu)), 0, hidden=[4], loc_scale=False, **kw)
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.sigma = torch.as_tensor(sigma, dtype=torch.float64)

    def _eps(self, x_t, t, cond):  # what encode/decode call, with the conditioning features
        ab = self._abar64[int(t)]
        c = ab * self.sigma + (1 - ab) * torch.eye(len(self.mu), dtype=torch.float64)
        return math.sqrt(1 - ab) * torch.linalg.solve(c, (x_t - math.sqrt(ab) * self.mu).T).T


def _sym_power(a: torch.Tensor, p: float) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return v @ torch.diag(w ** p) @ v.T


@pytest.mark.parametrize("inversion_iters", [0, 10])
def test_ddim_encoding_of_gaussian_data_is_the_closed_form_map(inversion_iters):
    """With the exact score, DDIM integrates the probability-flow ODE, whose map from a
    Gaussian N(mu, Sigma) to t = T is linear and symmetric (all covariances along the path
    commute): x_T = sqrt(abar_T) mu + C_T^(1/2) Sigma^(-1/2) (x - mu)."""
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    sigma = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = mu + torch.randn(200, 2, generator=g, dtype=torch.float64) @ _sym_power(sigma, 0.5)
    pa = torch.zeros(200, 0, dtype=torch.float64)
    ab_T = float(linear_beta_schedule(100)[-1])
    c_T = ab_T * sigma + (1 - ab_T) * torch.eye(2, dtype=torch.float64)
    exact = math.sqrt(ab_T) * mu + (x - mu) @ (_sym_power(c_T, 0.5) @ _sym_power(sigma, -0.5)).T
    errors, recon = [], []
    for steps in (10, 25, 100):
        m = _GaussianOracle(mu, sigma, steps=steps, inversion_iters=inversion_iters, inversion_tol=1e-9)
        z = m.abduct(x, pa)
        errors.append((z - exact).abs().max().item())
        recon.append((m.sample(pa, noise=z) - x).abs().max().item())
    # DDIM is a first-order solver of that ODE: its error falls ~10x from 10 to 100 steps
    # (100 steps = every step of the schedule; what is left is the schedule's own coarseness)
    assert errors[0] > errors[1] > errors[2] and errors[0] > 5 * errors[2] and errors[2] < 0.08, errors
    if inversion_iters:  # the implicit encoding step inverts the decoding step
        assert max(recon) < 1e-5, recon
    else:  # plain explicit DDIM inversion (eps at the start of each move): first-order error
        assert recon[0] > recon[1] > recon[2] > 1e-3, recon


def test_ddim_move_is_the_closed_form_step():
    x, e = torch.tensor([[0.3, -2.0]]), torch.tensor([[1.0, 0.5]])
    a, b = 0.9, 0.4
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    torch.testing.assert_close(ddim_move(x, e, a, b), math.sqrt(b) * x0 + math.sqrt(1 - b) * e)


# --------------------------------------------------------------------------- the mechanism
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_is_the_denoising_objective(prediction):
    """Per-row loss = mean over draws of |target - net|^2, with the target of its parametrization."""
    torch.manual_seed(0)
    m = DiffusionMechanism(Continuous(dim=2), 1, hidden=[8], draws=3, prediction=prediction, loc_scale=False)
    x, pa = torch.randn(5, 2), torch.randn(5, 1)
    torch.manual_seed(1)
    got = m.loss(x, pa)
    torch.manual_seed(1)  # replay the same draws by hand
    offset = torch.rand(1, 5)
    t = (1 + ((torch.arange(3.0)[:, None] + offset) / 3 * 100).long().clamp_max(99)).reshape(-1)
    e = torch.randn(15, 2)
    ab = m.abar[t][:, None]
    x0 = x.repeat(3, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * e
    out = m.net(torch.cat([x_t, pa.repeat(3, 1), m.embed(t[:, None] / 100.0)], -1))
    target = e if prediction == "eps" else ab.sqrt() * e - (1 - ab).sqrt() * x0
    torch.testing.assert_close(got, ((out - target) ** 2).sum(-1).reshape(3, 5).mean(0))
    # the draws of one row are stratified: one per third of 1..T
    assert sorted(((t.reshape(3, 5) - 1) // (100 / 3)).long()[:, 0].tolist()) == [0, 1, 2]
    # v and eps parametrizations agree on the noise prediction they imply
    if prediction == "v":
        v = out
        torch.testing.assert_close(m.eps(x_t, t, pa.repeat(3, 1)), (1 - ab).sqrt() * x_t + ab.sqrt() * v)


def test_latent_bound_clamps_only_implausible_latents():
    """Abducted latents beyond ``latent_bound`` (their prior is N(0, I)) are clamped to it;
    latents inside it are the DDIM encoding itself, so sample(abduct(x)) still reproduces x.
    With ``init_scale=0`` the network is the N(0, 1) denoiser, whose discrete DDIM encoding of
    the standardized residual ``r`` is linear, ``c r`` (``c`` within 10% of 1, the product of
    the steps' cosines): the value compared against."""
    torch.manual_seed(0)
    m = DiffusionMechanism(Continuous(), 1, hidden=[8], loc_scale_members=1, init_scale=0.0)
    assert m.latent_bound == 5.0 and m.hparams["latent_bound"] == 5.0
    pa = torch.randn(4, 1)
    with torch.no_grad():
        mu, log_sigma = m._affine(pa)
        residual = torch.tensor([[0.5], [-2.0], [7.0], [-40.0]])
        c = float(m.encode(torch.ones(1, 1), pa[:1]))
        assert 0.9 < c < 1.1
        with pytest.warns(mc.errors.OutOfSupportWarning, match="2 of 4 units"):
            u = m.abduct(mu + log_sigma.exp() * residual, pa)
        torch.testing.assert_close(u, torch.tensor([[0.5 * c], [-2.0 * c], [5.0], [-5.0]]), atol=1e-4, rtol=0)
        assert u.abs().max() <= 5.0
        torch.testing.assert_close(m.sample(pa[:2], noise=u[:2]), (mu + log_sigma.exp() * residual)[:2],
                                   atol=1e-3, rtol=0)
        m.latent_bound = None  # off: the raw encoding
        torch.testing.assert_close(m.abduct(mu + log_sigma.exp() * residual, pa), c * residual, atol=1e-3, rtol=0)
    assert DiffusionMechanism(Continuous(), 1, latent_bound=np.float32(4)).latent_bound == 4.0
    for bad in (0, -1.0, float("inf"), float("nan"), "5", True):
        with pytest.raises(MedCausalError, match="latent_bound"):
            DiffusionMechanism(Continuous(), 1, latent_bound=bad)


def test_location_scale_preconditioner():
    """loss = Gaussian NLL of (mu, sigma) + the denoising loss of the standardized residual,
    which is held fixed, with the denoiser conditioned on (mu, log sigma) (held fixed
    too); abduction/prediction wrap the DDIM codec in the same affine map."""
    torch.manual_seed(0)
    m = DiffusionMechanism(Continuous(dim=2), 1, hidden=[8], draws=2, init_scale=1.0, loc_scale_members=1,
                           latent_bound=None)  # x = 3 randn: some latents lie beyond the default bound
    # the same denoiser as a plain mechanism whose "parents" are (mu, log sigma)
    plain = DiffusionMechanism(Continuous(dim=2), 3, hidden=[8], draws=2, loc_scale=False)
    plain.net.load_state_dict(m.net.state_dict())
    plain.ema.load_state_dict(m.ema.state_dict())  # the averaged weights, which queries use
    x, pa = 3 * torch.randn(6, 2), torch.randn(6, 1)
    mu, log_sigma = m._affine(pa)
    assert log_sigma.shape == (6, 1)  # one scale per row: isotropic
    z = (x - mu) / log_sigma.exp()
    cond = torch.cat([mu, log_sigma], dim=-1).detach()
    nll = (0.5 * z ** 2).sum(-1) + 2 * log_sigma[:, 0]
    torch.manual_seed(1)
    total = m.loss(x, pa)
    torch.manual_seed(1)
    denoise = plain.loss(z.detach(), cond)
    # its value in the units of x (times sigma^2), so model selection cannot prefer a wider
    # preconditioner for shrinking the residuals ...
    torch.testing.assert_close(total, nll + denoise * torch.exp(2 * log_sigma[:, 0]).detach())
    # ... its gradient that of the standardized residuals, every row weighted equally
    torch.manual_seed(1)
    (m.loss(x, pa) - nll).sum().backward()
    denoise.sum().backward()
    for a, b in zip(m.net.parameters(), plain.net.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    # and no gradient into the preconditioner
    assert all(p.grad is None or p.grad.abs().max() < 1e-4 for p in m.loc_scale.parameters())  # float32 noise
    with torch.no_grad():
        u = m.abduct(x, pa)
        torch.testing.assert_close(u, m.encode(z, pa))
        torch.testing.assert_close(u, plain.encode(z, cond))
        torch.testing.assert_close(m.sample(pa, noise=u), x, atol=1e-3, rtol=0)
    # condition="parents": the denoiser sees the parents themselves (the DCM paper's input)
    by_pa = DiffusionMechanism(Continuous(dim=2), 1, hidden=[8], condition="parents")
    assert by_pa.net[0].in_features == 2 + 1 + by_pa.embed.dim
    assert m.net[0].in_features == 2 + 3 + m.embed.dim
    # condition="both": (mu, log sigma) and the parents, side by side
    both = DiffusionMechanism(Continuous(dim=2), 1, hidden=[8], condition="both", loc_scale_members=1,
                              latent_bound=None)
    assert both.net[0].in_features == 2 + 3 + 1 + both.embed.dim
    with torch.no_grad():
        mu_b, log_sigma_b = both._affine(pa)
        torch.testing.assert_close(both._cond(pa), torch.cat([mu_b, log_sigma_b, pa], dim=-1))
        torch.testing.assert_close(both.sample(pa, noise=both.abduct(x, pa)), x, atol=1e-3, rtol=0)
        plain_b = DiffusionMechanism(Continuous(dim=2), 4, hidden=[8], draws=4, loc_scale=False)
        plain_b.net.load_state_dict(both.net.state_dict())
        z_b = (x - mu_b) / log_sigma_b.exp()
        nll_b = (0.5 * z_b ** 2).sum(-1) + 2 * log_sigma_b[:, 0]
        torch.manual_seed(2)
        total_b = both.loss(x, pa)
        torch.manual_seed(2)
        torch.testing.assert_close(total_b, nll_b + plain_b.loss(z_b, both._cond(pa))
                                   * torch.exp(2 * log_sigma_b[:, 0]))
    with pytest.raises(MedCausalError, match="condition"):
        DiffusionMechanism(Continuous(), 1, condition="mu")


def test_preconditioner_ensemble_averages_members_each_fitted_on_its_own_likelihood():
    """With ``loc_scale_members=K`` the preconditioner is the average of K MLPs' (mu, log sigma);
    the loss holds the mean of the members' own Gaussian NLLs (a deep ensemble, each member
    fitted alone), and the denoiser sees the residual of the average."""
    torch.manual_seed(0)
    m = DiffusionMechanism(Continuous(dim=2), 1, hidden=[8], draws=2, init_scale=1.0, loc_scale_members=3)
    x, pa = 3 * torch.randn(6, 2), torch.randn(6, 1)
    outs = [member(pa) for member in m.loc_scale]
    mu, log_sigma = m._affine(pa)
    torch.testing.assert_close(mu, sum(o[:, :2] for o in outs) / 3)
    torch.testing.assert_close(log_sigma, sum(o[:, 2:] for o in outs) / 3)
    nlls = [(0.5 * ((x - o[:, :2]) / o[:, 2:].exp()) ** 2).sum(-1) + 2 * o[:, 2] for o in outs]
    # the same denoiser without a preconditioner, conditioned on the average's (mu, log sigma)
    plain = DiffusionMechanism(Continuous(dim=2), 3, hidden=[8], draws=2, loc_scale=False)
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("box_")}, strict=False)
    z = ((x - mu) / log_sigma.exp()).detach()
    torch.manual_seed(1)
    total = m.loss(x, pa)
    torch.manual_seed(1)
    denoise = plain.loss(z, torch.cat([mu, log_sigma], -1).detach())
    torch.testing.assert_close(total, sum(nlls) / 3 + denoise * torch.exp(2 * log_sigma[:, 0]).detach())
    # member k's gradient is that of its own NLL (over K) alone
    total.sum().backward()
    own = torch.autograd.grad((nlls[1] / 3).sum(), list(m.loc_scale[1].parameters()))
    for p, g in zip(m.loc_scale[1].parameters(), own):
        torch.testing.assert_close(p.grad, g)
    with pytest.raises(MedCausalError, match="loc_scale_members"):
        DiffusionMechanism(Continuous(), 1, loc_scale_members=0)


def test_a_model_file_with_one_preconditioner_loads_and_answers_as_before():
    # Files written before the preconditioner became an ensemble hold one MLP ("loc_scale.<layer>.*"):
    # it becomes the only member.
    torch.manual_seed(0)
    old = DiffusionMechanism(Continuous(), 2, hidden=[8], steps=5, init_scale=1.0, loc_scale_members=1)
    state = {k.replace("loc_scale.0.", "loc_scale."): v for k, v in old.state_dict().items()}
    fresh = DiffusionMechanism(Continuous(), 2, hidden=[8], steps=5, init_scale=1.0, loc_scale_members=5)
    assert len(fresh.loc_scale) > 1
    fresh.load_state_dict(state)  # strict
    assert len(fresh.loc_scale) == 1
    pa, x = 4 * torch.randn(30, 2), torch.randn(30, 1)
    with torch.no_grad():
        torch.testing.assert_close(fresh.abduct(x, pa), old.abduct(x, pa))
        torch.testing.assert_close(fresh.sample(pa, noise=x), old.sample(pa, noise=x))
    again = DiffusionMechanism(Continuous(), 2, hidden=[8], steps=5, loc_scale_members=5)
    again.load_state_dict(fresh.state_dict())  # and such a model, saved again, loads again
    assert len(again.loc_scale) == 1 and again.hparams["loc_scale_members"] == 1


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_location_window_hands_far_units_to_the_gaussian(prediction):
    """Where the preconditioner's location mu lies far beyond ``location_window`` (standardized
    units), queries use the Gaussian denoiser: DDIM of N(0, 1) data, whose decoding move b -> a
    is x_a = cos(theta_b - theta_a) x_b (abar = cos^2 theta), so the abducted noise is the
    residual over the product of those cosines. Within the window the network is used as is."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    pa = torch.randn(40, 1, generator=g)
    settings = dict(hidden=[16], steps=10, init_scale=1.0, prediction=prediction)  # far from the Gaussian
    windowed, plain = (DiffusionMechanism(Continuous(), 1, **settings, location_window=w) for w in (8.0, None))
    plain.load_state_dict(windowed.state_dict())
    theta = torch.tensor(windowed._abar64, dtype=torch.float64).sqrt().acos()[windowed.grid]
    shrink = float(torch.cos(theta[1:] - theta[:-1]).prod())
    for mu, far in ((20.0, True), (0.0, False)):
        for m in (windowed, plain):
            with torch.no_grad():  # mu(pa) = mu and sigma = 1 for every row
                for member in m.loc_scale:
                    member[-1].weight.zero_()
                    member[-1].bias.copy_(torch.tensor([mu, 0.0]))
        x = mu + torch.randn(40, 1, generator=g)
        with torch.no_grad():
            u, u_plain = windowed.abduct(x, pa), plain.abduct(x, pa)
            back = windowed.sample(pa, noise=u)
        gaussian = (x - mu) / shrink
        if far:
            torch.testing.assert_close(u, gaussian, atol=1e-4, rtol=0)
            assert (u_plain - gaussian).abs().max() > 0.05  # without the window the network answers
        else:
            torch.testing.assert_close(u, u_plain, atol=1e-6, rtol=0)
            assert (u - gaussian).abs().max() > 0.05
        assert (back - x).abs().max() <= windowed.reconstruction_tolerance
    for bad in (0.0, -1.0, "8"):
        with pytest.raises(MedCausalError, match="location_window"):
            DiffusionMechanism(Continuous(), 1, location_window=bad)


def test_training_box_clamps_what_queries_show_the_denoiser_and_the_scale():
    """finalize() records the per-coordinate min and max of (mu, log sigma, parents) over the
    training rows. Queries show the denoiser the nearest conditioning inside that box and clamp
    log sigma to it; mu is not clamped. Rows inside the box answer as without it; old model files
    (no box) load with the box unknown and answer as before."""
    from medcausal.privacy.stats import needs_private_finalize

    torch.manual_seed(0)
    settings = dict(hidden=[16], steps=10, init_scale=1.0, loc_scale_members=1, condition="both")
    m, free = DiffusionMechanism(Continuous(), 1, **settings), DiffusionMechanism(Continuous(), 1, **settings,
                                                                                  training_box=False)
    linear = torch.nn.Sequential(torch.nn.Linear(1, 2))  # mu = 2 pa, log sigma = pa / 2: both leave the box
    with torch.no_grad():
        linear[0].weight.copy_(torch.tensor([[2.0], [0.5]]))
        linear[0].bias.zero_()
    m.loc_scale, free.loc_scale = torch.nn.ModuleList([linear]), torch.nn.ModuleList([linear])
    free.load_state_dict(m.state_dict())
    old_state = {k: v for k, v in m.state_dict().items() if not k.startswith("box_")}
    pa_train = torch.linspace(-1, 1, 201).unsqueeze(-1)
    m.finalize(torch.randn(201, 1), pa_train)
    torch.testing.assert_close(m.box_lo, torch.tensor([-2.0, -0.5, -1.0]))
    torch.testing.assert_close(m.box_hi, torch.tensor([2.0, 0.5, 1.0]))
    pa = torch.tensor([[0.0], [0.9], [1.0], [3.0], [-6.0]])
    with torch.no_grad():
        mu, log_sigma, cond = m._query(pa)
        torch.testing.assert_close(mu, 2 * pa)  # the location extrapolates
        torch.testing.assert_close(log_sigma, (pa / 2).clamp(-0.5, 0.5))
        torch.testing.assert_close(cond, torch.cat([(2 * pa).clamp(-2, 2), (pa / 2).clamp(-0.5, 0.5),
                                                    pa.clamp(-1, 1)], -1))
        u = torch.full((5, 1), 0.7)
        x, x_free = m.sample(pa, noise=u), free.sample(pa, noise=u)
        torch.testing.assert_close(x[:3], x_free[:3])  # inside the box: unchanged
        residual = (x - mu) / log_sigma.exp()
        torch.testing.assert_close(residual[3], residual[2])  # beyond the box: the edge's residual
        assert (x[3:] - x_free[3:]).abs().min() > 1e-3  # without the box the denoiser extrapolates
        back = m.abduct(x, pa)
    torch.testing.assert_close(back, u, atol=1e-3, rtol=0)  # abduction uses the same box
    fresh = DiffusionMechanism(Continuous(), 1, **settings)
    fresh.loc_scale = torch.nn.ModuleList([linear])
    fresh.load_state_dict(old_state)  # a model file from before the box
    assert torch.isinf(fresh.box_lo).all() and torch.isinf(fresh.box_hi).all()
    with torch.no_grad():
        torch.testing.assert_close(fresh.sample(pa, noise=u), x_free)
    # under DP finalize is skipped (the box is made of records' values): no private version needed
    assert not needs_private_finalize(DiffusionMechanism)

    class Reads(DiffusionMechanism):  # a subclass with its own finalize does not inherit the skip
        def finalize(self, value, parents):
            pass

    assert needs_private_finalize(Reads)
    for bad in ("no", 0, None):
        with pytest.raises(MedCausalError, match="training_box"):
            DiffusionMechanism(Continuous(), 1, training_box=bad)


_TINY_TOY = {"y": {"name": "diffusion", "hidden": [8], "steps": 5, "loc_scale_hidden": [8]}}


def _private_tiny_toy():
    from medcausal.privacy import Privacy

    graph = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    return mc.CausalModel(graph, mechanisms=_TINY_TOY).fit(
        _toy(400, seed=0)[0], seed=0, max_epochs=1, verbose=False,
        privacy=Privacy(epsilon=50.0, delta=1e-4, public_bounds={"x": (-5, 5), "y": (-8, 8)}))


def test_fit_records_the_training_box_except_under_dp():
    graph = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    df, _ = _toy(400, seed=0)
    model = mc.CausalModel(graph, mechanisms=_TINY_TOY).fit(df, seed=0, max_epochs=1, verbose=False)
    y = model.mechanism("y")
    assert torch.isfinite(y.box_lo).all() and (y.box_lo <= y.box_hi).all()
    # the parent's coordinate spans the (standardized) training rows: within all rows' range, wide
    x_std = model._parents("y", model._encode(df), len(df))
    assert x_std.min() - 1e-5 <= y.box_lo[-1] < -2 and 2 < y.box_hi[-1] <= x_std.max() + 1e-5
    private = _private_tiny_toy()
    assert private.privacy["epsilon"] <= 50.0
    assert torch.isinf(private.mechanism("y").box_lo).all() and torch.isinf(private.mechanism("y").box_hi).all()


def test_a_dp_model_file_from_before_the_box_loads_saves_and_keeps_its_ledger(tmp_path):
    """A DP file written before the box buffers existed: its ledger's weight digest covers the
    file's state; loading adds the (unknown) box, and the model still states its guarantee,
    saves and reloads (old code: outputs lost the ledger and save() raised PrivacyError)."""
    from medcausal.io import load_model_file, save_model_file, weights_digest

    private = _private_tiny_toy()
    private.save(tmp_path / "new.mcm")
    spec, state = load_model_file(tmp_path / "new.mcm", "medcausal-model", 10**6)
    old_state = {k: v for k, v in state.items() if not k.endswith(("box_lo", "box_hi"))}
    assert len(old_state) == len(state) - 2
    spec["privacy"]["weights_sha256"] = weights_digest(old_state)  # as the old fit computed it
    save_model_file(tmp_path / "old.mcm", spec, old_state)
    old = mc.CausalModel.load(tmp_path / "old.mcm")
    assert torch.isinf(old.mechanism("y").box_lo).all()
    assert old.sample(3, seed=0).attrs["privacy"]["epsilon"] == private.privacy["epsilon"]
    old.save(tmp_path / "again.mcm")
    again = mc.CausalModel.load(tmp_path / "again.mcm")
    assert again.sample(3, seed=0).attrs["privacy"] is not None
    pd.testing.assert_frame_equal(again.sample(5, seed=1), private.sample(5, seed=1))


@pytest.mark.parametrize("dim", [1, 2])
def test_encode_decode_reproduces_input_untrained(dim):
    torch.manual_seed(0)
    # latent_bound off: x = 2 randn puts a few latents beyond the default bound of 5
    m = DiffusionMechanism(Continuous(dim=dim), 3, hidden=[32, 32], steps=25, latent_bound=None)
    g = torch.Generator().manual_seed(1)
    pa, x = torch.randn(300, 3, generator=g), 2 * torch.randn(300, dim, generator=g)
    with torch.no_grad():
        back = m.sample(pa, noise=m.abduct(x, pa))
    assert (back - x).abs().max().item() <= m.reconstruction_tolerance


def test_noise_like_is_standard_normal_of_the_variables_dim():
    m = DiffusionMechanism(Continuous(dim=3), 0, hidden=[8])
    u = m.noise_like(20_000, generator=torch.Generator().manual_seed(0))
    assert u.shape == (20_000, 3)
    assert u.mean(0).abs().max() < 0.04 and (u.std(0) - 1).abs().max() < 0.03


# --------------------------------------------------------------------------- fitted toy
def _toy(n, seed):
    """x ~ N(0, 1); y = x + (0.5 + s(2x)) u: the noise scales with the parent."""
    rng = np.random.default_rng(seed)
    x, u = rng.standard_normal(n), rng.standard_normal(n)
    return pd.DataFrame({"x": x, "y": x + (0.5 + 1 / (1 + np.exp(-2 * x))) * u}), u


@pytest.fixture(scope="module")
def toy_model():
    graph = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    df, _ = _toy(3000, seed=0)
    spec = {"y": {"name": "diffusion", "hidden": [64, 64], "steps": 25}}
    torch.manual_seed(0)
    return mc.CausalModel(graph, mechanisms=spec).fit(df, seed=0, max_epochs=40, verbose=False)


@pytest.mark.filterwarnings("ignore::medcausal.errors.OutOfSupportWarning")  # x + 1 leaves the range
def test_toy_counterfactuals_far_better_than_fresh_samples(toy_model):
    df, u = _toy(500, seed=1)
    new_x = df["x"].to_numpy() + 1.0
    true_y = new_x + (0.5 + 1 / (1 + np.exp(-2 * new_x))) * u
    cf = toy_model.counterfactual(df, do={"x": lambda a: a + 1.0})
    np.testing.assert_allclose(cf["x"], new_x, atol=1e-5)  # float32 round trip of a callable
    cf_mse = float(np.mean((cf["y"] - true_y) ** 2))
    # no abduction: the same intervention, fresh noise (an interventional sample per unit)
    fresh = toy_model.sample(500, do={"x": new_x}, seed=2)
    fresh_mse = float(np.mean((fresh["y"] - true_y) ** 2))
    # fresh noise costs ~2 Var((0.5 + s) u) (~3 here); a fitted DCM recovers the noise
    # (measured: 0.04 vs 3.1)
    assert fresh_mse > 1.0, fresh_mse
    assert cf_mse < 0.05 * fresh_mse, (cf_mse, fresh_mse)


def test_toy_encode_decode_within_tolerance_when_trained(toy_model):
    df, _ = _toy(500, seed=3)
    mech = toy_model.mechanism("y")
    codec = toy_model.codecs
    x = codec["x"].encode(df)
    y = codec["y"].encode(df)
    with torch.no_grad():
        back = mech.sample(x, noise=mech.abduct(y, x))
    assert (back - y).abs().max().item() <= mech.reconstruction_tolerance
    # the null intervention returns the factual values within the same tolerance
    cf = toy_model.counterfactual(df, do={"x": df["x"].to_numpy()})
    scale = codec["y"].state["scale"][0]
    assert np.max(np.abs(cf["y"] - df["y"])) <= mech.reconstruction_tolerance * scale


def test_save_load_round_trip_keeps_settings(toy_model, tmp_path):
    path = toy_model.save(tmp_path / "toy.mcm")
    back = mc.CausalModel.load(path)
    assert back.mechanism("y").steps == 25 and back.choices["y"]["hidden"] == [64, 64]
    df, _ = _toy(20, seed=4)
    pd.testing.assert_frame_equal(back.counterfactual(df, do={"x": 0.0}),
                                  toy_model.counterfactual(df, do={"x": 0.0}))


# --------------------------------------------------------------------------- the vector SCM
@pytest.mark.parametrize("additive", [True, False])
def test_vector_scm_structure_and_noise(additive):
    sim = scm("vector", additive=additive)
    assert sim.graph.variables["x3"] == Continuous(dim=2)
    assert set(sim.graph.edges) == {("x1", "x2"), ("x1", "x3"), ("x2", "x3")}
    df = sim.sample(10_000, seed=0)
    assert list(df.columns) == ["x1", "x2", "x3[0]", "x3[1]"] and df.index.name == "unit"
    pd.testing.assert_frame_equal(df.iloc[:30], sim.sample(30, seed=0))
    std = df.std()
    assert ((std > 0.3) & (std < 10)).all(), std
    u = sim.noise(df)
    assert list(u.columns) == list(df.columns)
    assert np.abs(u.mean()).max() < 0.04 and np.abs(u.std() - 1).max() < 0.03
    assert np.abs(np.corrcoef(u.to_numpy(), rowvar=False) - np.eye(4)).max() < 0.05
    # the recovered noise regenerates the data through the equations
    x3 = sim.evaluate("x3", {"x1": df["x1"], "x2": df["x2"]}, u[["x3[0]", "x3[1]"]].to_numpy())
    np.testing.assert_allclose(x3, df[["x3[0]", "x3[1]"]].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(sim.evaluate("x2", {"x1": df["x1"]}, u["x2"]), df["x2"], rtol=1e-12)


def test_vector_scm_coordinates_have_equal_scale():
    """Equal marginal sds keep the symmetric noise map symmetric after standardization."""
    df = scm("vector", additive=False).sample(200_000, seed=0)
    sd = df[["x3[0]", "x3[1]"]].std()
    assert sd.iloc[0] == pytest.approx(1.20, abs=0.01) and sd.iloc[1] == pytest.approx(1.20, abs=0.01)


def test_vector_scm_noise_map_is_a_gradient_of_a_convex_function():
    """Jacobian d x3 / d u3 = S(x1, x2): symmetric positive definite, and not constant."""
    sim = scm("vector", additive=False)
    rng = np.random.default_rng(0)
    pa = {"x1": rng.uniform(-3, 3, 200), "x2": rng.uniform(-3, 3, 200)}
    base = sim.evaluate("x3", pa, np.zeros((200, 2)))
    cols = [sim.evaluate("x3", pa, np.tile(e, (200, 1))) - base for e in np.eye(2)]
    jac = np.stack(cols, axis=2)  # [n, 2 (output), 2 (noise)]
    np.testing.assert_allclose(jac, np.swapaxes(jac, 1, 2), atol=1e-12)
    assert (np.linalg.eigvalsh(jac) > 0.1).all()
    assert np.ptp(jac[:, 0, 1]) > 0.5  # the correlation turns with the parents


def test_vector_scm_counterfactual_by_hand():
    sim = scm("vector", additive=False)
    df = sim.sample(50, seed=2)
    u = sim.noise(df)
    cf = sim.counterfactual(df, do={"x1": 0.5})
    s = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for i in (0, 17, 33):
        u2, ua, ub = (float(u[c].iloc[i]) for c in ("x2", "x3[0]", "x3[1]"))
        x1 = 0.5
        x2 = 1.5 * math.tanh(x1) + (0.3 + 0.5 * s(2 * x1)) * u2
        th = math.pi / 2 * s(2 * (x1 - x2))
        rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        S = rot @ np.diag([0.2 + 1.2 * s(2 * x2), 0.2 + 1.2 * s(-2 * x1)]) @ rot.T
        m = np.array([0.65 * (math.sin(x1) + x2 / 2), 2.7 * (x1 * x2 / 2 + math.cos(x2))])
        x3 = m + S @ np.array([ua, ub])
        assert cf["x2"].iloc[i] == pytest.approx(x2, rel=1e-12)
        np.testing.assert_allclose(cf[["x3[0]", "x3[1]"]].iloc[i].to_numpy(), x3, rtol=1e-12)
    # the residual trick (additive abduction) is wrong here, exact for the additive variant
    for additive, wrong in ((True, False), (False, True)):
        sim = scm("vector", additive=additive)
        a = sim.sample(2000, seed=0)
        cf = sim.counterfactual(a, do={"x2": 1.0})
        zero = np.zeros((2000, 2))
        resid = a[["x3[0]", "x3[1]"]].to_numpy() - sim.evaluate("x3", {"x1": a["x1"], "x2": a["x2"]}, zero)
        guess = sim.evaluate("x3", {"x1": a["x1"], "x2": 1.0}, zero) + resid
        gap = np.abs(guess - cf[["x3[0]", "x3[1]"]].to_numpy()).mean()
        assert (gap > 0.1) if wrong else (gap < 1e-12), (additive, gap)


def test_vector_scm_interventions_and_errors():
    sim = scm("vector", additive=False)
    df = sim.sample(40, seed=3)
    pd.testing.assert_frame_equal(sim.counterfactual(df, {"x1": df["x1"].to_numpy()}), df, check_exact=True)
    cf = sim.counterfactual(df, do={"x2": 0.0})
    assert (cf["x1"] == df["x1"]).all() and (cf["x2"] == 0.0).all()
    assert (cf["x3[0]"] != df["x3[0]"]).mean() > 0.9
    vals = np.arange(80.0).reshape(40, 2)
    cf = sim.counterfactual(df, do={"x3": vals})
    np.testing.assert_array_equal(cf[["x3[0]", "x3[1]"]].to_numpy(), vals)
    shifted = sim.sample(40, seed=3, do={"x3": lambda v: v + 1.0})
    np.testing.assert_allclose(shifted[["x3[0]", "x3[1]"]].to_numpy(), df[["x3[0]", "x3[1]"]].to_numpy() + 1)
    with pytest.raises(InterventionError, match=r"2-vector"):
        sim.counterfactual(df, do={"x3": np.zeros(40)})
    with pytest.raises(DataError, match="lack column"):
        sim.counterfactual(df.drop(columns="x3[1]"), do={"x1": 0.0})
    with pytest.raises(DataError, match="not produced by"):
        sim.counterfactual(scm("vector", additive=True).sample(3), do={"x1": 0.0})
    with pytest.raises(DataError, match="last axis of 2"):
        sim.evaluate("x3", {"x1": 0.0, "x2": 0.0}, 0.0)
    with pytest.raises(MedCausalError, match="known: .*vector"):
        scm("hexagon")
    assert "vector" not in mc.synthetic.scm_names()


def test_vector_scm_works_with_the_model_and_the_metric():
    sim = scm("vector", additive=False)
    train = sim.sample(300, seed=0)
    model = mc.CausalModel(sim.graph, mechanisms={"x3": {"name": "diffusion", "hidden": [16], "steps": 5}})
    model.fit(train, seed=0, max_epochs=2, verbose=False)
    fact = sim.sample(20, seed=1)
    pred = model.counterfactual(fact, do={"x1": 0.5})
    assert list(pred.columns) == list(fact.columns)
    err = counterfactual_mse(sim.counterfactual(fact, do={"x1": 0.5}), pred, sim.graph, ["x1"])
    assert set(err.per_variable) == {"x2", "x3"} and np.isfinite(float(err))


@pytest.mark.slow
def test_vector_scm_diffusion_beats_additive_and_nears_flow():
    """On the non-additive vector SCM, DCM's counterfactuals of x3 beat the additive model
    (misspecified: the noise enters non-additively) and are within 1.2x of flow's.

    With the current training (last averaged weights, 300 epochs), fit seeds 0/1/2 gave
    diffusion 0.165/0.147/0.163 vs flow 0.162/0.353/0.160 and additive 0.374/0.309/0.419
    (seed 0 is this test; 1-2 are hand runs of its body). At seed 0 diffusion and flow tie
    (ratio 1.02); over the seeds diffusion is the steadier of the two.
    """
    sim = scm("vector", additive=False)
    train = sim.sample(5000, seed=0)
    fact = sim.sample(200, seed=1)
    errors = {}
    for name in ("diffusion", "flow", "additive"):
        settings = getattr(registry.get(name), "fit_defaults", {})  # diffusion: 300 epochs (patience 100 for the others)
        model = mc.CausalModel(sim.graph, mechanisms={"x3": name})
        model.fit(train, seed=0, verbose=False, **settings)
        errs = [float(counterfactual_mse(sim.counterfactual(fact, do={"x2": q}),
                                         model.counterfactual(fact, do={"x2": q}), sim.graph, ["x2"]))
                for q in train["x2"].quantile([0.1, 0.3, 0.5, 0.7, 0.9])]
        errors[name] = float(np.mean(errs))
    assert errors["diffusion"] < 0.75 * errors["additive"], errors
    assert errors["diffusion"] < 1.2 * errors["flow"], errors


# --------------------------------------------------------------------------- the inversion solver
def _slow_contraction_problem(n=6, d=16, seed=0):
    """A DDIM move with a linear noise prediction eps(y) = y A^T whose fixed-point map contracts
    fast in most directions and slowly (0.95) in two, as a trained denoiser's first low-noise
    move does off the data; and the exact solution of y = move(x; eps(y)) by a linear solve."""
    g = torch.Generator().manual_seed(seed)
    abar_a, abar_b = 1.0, 0.9
    c = math.sqrt(1 - abar_b)  # d move / d eps at abar_a = 1
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    radii = torch.full((d,), 0.3, dtype=torch.float64)
    radii[:2] = torch.tensor([0.9, 0.95], dtype=torch.float64)
    a = q @ torch.diag(radii / c) @ q.T  # c A: eigenvalues 0.3, 0.9 and 0.95
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    # y = sqrt(abar_b) x + c y A^T  =>  y (I - c A^T) = sqrt(abar_b) x
    exact = torch.linalg.solve((torch.eye(d, dtype=torch.float64) - c * a.T).T, (math.sqrt(abar_b) * x).T).T
    return x, (lambda y: y @ a.T), abar_a, abar_b, exact


def test_anderson_inversion_reaches_the_exact_solution_where_plain_iteration_crawls():
    x, eps_at, abar_a, abar_b, exact = _slow_contraction_problem()
    anderson = ddim_invert_move(x, eps_at, abar_a, abar_b, iters=20, tol=1e-12, window=3)
    plain = ddim_invert_move(x, eps_at, abar_a, abar_b, iters=20, tol=1e-12, window=0)
    err_anderson = (anderson - exact).abs().max().item()
    err_plain = (plain - exact).abs().max().item()
    assert err_anderson < 1e-8, err_anderson
    assert err_plain > 0.1 * exact.abs().max().item()  # 0.95^21 ~ 0.34 of the start error left
    # it is the inverse of the decoding move under the same noise prediction
    back = ddim_move(anderson, eps_at(anderson), abar_b, abar_a)
    torch.testing.assert_close(back, x, atol=1e-8, rtol=0)


def test_inversion_solver_budget_and_plain_fallback():
    x, eps_at, abar_a, abar_b, _ = _slow_contraction_problem(n=3, d=4)
    calls = []

    def counted(y):
        calls.append(1)
        return eps_at(y)

    ddim_invert_move(x, counted, abar_a, abar_b, iters=5, tol=0.0, window=3)
    assert len(calls) == 6  # the explicit guess + at most `iters` refinements
    calls.clear()
    explicit = ddim_invert_move(x, counted, abar_a, abar_b, iters=0, tol=0.0)
    assert len(calls) == 1
    torch.testing.assert_close(explicit, ddim_move(x, eps_at(x), abar_a, abar_b))
    # window 0 is plain fixed-point iteration: y <- move(x; eps(y)), three times after the guess
    y = ddim_move(x, eps_at(x), abar_a, abar_b)
    for _ in range(3):
        y = ddim_move(x, eps_at(y), abar_a, abar_b)
    torch.testing.assert_close(ddim_invert_move(x, eps_at, abar_a, abar_b, iters=3, tol=0.0, window=0), y)
    with pytest.raises(MedCausalError, match="window"):
        ddim_invert_move(x, eps_at, abar_a, abar_b, iters=3, tol=0.0, window=-1)


def test_queries_use_the_averaged_denoiser_and_training_keeps_the_last_weights():
    from medcausal.mechanisms.base import StandaloneLoss
    from medcausal.train import TrainConfig, train
    torch.manual_seed(0)
    m = DiffusionMechanism(Continuous(), 1, hidden=[8], steps=5, init_scale=1.0)
    pa = torch.randn(64, 1)
    x = pa + 0.3 * torch.randn(64, 1)
    result = train(StandaloneLoss(m), {"x": x, "pa": pa}, TrainConfig(max_epochs=4, batch_size=16, lr=0.05,
                                                                       patience=1, verbose=False))
    assert len(result.history) == 4 and int(m.ema_steps) == result.steps  # no early stop, one update a step
    live = dict(m.net.named_parameters())
    assert any(not torch.equal(live[k], v) for k, v in m.ema_parameters().items())
    xt, t = torch.randn(5, 1), torch.full((5,), 40)
    with torch.no_grad():
        cond = m._cond(pa[:5])
        torch.testing.assert_close(m._raw(xt, t, cond), m._raw(xt, t, cond, ema=True))
        assert not torch.allclose(m._raw(xt, t, cond), m._raw(xt, t, cond, ema=False))
        m.use_ema = False
        torch.testing.assert_close(m._raw(xt, t, cond), m._raw(xt, t, cond, ema=False))


def test_a_model_file_without_averaged_weights_loads_and_answers_as_before(tmp_path):
    # Files written before the denoiser's weights were averaged have no ema.* entries: the
    # average starts from the saved weights, so queries are unchanged.
    sim = scm("chain")
    data = sim.sample(200, seed=0)
    model = mc.CausalModel(sim.graph, mechanisms={"x2": {"name": "diffusion", "hidden": [8], "steps": 5}})
    model.fit(data, max_epochs=2, verbose=False)
    mech = model.mechanisms["x2"]
    mech.ema.load_state_dict({k: v + 1.0 for k, v in mech.ema.state_dict().items()})  # EMA != live
    mech.use_ema = False
    expected = model.counterfactual(data.head(20), do={"x1": 0.5}, seed=0)
    state = {k: v for k, v in mech.state_dict().items() if not (k.startswith("ema.") or k == "ema_steps")}
    fresh = DiffusionMechanism(Continuous(), mech.parent_dims, hidden=[8], steps=5)
    fresh.load_state_dict(state)  # strict: the missing entries are filled, not an error
    assert int(fresh.ema_steps) == 0
    for k, v in fresh.ema_parameters().items():
        torch.testing.assert_close(v, dict(fresh.net.named_parameters())[k])
    model.mechanisms["x2"] = fresh
    pd.testing.assert_frame_equal(model.counterfactual(data.head(20), do={"x1": 0.5}, seed=0), expected)


def test_set_steps_is_saved_with_the_model(tmp_path):
    # a query-time setting: the model file kept the constructor's steps, so a loaded model answered with 25
    sim = mc.synthetic.scm("chain")
    model = mc.CausalModel(sim.graph, mechanisms={"x2": {"name": "diffusion", "hidden": [8],
                                                         "loc_scale_members": 1}})
    model.fit(sim.sample(200, seed=0), max_epochs=1, verbose=False)
    model.mechanism("x2").set_steps(3)
    model.save(tmp_path / "m.mcm")
    assert mc.CausalModel.load(tmp_path / "m.mcm").mechanism("x2").steps == 3


# --------------------------------------------------------------------------- bad input and edge cases

def _diffusion(**kw):
    torch.manual_seed(0)
    return DiffusionMechanism(Continuous(dim=2), 1, **{"hidden": [8], "steps": 5, "loc_scale_members": 2,
                                                       "loc_scale_hidden": [8], **kw})


def test_diffusion_float64_and_integer_inputs():
    m = _diffusion()
    x, pa = torch.randn(3, 2), torch.randn(3, 1)
    with torch.no_grad():
        u = m.abduct(x, pa)
        assert torch.allclose(m.abduct(x.double(), pa.double()).float(), u, atol=1e-5)
        assert torch.allclose(m.sample(pa.double(), noise=u.double()).float(), m.sample(pa, noise=u), atol=1e-5)
        ints = torch.tensor([[0], [1], [2]])
        assert torch.allclose(m.sample(ints, noise=u).float(), m.sample(ints.float(), noise=u), atol=1e-6)


def test_diffusion_sample_checks_parents_and_names_the_noise():
    m = _diffusion()
    with pytest.raises(MedCausalError, match=r"parents must have shape \[n, 1\]"):
        m.sample(torch.randn(3, 4))
    with pytest.raises(MedCausalError, match="noise"):
        m.sample(torch.randn(3, 1), noise=torch.randn(3, 5))


@pytest.mark.parametrize("setting, value", [("time_freqs", -1), ("hidden", [8, 0])])
def test_diffusion_bad_settings_name_the_setting(setting, value):
    with pytest.raises(MedCausalError, match=setting):
        _diffusion(**{setting: value})
