"""The ``image-diffusion`` mechanism: DDIM-inversion abduction, the depth and guidance knobs.

Ground truth: the synthetic discs of ``test_hvae`` (radius and brightness are the parents;
centre and pixel noise the exogenous noise), so every unit's true counterfactual is known.
"""

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.errors import DataError, MedCausalError
from medcausal.graph import Continuous, Image
from medcausal.mechanisms import image_diffusion as _idiff  # noqa: F401  (registers "image-diffusion")
from medcausal.mechanisms import registry
from medcausal.mechanisms.image_diffusion import ImageDiffusionMechanism

from conftest import discs  # noqa: E402

SIZE = 16


TINY = {"channels": [8, 16], "norm_num_groups": 4, "cond_hidden": 16, "steps": 10}
# what the trained-toy tests use: a short schedule (T = 200) and 20 DDIM steps
TOY = {"channels": [16, 32], "norm_num_groups": 8, "cond_hidden": 32, "steps": 20, "num_train_timesteps": 200}


def make(parents=2, seed=0, shape=(1, SIZE, SIZE), **kw):
    torch.manual_seed(seed)
    return ImageDiffusionMechanism(Image(shape), parents, **{**TINY, **kw})


def test_registered_and_declared():
    cls = registry.get("image-diffusion")
    assert cls is ImageDiffusionMechanism
    assert cls.supports == ("image",) and cls.abduction == "deterministic-approximate" and not cls.has_log_prob


@pytest.mark.parametrize("depth,guidance", [(1.0, 1.0), (0.5, 1.0), (1.0, 2.5), (0.3, 2.5)])
def test_real_images_are_reconstructed_for_any_knobs(depth, guidance):
    # Images not drawn from the model; inversion and generation share the noise predictions,
    # so a null intervention reproduces the scan whatever the depth and guidance.
    m = make(cfg_dropout=0.2).eval()
    x, pa, _ = discs(8, seed=3)
    with torch.no_grad():
        u = m.abduct(x, pa, depth=depth, guidance=guidance)
        assert u.shape == m.noise_like(8).shape == (8, SIZE * SIZE)
        again = m.sample(pa, noise=u, depth=depth, guidance=guidance)
    assert (again - x).abs().max().item() <= m.reconstruction_tolerance


def test_volumes_3d_and_the_semantic_code():
    m = make(parents=1, shape=(1, 8, 8, 8), channels=[4, 8], semantic_dim=3).eval()
    x, pa = torch.rand(4, 1, 8, 8, 8), torch.randn(4, 1)
    assert m.loss(x, pa).shape == (4,)
    with torch.no_grad():
        u = m.abduct(x, pa)
        assert u.shape == m.noise_like(4).shape == (4, 3 + 512)
        again = m.sample(pa, noise=u)
        code = m._code(x * 2 - 1)
    torch.testing.assert_close(u[:, :3], code)  # the noise carries the abducted code (posterior mean)
    assert (again - x).abs().max().item() <= m.reconstruction_tolerance
    # the code conditions the denoiser: another code changes the image generated from the same latent
    with torch.no_grad():
        other = m.sample(pa, noise=torch.cat([u[:, :3] + 2.0, u[:, 3:]], 1))
    assert (other - again).abs().max().item() > 1e-4


def test_gradients_reach_null_embedding_and_encoder_in_one_batch():
    m = make(semantic_dim=4, cfg_dropout=0.1)
    x, pa, _ = discs(16)
    m.loss(x, pa).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "net.unet.class_embedding.null" in dict(m.named_parameters())


def test_cfg_dropout_drops_that_fraction_of_rows():
    # The dropped rows are stratified: floor(p n) or ceil(p n) rows of every batch.
    from medcausal.mechanisms.image_diffusion import _spread

    torch.manual_seed(0)
    for n, p in [(32, 0.1), (100, 0.25), (7, 0.5)]:
        for _ in range(20):
            k = int((_spread(n, "cpu", golden=False) < p).sum())
            assert np.floor(p * n) <= k <= np.ceil(p * n), (n, p, k)
    # a single row (per-record losses) is dropped with probability p
    drops = [float(_spread(1, "cpu", golden=False)) < 0.3 for _ in range(4000)]
    assert abs(np.mean(drops) - 0.3) < 0.03  # 4 sd of a Bernoulli(0.3) mean over 4000 draws


