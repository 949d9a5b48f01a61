"""The ``hvae`` and ``cvae`` image mechanisms: abduction, latent modes, EMA, learning.

Ground truth: synthetic discs whose radius and brightness are the parents and whose
centre and pixel noise are the exogenous noise, so every unit's true counterfactual
is rendered exactly.
"""

import numpy as np
import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.errors import DataError, MedCausalError
from medcausal.graph import Image
from medcausal.mechanisms import cvae as _cvae  # noqa: F401  (registers "cvae")
from medcausal.mechanisms import hvae as _hvae  # noqa: F401  (registers "hvae")
from medcausal.mechanisms import registry

from conftest import discs  # noqa: E402  (16x16 disc images with known parents)
from medcausal.mechanisms.cvae import CVAEMechanism
from medcausal.mechanisms.hvae import HVAEMechanism, _pose_moments, _similarity_warp

SIZE = 16
TINY = {"channels": [8, 16], "z_dim": 3, "latent_levels": 2}
VARIANTS = {
    "hvae": ("hvae", TINY),
    "hvae-mediator-prior": ("hvae", {**TINY, "latent_mode": "mediator", "mediator_abduction": "prior"}),
    "hvae-mediator-mixture-alpha1": ("hvae", {**TINY, "latent_mode": "mediator", "alpha": 1.0}),
    "hvae-parent-embedding": ("hvae", {**TINY, "parent_embedding": 8}),
    "hvae-no-pose-warp": ("hvae", {**TINY, "pose_warp": False}),
    "cvae": ("cvae", {"channels": [8, 16], "z_dim": 4, "hidden": 32}),
}


def make(variant, parents=2, seed=0):
    name, kw = VARIANTS[variant]
    torch.manual_seed(seed)
    return registry.get(name)(Image((1, SIZE, SIZE)), parents, **kw)


def test_registered_as_image_mechanisms():
    for name in ("hvae", "cvae"):
        cls = registry.get(name)
        assert cls.supports == ("image",) and cls.abduction == "amortized" and not cls.has_log_prob
    assert registry.default_for("image") == "hvae"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_null_counterfactual_reproduces_real_images(variant):
    # Images not drawn from the model: the pixel noise must still be abducted exactly.
    m = make(variant).eval()
    x, pa, _ = discs(16, seed=3)
    with torch.no_grad():
        noise = m.abduct(x, pa)
        assert noise.shape == m.noise_like(16).shape
        again = m.sample(pa, noise=noise)
    assert (again - x).abs().max().item() <= m.reconstruction_tolerance


def test_mediator_mixture_is_not_exact_below_alpha_one():
    # The paper's mixture moves the latents toward the prior even under a null intervention.
    torch.manual_seed(0)
    m = HVAEMechanism(Image((1, SIZE, SIZE)), 2, **TINY, latent_mode="mediator", alpha=0.5).eval()
    x, pa, _ = discs(16, seed=3)
    with torch.no_grad():
        noise = m.abduct(x, pa)
        mixed = m.latents(pa, noise)
        with m.holding_latents():
            held = m.latents(pa, noise)
        err = (m.sample(pa, noise=noise) - x).abs().max().item()
        m.alpha = 1.0
        exact = (m.sample(pa, noise=noise) - x).abs().max().item()
    assert max((a - b).abs().max().item() for a, b in zip(mixed, held)) > 1e-2
    assert err > 1e-5  # well above float rounding
    assert exact <= m.reconstruction_tolerance


def test_exogenous_latents_ignore_the_parents():
    m = make("hvae").eval()
    x, pa, _ = discs(8, seed=4)
    noise = m.abduct(x, pa)
    for a, b in zip(m.latents(pa, noise), m.latents(pa + 1.5, noise)):
        assert torch.equal(a, b)


def test_mediator_latents_follow_the_parents_unless_held():
    m = make("hvae-mediator-prior").eval()
    x, pa, _ = discs(8, seed=4)
    noise = m.abduct(x, pa)
    fact, moved = m.latents(pa, noise), m.latents(pa + 1.5, noise)
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(fact, moved))
    with m.holding_latents():
        held = m.latents(pa + 1.5, noise)
    for a, b in zip(fact, held):  # held latents = the abducted ones (posterior means)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not m._hold  # the context manager restores the setting


