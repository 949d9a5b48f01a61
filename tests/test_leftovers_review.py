"""Small leftovers from earlier reviews: fit's RNG hygiene, zero-change cells in the single-cell
counterfactual error, and the argument checks of the iVAE's constructor."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.crl.ivae import IVAE, VAE
from medcausal.errors import MedCausalError
from medcausal.metrics.singlecell import counterfactual_error


# --------------------------------------------------------------------------- 3. fit and the global RNG
@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    return pd.DataFrame({"x": x, "y": 0.5 * x + rng.normal(scale=0.3, size=60)})


def _tiny(mechanism):
    graph = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    return mc.CausalModel(graph, mechanisms={"x": mechanism, "y": mechanism})


def _weights(model):
    return {k: v.detach().clone() for k, v in model.mechanisms.state_dict().items()}


@pytest.mark.parametrize("mechanism", ["additive", "flow"])
def test_fit_with_a_seed_ignores_the_callers_global_rng(pair, mechanism):
    fits = []
    for global_seed in (1, 12345):
        torch.manual_seed(global_seed)
        fits.append(_tiny(mechanism).fit(pair, seed=0, max_epochs=2, verbose=False))
    a, b = (_weights(m) for m in fits)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    pd.testing.assert_frame_equal(fits[0].sample(5, seed=3), fits[1].sample(5, seed=3))


@pytest.mark.parametrize("mechanism", ["additive", "flow"])
def test_fit_leaves_the_callers_global_rng_as_it_was(pair, mechanism):
    # Old code: fit() called torch.manual_seed(seed), so the caller's next draws were replaced by
    # the continuation of the fit's own stream (and were the same after every fit with that seed).
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    _tiny(mechanism).fit(pair, seed=0, max_epochs=2, verbose=False)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_a_failed_fit_leaves_the_callers_global_rng_as_it_was(pair):
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    with pytest.raises(MedCausalError):
        _tiny("additive").fit(pair, seed=0, max_epochs=2, lr=-1.0, verbose=False)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


# Standalone fits (outside CausalModel) seeded torch's global RNG with torch.manual_seed(seed):
# the caller's next draws became the continuation of the fit's own stream. Each helper below
# builds its model (weight initialization draws from the caller's RNG, as any torch module
# does) and returns the fit alone.
def _image_data(n=8, size=8):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, size, size, generator=gen), torch.randn(n, 1, generator=gen)


def _hvae():
    from medcausal.graph import Image
    from medcausal.mechanisms.hvae import HVAEMechanism
    x, pa = _image_data()
    m = HVAEMechanism(Image((1, 8, 8)), parents=1, channels=[4, 8], z_dim=2, latent_levels=2)
    return m, x, pa


def _fit_hvae():
    m, x, pa = _hvae()
    return lambda: m.fit(x, pa, max_steps=2, batch_size=4, verbose=False)


def _finetune_hvae():
    m, x, pa = _hvae()
    nll = lambda img, p: (img.mean((1, 2, 3)) - p[:, 0]) ** 2  # noqa: E731
    return lambda: m.finetune_counterfactual(x, pa, nll, max_steps=2, batch_size=4, verbose=False)


def _fit_image_diffusion():
    from medcausal.graph import Image
    from medcausal.mechanisms.image_diffusion import ImageDiffusionMechanism
    x, pa = _image_data(size=16)
    m = ImageDiffusionMechanism(Image((1, 16, 16)), parents=1, channels=[8, 16], norm_num_groups=4,
                                cond_hidden=8, steps=2)
    return lambda: m.fit(x, pa, max_steps=2, batch_size=4, verbose=False)


def _fit_predictor():
    from medcausal.metrics.predictors import AntiCausalPredictor
    x, pa = _image_data()
    p = AntiCausalPredictor((1, 8, 8), {"a": "continuous"}, channels=[4], features=8)
    return lambda: p.fit(x.numpy(), {"a": pa[:, 0].numpy()}, max_epochs=1, batch_size=4, verbose=False)


def _fit_ivae():
    from medcausal.crl.ivae import nonlinear_ica_data
    x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=20, n_sources=2, seed=0)
    return lambda: IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, verbose=False)


def _fit_fcr():
    from medcausal.adapters import singlecell as scad
    from medcausal.synthetic.perturbseq import PerturbSeq
    cells = PerturbSeq(n_genes=20, n_perturbations=2, seed=0).sample(60, seed=0)
    scad.setup_anndata(cells, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    return lambda: scad.FCRModel(hidden=[8], decoder_hidden=[8]).fit(cells, max_epochs=1, seed=0, verbose=False)


STANDALONE_FITS = {"hvae": _fit_hvae, "hvae-finetune": _finetune_hvae, "image-diffusion": _fit_image_diffusion,
                   "anti-causal-predictor": _fit_predictor, "ivae": _fit_ivae, "fcr": _fit_fcr}


@pytest.mark.parametrize("make_fit", STANDALONE_FITS.values(), ids=STANDALONE_FITS.keys())
def test_standalone_fits_leave_the_callers_global_rng_as_it_was(make_fit):
    fit = make_fit()
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    fit()
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- 4. zero-change cells
def test_counterfactual_pearson_leaves_out_cells_the_intervention_does_not_change():
    factual = np.array([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]])
    true_cf = np.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])  # cell 1: true counterfactual == factual
    # Old code scored cell 1 (zero true change) as correlation 0: a perfect prediction got 0.5.
    assert counterfactual_error(true_cf, true_cf, factual=factual).pearson == pytest.approx(1.0, abs=1e-12)
    # Same when the unchanged cell's counts are only rescaled (a library-size change: no change
    # after log-normalization, up to rounding).
    scaled = true_cf.copy()
    scaled[1] *= 3.0
    assert counterfactual_error(scaled, scaled, factual=factual).pearson == pytest.approx(1.0, abs=1e-12)


def test_counterfactual_pearson_hand_computed_with_a_zero_change_cell():
    factual = np.array([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]])
    true_cf = np.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    pred = np.array([[1.0, 3.0, 2.0], [3.0, 1.0, 2.0]])  # cell 0 exactly right; cell 1 moved (wrongly)
    err = counterfactual_error(true_cf, pred, factual=factual)
    # Cell 0 is the only cell with a true change, and its predicted change is exactly the true
    # one: correlation 1. Cell 1 has no true change and is left out (its error is in the RMSE).
    assert err.pearson == pytest.approx(1.0, abs=1e-12)
    assert err.per_cell[0] == 0.0 and err.per_cell[1] > 0.5
    # Hand-computed: a predicted change that is the true one reversed correlates -1 (cell 0);
    # the zero-change cell 1 again does not count.
    err = counterfactual_error(true_cf, np.array([[5.0, 0.0, 1.0], [1.0, 3.0, 2.0]]), factual=factual)
    lt = np.log1p(np.array([1.0, 3.0, 2.0]) / 6 * 1e4) - np.log1p(np.array([3.0, 1.0, 2.0]) / 6 * 1e4)
    lp = np.log1p(np.array([5.0, 0.0, 1.0]) / 6 * 1e4) - np.log1p(np.array([3.0, 1.0, 2.0]) / 6 * 1e4)
    assert err.pearson == pytest.approx(float(np.corrcoef(lt, lp)[0, 1]), abs=1e-12)


def test_counterfactual_pearson_still_scores_a_flat_prediction_zero_and_no_change_nan():
    factual = np.array([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0]])
    true_cf = np.array([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    # predicting "no change" where the cell does change: 0 (cell 0); cell 1 does not count
    assert counterfactual_error(true_cf, factual, factual=factual).pearson == 0.0
    # no cell changes at all: there is no correlation to average
    assert math.isnan(counterfactual_error(factual, factual, factual=factual).pearson)


# --------------------------------------------------------------------------- 5. IVAE's constructor
@pytest.mark.parametrize("kwargs, name", [
    ({"latent_dim": "3"}, "latent_dim"), ({"latent_dim": "abc"}, "latent_dim"),
    ({"latent_dim": None}, "latent_dim"), ({"latent_dim": True}, "latent_dim"),
    ({"latent_dim": [3]}, "latent_dim"), ({"latent_dim": 2.5}, "latent_dim"),
    ({"latent_dim": 0}, "latent_dim"), ({"latent_dim": float("nan")}, "latent_dim"),
    ({"latent_dim": 2, "hidden": -1}, "hidden"), ({"latent_dim": 2, "hidden": "64"}, "hidden"),
    ({"latent_dim": 2, "hidden": (8, -1)}, "hidden"), ({"latent_dim": 2, "hidden": (8.0,)}, "hidden"),
    ({"latent_dim": 2, "decoder_var": "x"}, "decoder_var"),
    ({"latent_dim": 2, "decoder_var": "0.1"}, "decoder_var"),
    ({"latent_dim": 2, "decoder_var": math.inf}, "decoder_var"),
    ({"latent_dim": 2, "decoder_var": True}, "decoder_var"),
    ({"latent_dim": 2, "decoder_var": 0.0}, "decoder_var"),
    ({"latent_dim": 2, "slope": "x"}, "slope"), ({"latent_dim": 2, "slope": None}, "slope"),
    ({"latent_dim": 2, "slope": math.nan}, "slope"), ({"latent_dim": 2, "slope": math.inf}, "slope"),
    ({"latent_dim": 2, "prior_mean": "no"}, "prior_mean"),
    ({"latent_dim": 2, "encoder_u": "yes"}, "encoder_u"),
    ({"latent_dim": 2, "conditional_prior": None}, "conditional_prior"),
    ({"latent_dim": 2, "posterior": "half"}, "posterior"),
])
def test_ivae_constructor_refuses_bad_arguments_by_name(kwargs, name):
    with pytest.raises(MedCausalError, match=name):
        IVAE(**kwargs)


def test_vae_constructor_checks_too():
    with pytest.raises(MedCausalError, match="slope"):
        VAE(2, slope="steep")
    with pytest.raises(MedCausalError, match="latent_dim"):
        VAE("two")


def test_ivae_constructor_still_takes_valid_arguments():
    m = IVAE(np.int64(3), hidden=[np.int64(8), 4], decoder_var=None, slope=np.float32(0.1),
             prior_mean=np.bool_(True), encoder_u=True)
    assert (m.latent_dim, m.hidden, m.decoder_var, m.prior_mean, m.encoder_u) == (3, (8, 4), None, True, True)
    assert m.slope == pytest.approx(0.1) and IVAE(2.0, decoder_var=1).latent_dim == 2