def test_hparams_json_and_weights_round_trip():
    m = make(semantic_dim=2)
    json.dumps(m.hparams)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = make(semantic_dim=2, seed=9)
    other.load_state_dict(torch.load(buf, weights_only=True))
    x, pa, _ = discs(4)
    with torch.no_grad():
        torch.testing.assert_close(m.counterfactual(x, pa, pa + 1, depth=0.5),
                                   other.counterfactual(x, pa, pa + 1, depth=0.5))


def test_ema_is_updated_by_the_training_loop():
    from medcausal.mechanisms.base import StandaloneLoss
    from medcausal.train import TrainConfig, train
    m = make()
    x, pa, _ = discs(8)
    m.train()
    m.loss(x, pa).mean().backward()  # a loss call alone does not average
    assert int(m.ema_steps) == 0
    result = train(StandaloneLoss(m), {"x": x, "pa": pa}, TrainConfig(max_steps=2, batch_size=4,
                                                                       val_fraction=0.0, verbose=False))
    assert result.steps == 2 and int(m.ema_steps) == 2
    assert m.select_by_validation is False  # the loop keeps the last weights (tests/test_train.py)


def test_errors_name_the_culprit():
    m = make()
    with pytest.raises(DataError, match=r"\(4, 1, 16, 16\)"):
        m.loss(torch.zeros(4, 16, 16, 1), torch.zeros(4, 2))
    with pytest.raises(DataError, match="parents"):
        m.sample(torch.zeros(4, 3))
    with pytest.raises(DataError, match="noise"):
        m.sample(torch.zeros(2, 2), noise=torch.zeros(2, 7))
    with pytest.raises(DataError, match="non-finite"):
        m.abduct(torch.full((2, 1, 16, 16), float("nan")), torch.zeros(2, 2))
    nan_parents = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
    with pytest.raises(DataError, match="parents have 1 non-finite"):
        m.sample(nan_parents)
    with pytest.raises(DataError, match="parents have 1 non-finite"):
        m.abduct(torch.rand(2, 1, 16, 16), nan_parents)
    with pytest.raises(MedCausalError, match="depth"):
        m.counterfactual(torch.rand(2, 1, 16, 16), torch.zeros(2, 2), torch.zeros(2, 2), depth=0.0)
    with pytest.raises(MedCausalError, match="depth"):
        make(depth=1.5)
    with pytest.raises(MedCausalError, match="cfg_dropout"):
        make(cfg_dropout=0.0, guidance=2.0)
    with pytest.raises(MedCausalError, match="cfg_dropout"):
        make(parents=0, guidance=2.0)
    with pytest.raises(MedCausalError, match="divisible"):
        ImageDiffusionMechanism(Image((1, 10, 10)), 1, channels=[8, 16, 16], norm_num_groups=4)
    with pytest.raises(MedCausalError, match="norm_num_groups"):
        ImageDiffusionMechanism(Image((1, 16, 16)), 1, channels=[8, 12], norm_num_groups=8)
    with pytest.raises(MedCausalError, match="prediction"):
        make(prediction="x0")
    with pytest.raises(MedCausalError, match="images"):
        ImageDiffusionMechanism(Continuous(), 1)