def test_mixture_alpha_one_equals_holding_latents():
    m = make("hvae-mediator-mixture-alpha1").eval()
    x, pa, _ = discs(8, seed=5)
    noise = m.abduct(x, pa)
    with torch.no_grad():
        a = m.sample(pa + 1.0, noise=noise)
        with m.holding_latents():
            b = m.sample(pa + 1.0, noise=noise)
    torch.testing.assert_close(a, b)


def test_ema_update_matches_its_formula():
    m = make("hvae")
    m.train()
    before = {k: v.clone() for k, v in m.ema_parameters().items()}
    opt = torch.optim.Adam(m.net.parameters(), lr=1e-2)
    x, pa, _ = discs(8)
    m.after_optimizer_step()  # first EMA update (k = 1): live == initial weights, EMA unchanged
    for k, ema in m.ema_parameters().items():
        torch.testing.assert_close(ema, before[k])
    m.loss(x, pa).mean().backward()
    opt.step()
    after_step = {k: p.detach().clone() for k, p in m.net.named_parameters()}
    m.after_optimizer_step()  # second update, k = 2: d = min(0.999, 3 / 12)
    d = 3.0 / 12.0
    for k, ema in m.ema_parameters().items():
        torch.testing.assert_close(ema, d * before[k] + (1 - d) * after_step[k])
    m.eval()
    with torch.no_grad():  # queries use the averaged weights unless asked otherwise
        a = m.sample(pa, generator=torch.Generator().manual_seed(0))
        b = m.sample(pa, generator=torch.Generator().manual_seed(0), ema=False)
    assert not torch.allclose(a, b)
    assert int(m.ema_steps) == 2


def test_only_optimizer_steps_of_the_training_loop_touch_the_ema():
    from medcausal.train import TrainConfig, train
    from medcausal.mechanisms.base import StandaloneLoss
    m = make("hvae")
    x, pa, _ = discs(8)
    m.train()
    m.loss(x, pa).mean().backward()  # a loss call, even with gradients, does not average
    assert int(m.ema_steps) == 0
    result = train(StandaloneLoss(m), {"x": x, "pa": pa}, TrainConfig(max_steps=3, batch_size=4,
                                                                       val_fraction=0.0, verbose=False))
    assert result.steps == 3 and int(m.ema_steps) == 3


def test_errors_name_the_culprit():
    m = make("hvae")
    with pytest.raises(DataError, match=r"\(4, 1, 16, 16\)"):
        m.loss(torch.zeros(4, 16, 16, 1), torch.zeros(4, 2))
    with pytest.raises(DataError, match="parents"):
        m.sample(torch.zeros(4, 3))
    with pytest.raises(MedCausalError, match="latent_mode"):
        HVAEMechanism(Image((1, 16, 16)), 1, latent_mode="both")
    with pytest.raises(MedCausalError, match="2D images"):
        HVAEMechanism(Image((1, 8, 16, 16)), 1)
    with pytest.raises(MedCausalError, match="latent_levels"):
        HVAEMechanism(Image((1, 16, 16)), 1, channels=[8, 16], latent_levels=5)
    with pytest.raises(DataError, match="noise"):
        m.sample(torch.zeros(2, 2), noise=torch.zeros(2, 7))


def _fit(mech, x, pa, steps, lr):
    mech.fit(x, pa, max_steps=steps, max_epochs=10 ** 6, batch_size=32, lr=lr, patience=10 ** 6,
             seed=0, verbose=False)
    return mech.eval()


