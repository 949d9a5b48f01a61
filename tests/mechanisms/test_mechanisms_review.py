"""Edge cases of the image, diffusion and count mechanisms: bad input gets a medcausal error
that names the setting or the shape; float64 and integer inputs are accepted."""

import pytest
import torch

from medcausal.errors import DataError, MedCausalError
from medcausal.graph import Continuous, Expression, Image
from medcausal.mechanisms.cvae import CVAEMechanism
from medcausal.mechanisms.diffusion import DiffusionMechanism
from medcausal.mechanisms.fcr import FCRMechanism, LatentShiftMechanism
from medcausal.mechanisms.hvae import HVAEMechanism
from medcausal.mechanisms.image_diffusion import ImageDiffusionMechanism

VAES = {
    "hvae": (HVAEMechanism, {"channels": [4, 8], "z_dim": 2, "latent_levels": 2}),
    "cvae": (CVAEMechanism, {"channels": [4, 8], "z_dim": 2, "hidden": 16}),
}
IMG_DIFF = {"channels": [4, 8], "norm_num_groups": 4, "steps": 3, "num_train_timesteps": 20}


def _vae(name, shape=(1, 16, 16), parents=2, **kw):
    cls, base = VAES[name]
    torch.manual_seed(0)
    return cls(Image(shape), parents, **{**base, **kw}).eval()


# -- hvae / cvae -----------------------------------------------------------------------
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


# -- image-diffusion ------------------------------------------------------------------
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


# -- diffusion (tabular) ------------------------------------------------------------------
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


# -- fcr / latent-shift ------------------------------------------------------------------------
COUNT = {"fcr": FCRMechanism, "latent-shift": LatentShiftMechanism}


def _count(name):
    torch.manual_seed(0)
    return COUNT[name](Expression(12), {"cell_type": 2, "perturbation": 3}, hidden=[16], decoder_hidden=[16]).eval()


@pytest.mark.parametrize("name", list(COUNT))
def test_count_shapes_are_checked(name):
    m = _count(name)
    pa = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]] * 4)
    y = m.sample(pa, generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match=r"parents must be \[n, 5\]"):
        m.sample(torch.zeros(4, 3))
    with pytest.raises(DataError, match=r"parents must be \[n, 5\]"):
        m.abduct(y, torch.zeros(4, 3))
    with pytest.raises(DataError, match=r"counts must be \[4, 12\]"):
        m.abduct(torch.ones(4, 5), pa)
    with pytest.raises(DataError, match=r"counts must be \[4, 12\]"):
        m.abduct(torch.ones(3, 12), pa)
    with pytest.raises(DataError, match=r"noise must be \[4, 25\]"):
        m.sample(pa, noise=torch.randn(4, 3))


@pytest.mark.parametrize("name", list(COUNT))
@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0.5])
def test_count_abduct_rejects_non_counts(name, bad):
    m = _count(name)
    pa = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]] * 2)
    y = torch.ones(2, 12)
    y[1, 3] = bad
    with pytest.raises(DataError, match="non-negative integer"):
        m.abduct(y, pa)


@pytest.mark.parametrize("name", list(COUNT))
def test_count_float64_and_integer_parents(name):
    m = _count(name)
    pa = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]] * 3)
    y = m.sample(pa, generator=torch.Generator().manual_seed(0))
    noise = m.abduct(y, pa, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.sample(pa.double(), noise=noise).float(), y)
    assert torch.equal(m.sample(pa.long(), noise=noise).float(), y)
    assert torch.equal(m.abduct(y.double(), pa.double(), generator=torch.Generator().manual_seed(1)), noise)


def test_fcr_empty_hidden_is_refused():
    with pytest.raises(MedCausalError, match="hidden"):
        FCRMechanism(Expression(12), {"perturbation": 3}, hidden=[])