# -- a briefly trained model on the discs --------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    x, pa, _ = discs(1500, seed=0)
    torch.manual_seed(0)
    m = ImageDiffusionMechanism(Image((1, SIZE, SIZE)), 2, **TOY)
    m.fit(x, pa, max_steps=150, max_epochs=10 ** 6, batch_size=32, lr=3e-3, patience=10 ** 6, seed=0,
          verbose=False)
    m.eval()
    n = 32
    x, pa, info = discs(n, seed=1)
    r2 = np.random.default_rng(5).uniform(2, 6, n)  # do(radius); brightness kept
    x_true, pa2, _ = discs(n, radius=r2, bright=info["b"], centre=info["c"], noise=info["eps"])
    sign = torch.from_numpy(np.sign(r2 - info["r"])).float()
    return m, x, pa, pa2, x_true, sign


def _signed_mass_change(cf, x, sign):
    """Mean change of total intensity, signed by the direction of the true radius change."""
    return float(((cf - x).sum((1, 2, 3)) * sign).mean())


def test_trained_counterfactual_beats_null_abduction_and_moves_the_right_way(trained):
    m, x, pa, pa2, x_true, sign = trained
    with torch.no_grad():
        u = m.abduct(x, pa)
        again = m.sample(pa, noise=u)  # null intervention on real (not generated) images
        cf = m.sample(pa2, noise=u)
        fresh = m.sample(pa2, generator=torch.Generator().manual_seed(0))
    assert (again - x).abs().max().item() <= m.reconstruction_tolerance
    cf_err, fresh_err = (cf - x_true).abs().mean().item(), (fresh - x_true).abs().mean().item()
    unchanged = (x - x_true).abs().mean().item()
    # measured on 100 units (150 steps, seed 0): cf 0.052, null abduction 0.155, unchanged 0.098
    assert cf_err < 0.5 * fresh_err and cf_err < 0.75 * unchanged, (cf_err, fresh_err, unchanged)
    true_change = _signed_mass_change(x_true, x, sign)  # 25.0 on 100 units
    assert 0.25 * true_change < _signed_mass_change(cf, x, sign) < 1.5 * true_change


def test_depth_and_guidance_behave_as_documented(trained):
    # depth: less noising -> a smaller change of the image (minimality up, effectiveness down);
    # guidance > 1 -> a larger change in the direction of the intervention.
    m, x, pa, pa2, _, sign = trained
    change, dist = {}, {}
    with torch.no_grad():
        for depth in (0.3, 1.0):
            for w in (1.0, 3.0):
                cf = m.counterfactual(x, pa, pa2, depth=depth, guidance=w)
                change[depth, w] = _signed_mass_change(cf, x, sign)
                dist[depth, w] = (cf - x).abs().mean().item()
    assert dist[0.3, 1.0] < dist[1.0, 1.0] and dist[0.3, 3.0] < dist[1.0, 3.0], dist
    assert change[0.3, 1.0] < change[1.0, 1.0] and change[0.3, 3.0] < change[1.0, 3.0], change
    for depth in (0.3, 1.0):
        assert change[depth, 3.0] > change[depth, 1.0] > 0, change


def test_causal_model_with_an_image_diffusion_variable_round_trips(tmp_path):
    x, pa, info = discs(48, seed=0)
    cohort = mc.Cohort(pd.DataFrame({"radius": info["r"], "bright": info["b"]}), {"img": x.numpy()})
    graph = mc.CausalGraph({"radius": "continuous", "bright": "binary", "img": Image((1, SIZE, SIZE))},
                           edges=[("radius", "img"), ("bright", "img")])
    model = mc.CausalModel(graph, mechanisms={"img": {"name": "image-diffusion", **TINY}}).fit(
        cohort, max_steps=2, batch_size=16, lr=1e-3, verbose=False)
    null = model.counterfactual(cohort[:4], do={"radius": info["r"][:4]})
    np.testing.assert_allclose(null.arrays["img"], x[:4].numpy(), atol=ImageDiffusionMechanism.reconstruction_tolerance)
    cf = model.counterfactual(cohort[:4], do={"radius": 5.0})
    model.save(tmp_path / "m.mcm")
    again = mc.CausalModel.load(tmp_path / "m.mcm").counterfactual(cohort[:4], do={"radius": 5.0})
    np.testing.assert_allclose(again.arrays["img"], cf.arrays["img"], atol=1e-5)
    # knobs set after fit are saved with the model (they were lost: the file kept the constructor's)
    model.mechanism("img").set_knobs(depth=0.5, guidance=2.0)
    knobbed = model.counterfactual(cohort[:4], do={"radius": 5.0}).arrays["img"]
    model.save(tmp_path / "k.mcm")
    loaded = mc.CausalModel.load(tmp_path / "k.mcm")
    assert (loaded.mechanism("img").depth, loaded.mechanism("img").guidance) == (0.5, 2.0)
    np.testing.assert_allclose(loaded.counterfactual(cohort[:4], do={"radius": 5.0}).arrays["img"], knobbed,
                               atol=1e-5)