def _disc_cf_errors(mech, n=200):
    x, pa, info = discs(n, seed=1)
    rng = np.random.default_rng(5)
    r2, b2 = rng.uniform(2, 6, n), 1 - info["b"]
    x_true, pa2, _ = discs(n, radius=r2, bright=b2, centre=info["c"], noise=info["eps"])
    with torch.no_grad():
        cf = mech.counterfactual(x, pa, pa2)
        fresh = mech.sample(pa2, generator=torch.Generator().manual_seed(0))
    return ((cf - x_true).abs().mean().item(), (fresh - x_true).abs().mean().item(),
            (x - x_true).abs().mean().item())


@pytest.mark.parametrize("variant", ["hvae", "cvae"])
def test_learns_counterfactual_discs(variant):
    # Known answer: the true counterfactual keeps the disc's centre and pixel noise and takes
    # the new radius and brightness. The patient's own abducted noise must beat both a fresh
    # interventional sample (null abduction) and the unchanged image.
    x, pa, _ = discs(1500, seed=0)
    mech = _fit(make(variant), x, pa, steps=150, lr=5e-3)
    cf, fresh, unchanged = _disc_cf_errors(mech)
    assert cf < 0.6 * fresh and cf < 0.6 * unchanged, (cf, fresh, unchanged)
    # The centre is exogenous and not a parent: the decoder can only place the disc through
    # the latents, so some latent group must carry information (measured: hvae's 8x8 level
    # 25 nats per image, its global level ~0; cvae 8 nats).
    torch.manual_seed(0)
    assert mech.latent_kl(x[:200], pa[:200]).mean(0).max().item() > 2.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_latent_kl_splits_the_elbo_kl_term(variant):
    m = make(variant).eval()
    x, pa, _ = discs(8, seed=2)
    torch.manual_seed(1)
    per_group = m.latent_kl(x, pa, ema=False)
    torch.manual_seed(1)  # the same posterior draws
    total = m.elbo_terms(x, pa)["kl"]
    assert per_group.shape == (8, 1 if variant == "cvae" else TINY["latent_levels"])
    assert torch.allclose(per_group.sum(1), total, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_hvae_counterfactual_halves_the_null_abduction_error():
    x, pa, _ = discs(2000, seed=0)
    mech = _fit(make("hvae"), x, pa, steps=600, lr=3e-3)
    cf, fresh, _ = _disc_cf_errors(mech)
    assert cf <= 0.5 * fresh, (cf, fresh)


def test_causal_model_with_an_image_variable_round_trips(tmp_path):
    x, pa, info = discs(64, seed=0)
    table = pd.DataFrame({"radius": info["r"], "bright": info["b"]})
    cohort = mc.Cohort(table, {"img": x.numpy()})
    graph = mc.CausalGraph({"radius": "continuous", "bright": "binary", "img": Image((1, SIZE, SIZE))},
                           edges=[("radius", "img"), ("bright", "img")])
    model = mc.CausalModel(graph, mechanisms={"img": {"name": "hvae", **TINY}}).fit(
        cohort, max_steps=3, batch_size=32, lr=1e-3, verbose=False)
    null = model.counterfactual(cohort[:5], do={"radius": info["r"][:5]})
    np.testing.assert_allclose(null.arrays["img"], x[:5].numpy(), atol=HVAEMechanism.reconstruction_tolerance)
    cf = model.counterfactual(cohort[:5], do={"radius": 5.0})
    assert cf.arrays["img"].shape == (5, 1, SIZE, SIZE)
    model.save(tmp_path / "m.mcm")
    again = mc.CausalModel.load(tmp_path / "m.mcm").counterfactual(cohort[:5], do={"radius": 5.0})
    np.testing.assert_allclose(again.arrays["img"], cf.arrays["img"], atol=1e-6)
    model.mechanism("img").alpha = 0.3  # a query-time setting, saved as it is now
    model.save(tmp_path / "a.mcm")
    assert mc.CausalModel.load(tmp_path / "a.mcm").mechanism("img").alpha == 0.3


@pytest.mark.parametrize("pose_warp", [False, True])
def test_a_model_file_that_does_not_name_pose_warp_is_built_as_written(tmp_path, pose_warp):
    # Files from before pose_warp was on by default do not name it (False: the plain ladder);
    # files from the first commits with the warp did not name it either (True). The weights tell.
    import json

    x, pa, info = discs(64, seed=0)
    cohort = mc.Cohort(pd.DataFrame({"radius": info["r"], "bright": info["b"]}), {"img": x.numpy()})
    graph = mc.CausalGraph({"radius": "continuous", "bright": "binary", "img": Image((1, SIZE, SIZE))},
                           edges=[("radius", "img"), ("bright", "img")])
    model = mc.CausalModel(graph, mechanisms={"img": {"name": "hvae", **TINY, "pose_warp": pose_warp}})
    model.fit(cohort, max_steps=3, batch_size=32, lr=1e-3, verbose=False)
    cf = model.counterfactual(cohort[:5], do={"radius": 5.0}).arrays["img"]
    model.save(tmp_path / "m.mcm")
    payload = torch.load(tmp_path / "m.mcm", weights_only=True)
    spec = json.loads(payload["medcausal"])
    del spec["mechanisms"]["img"]["pose_warp"]
    torch.save({"medcausal": json.dumps(spec), "state_dict": payload["state_dict"]}, tmp_path / "old.mcm")
    old = mc.CausalModel.load(tmp_path / "old.mcm")
    assert (old.mechanism("img").net.pose_logscale is not None) == pose_warp
    np.testing.assert_allclose(old.counterfactual(cohort[:5], do={"radius": 5.0}).arrays["img"], cf, atol=1e-6)


def test_counterfactual_finetuning_runs_and_keeps_the_predictor_frozen():
    from medcausal.metrics.predictors import AntiCausalPredictor

    x, pa, info = discs(64, seed=0)
    pred = AntiCausalPredictor((1, SIZE, SIZE), {"r": "continuous", "b": "binary"}, channels=[4], features=8)
    pred.fit(x, {"r": pa[:, 0].numpy(), "b": info["b"]}, max_epochs=1, verbose=False)
    frozen = {k: v.clone() for k, v in pred.state_dict().items()}
    m = make("hvae")
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    result = m.finetune_counterfactual(x, pa, pred.parent_nll, max_steps=3, batch_size=16, verbose=False)
    assert result.steps == 3
    assert any(not torch.equal(v, m.net.state_dict()[k]) for k, v in before.items())
    for k, v in pred.state_dict().items():
        assert torch.equal(v, frozen[k]), f"predictor weight {k} changed"
    assert all(p.requires_grad for p in pred.parameters())


def test_weights_and_parents_are_checked():
    for name, kw in (("hvae", TINY), ("cvae", VARIANTS["cvae"][1])):
        for beta in (-1.0, float("nan")):
            with pytest.raises(MedCausalError, match="beta"):
                registry.get(name)(Image((1, 16, 16)), 1, **kw, beta=beta)
    for variant in ("hvae", "cvae"):
        m = make(variant)
        pa = torch.zeros(3, 2)
        pa[1, 0] = float("nan")
        with pytest.raises(DataError, match="1 non-finite"):
            m.sample(pa)
        with pytest.raises(DataError, match="1 non-finite"):
            m.abduct(torch.rand(3, 1, SIZE, SIZE), pa)



def test_finetuning_reaches_the_averaged_weights_queries_use():
    # queries use the EMA; after a long fit its decay is ~0.997, so without restarting the
    # average the fine-tuned weights barely reached the answers (0.25 brightness against 0.81)
    torch.manual_seed(0)
    m = make("hvae", parents=1)
    x, pa = torch.rand(64, 1, SIZE, SIZE) * 0.5, torch.randn(64, 1)
    m.fit(x, pa, max_steps=60, batch_size=32, verbose=False)
    m.ema_steps.fill_(3000)  # as after a 3000-step fit
    queried = {k: v.clone() for k, v in m.ema_parameters().items()}
    bright = lambda img, p: (img.mean((1, 2, 3)) - 0.9) ** 2 * 100  # noqa: E731  (push CF scans to 0.9)
    m.finetune_counterfactual(x, pa, bright, max_steps=60, batch_size=32, lr=1e-3, elbo_slack=10.0, verbose=False)
    with torch.no_grad():
        pa2 = pa[torch.randperm(64)]
        live = m._counterfactual(x, pa, pa2, ema=False).mean().item()
        answered = m._counterfactual(x, pa, pa2).mean().item()
    factual = x.mean().item()
    assert live - factual > 0.3  # fine-tuning did brighten the counterfactuals
    assert abs(answered - live) < 0.2 * (live - factual)
    assert not all(torch.equal(v, m.ema_parameters()[k]) for k, v in queried.items())


@pytest.mark.parametrize("variant", ["hvae", "cvae"])
def test_abduct_sample_draws_without_a_generator(variant):
    name, kw = VARIANTS[variant]
    torch.manual_seed(0)
    m = registry.get(name)(Image((1, SIZE, SIZE)), 2, **kw, abduct_sample=True)
    mean = registry.get(name)(Image((1, SIZE, SIZE)), 2, **kw)
    mean.load_state_dict(m.state_dict())
    x, pa = torch.rand(3, 1, SIZE, SIZE), torch.randn(3, 2)
    a, b, at_mean = m.abduct(x, pa), m.abduct(x, pa), mean.abduct(x, pa)
    k = m.net.latent_noise_dim
    assert not torch.equal(a[:, :k], b[:, :k]) and not torch.equal(a[:, :k], at_mean[:, :k])
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(m.abduct(x, pa, generator=g()), m.abduct(x, pa, generator=g()))


def test_parent_embedding_trains_every_weight_and_shapes_the_coarsest_grid():
    m = make("hvae-parent-embedding")
    x, pa, _ = discs(8, seed=2)
    m.loss(x, pa).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.net.parameters() if p.requires_grad)
    assert m.net.pa_map.out_features == 16 * 8 * 8  # channels x grid of the coarsest non-global level
    # an image with no grid coarser than itself gets no map, and still round-trips
    tiny = HVAEMechanism(Image((1, 1, 1)), 2, channels=[4], z_dim=1, latent_levels=1, parent_embedding=4,
                         pose_warp=False)
    assert tiny.net.pa_map is None
    x1, pa1 = torch.rand(3, 1, 1, 1), torch.randn(3, 2)
    assert (tiny.sample(pa1, noise=tiny.abduct(x1, pa1)) - x1).abs().max() <= tiny.reconstruction_tolerance
    with pytest.raises(MedCausalError, match="parent_embedding"):
        HVAEMechanism(Image((1, SIZE, SIZE)), 2, **{**TINY, "parent_embedding": -1})


VAES = {
    "hvae": (HVAEMechanism, {"channels": [4, 8], "z_dim": 3, "latent_levels": 2}),
    "cvae": (CVAEMechanism, {"channels": [4, 8], "z_dim": 2, "hidden": 16}),
}


def _vae(name, shape=(1, 16, 16), parents=2, **kw):
    cls, base = VAES[name]
    torch.manual_seed(0)
    return cls(Image(shape), parents, **{**base, **kw}).eval()


@pytest.mark.parametrize("name", list(VAES))
def test_vae_float64_and_integer_inputs(name):
    m = _vae(name)
    x, pa = torch.rand(2, 1, 16, 16), torch.randn(2, 2)
    with torch.no_grad():
        u = m.abduct(x, pa)
        want = m.sample(pa, noise=u)
        # float64 image, parents and noise give the float32 answer
        assert torch.allclose(m.abduct(x.double(), pa.double()).float(), u, atol=1e-5)
        assert torch.allclose(m.sample(pa.double(), noise=u.double()).float(), want, atol=1e-5)
        ints = torch.tensor([[0, 1], [1, 0]])
        assert torch.allclose(m.sample(ints, noise=u).float(), m.sample(ints.float(), noise=u), atol=1e-6)


@pytest.mark.parametrize("name", list(VAES))
def test_vae_abduct_rejects_nan_pixels(name):
    m = _vae(name)
    x = torch.rand(2, 1, 16, 16)
    x[1, 0, 3, 4] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        m.abduct(x, torch.zeros(2, 2))