def test_refused_under_differential_privacy_with_the_reason():
    import medcausal as mc
    from medcausal.privacy import Privacy, PrivacyError

    rng = np.random.default_rng(0)
    cohort = mc.Cohort(pd.DataFrame({"age": rng.uniform(40, 80, 16)}),
                       {"img": rng.random((16, 1, 16, 16)).astype(np.float32)})
    graph = mc.CausalGraph({"age": "continuous", "img": Image((1, 16, 16))}, edges=[("age", "img")])
    model = mc.CausalModel(graph, mechanisms={"img": "image-diffusion"})
    with pytest.raises(PrivacyError, match="image-diffusion.*not verified exact"):
        model.fit(cohort, max_steps=1, verbose=False,
                  privacy=Privacy(noise_multiplier=1.0, delta=1e-3, public_bounds={"age": (0, 120)}))


# -- bad input and edge cases ----------------------------------------------------------------

IMG_DIFF = {"channels": [4, 8], "norm_num_groups": 4, "steps": 3, "num_train_timesteps": 20}


def test_image_diffusion_float64_inputs():
    torch.manual_seed(0)
    m = ImageDiffusionMechanism(Image((1, 8, 8)), 1, **IMG_DIFF).eval()
    x, pa = torch.rand(2, 1, 8, 8), torch.randn(2, 1)
    with torch.no_grad():
        u = m.abduct(x, pa)
        assert torch.allclose(m.abduct(x.double(), pa.double()).float(), u, atol=1e-5)
        assert torch.allclose(m.sample(pa.double(), noise=u.double()).float(), m.sample(pa, noise=u), atol=1e-5)


@pytest.mark.parametrize("setting, value", [("channels", []), ("norm_num_groups", 0), ("num_train_timesteps", 0),
                                            ("beta_end", 1.5), ("beta_start", 0.05)])
def test_image_diffusion_bad_settings_name_the_setting(setting, value):
    with pytest.raises(MedCausalError, match=setting):
        ImageDiffusionMechanism(Image((1, 8, 8)), 1, **{**IMG_DIFF, setting: value, **(
            {"beta_end": 0.02} if setting == "beta_start" else {})})


def test_image_diffusion_per_call_guidance_is_checked():
    torch.manual_seed(0)
    m = ImageDiffusionMechanism(Image((1, 8, 8)), 1, **{**IMG_DIFF, "cfg_dropout": 0.0}).eval()
    with torch.no_grad(), pytest.raises(MedCausalError, match="guidance"):
        m.sample(torch.zeros(1, 1), guidance=2.0)
    m = ImageDiffusionMechanism(Image((1, 8, 8)), 1, **IMG_DIFF).eval()
    with torch.no_grad(), pytest.raises(MedCausalError, match="guidance"):
        m.counterfactual(torch.rand(1, 1, 8, 8), torch.zeros(1, 1), torch.ones(1, 1), guidance=-1.0)


def test_image_diffusion_empty_batch():
    m = ImageDiffusionMechanism(Image((1, 8, 8)), 1, **IMG_DIFF).eval()
    with torch.no_grad():
        assert m.sample(torch.zeros(0, 1)).shape == (0, 1, 8, 8)
        assert m.abduct(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1)).shape == (0, 64)