@pytest.mark.parametrize("name", list(VAES))
@pytest.mark.parametrize("setting, value", [("z_dim", -1), ("sigma_min", 0.0), ("channels", [4, 0]),
                                            ("channels", [])])
def test_vae_bad_settings_name_the_setting(name, setting, value):
    with pytest.raises(MedCausalError, match=setting):
        _vae(name, **{setting: value})


def test_hvae_z_dim_zero_is_refused():
    with pytest.raises(MedCausalError, match="z_dim"):
        _vae("hvae", z_dim=0)


def test_hvae_latents_checks_noise_width():
    m = _vae("hvae", parents=1)
    with pytest.raises(DataError, match="noise"):
        m.latents(torch.zeros(2, 1), torch.randn(2, 3))


def _ellipse(height=32, width=32, half_x=0.35, half_y=0.6):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return (1 / (1 + torch.exp(-(1 - (xx / half_x) ** 2 - (yy / half_y) ** 2) / 0.05)))[None, None]


SHAPES = {"tall": _ellipse(), "wide": _ellipse(half_x=0.6, half_y=0.35),
          "tall, 32x48": _ellipse(32, 48, 0.3, 0.6), "wide, 48x32": _ellipse(48, 32, 0.6, 0.3)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("angle, shift", [(0.1, (0.0, 0.0)), (0.0, (0.08, 0.0)), (0.0, (0.0, -0.08)),
                                          (-0.05, (0.04, 0.04))])
def test_pose_moments_read_a_known_warp(shape, angle, shift):
    # Known answer: sampling the image at R p + t moves its content by -t and turns it by
    # -angle on the pixel grid, whatever the shape (tall or wide, square or not), so the centre
    # of mass moves by -t and the principal axis by -angle (to the interpolation's accuracy:
    # within 0.01).
    img = SHAPES[shape]
    before = _pose_moments(img)[0]
    after = _pose_moments(_similarity_warp(img, torch.tensor([[angle, *shift]])))[0]
    assert torch.allclose(after - before, torch.tensor([-shift[0], -shift[1], -angle]), atol=0.01), after - before


def test_a_fourth_pose_column_magnifies():
    img = _ellipse()
    big = _similarity_warp(img, torch.tensor([[0.0, 0.0, 0.0, float(np.log(1.2))]]))
    w0, w1 = img[0, 0], big[0, 0]
    c = torch.linspace(-1, 1, 32) ** 2
    ratio = ((w1 * c[:, None]).sum() / w1.sum()) / ((w0 * c[:, None]).sum() / w0.sum())
    assert abs(ratio.item() - 1.2 ** 2) < 0.05, ratio.item()  # second moments grow by the factor squared


def test_pose_warp_trains_every_weight_and_needs_three_latent_channels():
    m = make("hvae")
    x, pa, _ = discs(8, seed=2)
    m.loss(x, pa).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.net.parameters() if p.requires_grad)
    assert make("hvae-no-pose-warp").net.pose_pa is None
    with pytest.raises(MedCausalError, match="pose_warp needs z_dim >= 3"):
        HVAEMechanism(Image((1, SIZE, SIZE)), 2, **{**TINY, "z_dim": 2})


def test_pose_warp_carries_the_disc_centre_in_the_top_latent():
    # Ground truth: each disc's centre is exogenous (not a parent). With the pose warp the top
    # latent's first two pose channels are shifts of the decoded image, so after training they
    # must predict the true centre (linear R^2 over 200 held-out discs).
    x, pa, _ = discs(1500, seed=0)
    mech = _fit(make("hvae"), x, pa, steps=150, lr=5e-3)
    xt, pat, info = discs(200, seed=1)
    with torch.no_grad():
        z_top = mech.latents(pat, mech.abduct(xt, pat))[0].mean(dim=(2, 3)).numpy()
    X = np.c_[z_top, np.ones(len(z_top))]
    for j in range(2):
        y = info["c"][:, j]
        resid = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
        assert 1 - resid.var() / y.var() > 0.8, (j, 1 - resid.var() / y.var())
