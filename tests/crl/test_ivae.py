"""iVAE / VAE: shapes, the ELBO against torch.distributions, training, identifiability on an
easy instance, input validation, AnnData, save/load, and the synthetic data generator.

Tolerances are stated next to each assertion. Training runs are tiny and seeded.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from medcausal.crl import IVAE, VAE, nonlinear_ica_data
from medcausal.errors import DataError, MedCausalError, ModelFileError, NotFittedError
from medcausal.metrics.representation import mcc

TINY = {"hidden": (8,)}
FAST = {"max_epochs": 2, "verbose": False, "refine_steps": 20}


@pytest.fixture(scope="module")
def data():
    return nonlinear_ica_data(n_segments=4, n_per_segment=50, n_sources=2, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- #
# shapes and units
# --------------------------------------------------------------------------- #


def test_shapes_latent_smaller_than_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4))
    u = rng.integers(0, 3, size=120)
    m = IVAE(2, **TINY).fit(x, u, **FAST)
    assert m.encode(x, u).shape == (120, 2)
    assert m.decode(np.zeros((7, 2))).shape == (7, 4)
    assert m.elbo(x, u).shape == (120,)
    assert m.fit_info["aux"] == {"kind": "categorical", "width": 3, "name": "u"}
    v = VAE(3, **TINY).fit(x, **FAST)
    assert v.encode(x).shape == (120, 3) and v.decode(np.zeros((2, 3))).shape == (2, 4)


def test_standardization_makes_units_irrelevant(data):
    x, u, _ = data
    a = IVAE(2, **TINY).fit(x, u, seed=3, **FAST)
    b = IVAE(2, **TINY).fit(1000.0 * x + 5.0, u, seed=3, **FAST)
    # identical standardized inputs and seeds: identical codes (float32 round-off)
    assert np.allclose(a.encode(x, u), b.encode(1000.0 * x + 5.0, u), atol=1e-4)
    z = a.encode(x[:10], u[:10])
    assert np.allclose(b.decode(z), 1000.0 * a.decode(z) + 5.0, rtol=1e-4, atol=1e-2)


# --------------------------------------------------------------------------- #
# the objective
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("posterior", ["full", "diagonal"])
@pytest.mark.parametrize("prior_mean", [False, True])
def test_neg_elbo_matches_torch_distributions(data, posterior, prior_mean):
    x, u, _ = data
    m = IVAE(2, hidden=(8,), posterior=posterior, prior_mean=prior_mean, decoder_var=0.05).fit(x, u, **FAST)
    t = m._tensors(x, u, "u")
    net = m.net
    # a non-trivial latent map, so that the transformed posterior is checked too
    net.latent_map.copy_(torch.tensor([[1.5, 0.3], [-0.2, 0.8]]))
    net.latent_map_inv.copy_(torch.linalg.inv(net.latent_map))
    eps = torch.randn(len(x), 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = net.neg_elbo(t["x"], t["u"], eps)
        mean, root, _ = net.posterior(t["x"], t["u"])
        q = torch.distributions.MultivariateNormal(mean.double(), scale_tril=None,
                                                   covariance_matrix=(root @ root.transpose(1, 2)).double())
        p_mean, p_logvar = net.prior_params(t["u"], len(x))
        p = torch.distributions.MultivariateNormal(p_mean.double(),
                                                   covariance_matrix=torch.diag_embed(p_logvar.exp()).double())
        z = mean + (root @ eps[:, :, None])[:, :, 0]
        lik = torch.distributions.Normal(net.decode(z).double(), math.sqrt(0.05)).log_prob(t["x"].double()).sum(1)
        want = torch.distributions.kl_divergence(q, p) - lik
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-3)  # float32 vs float64


def test_training_raises_the_elbo(data):
    x, u, _ = data
    start = IVAE(2, **TINY).fit(x, u, max_steps=1, refine_steps=0, verbose=False)
    trained = IVAE(2, **TINY).fit(x, u, max_epochs=40, verbose=False)
    before = start.elbo(x, u, n_samples=20).mean()
    after = trained.elbo(x, u, n_samples=20).mean()
    assert after > before + 10.0  # observed +265 nats per row (an untrained decoder with sigma_x^2 = 1e-3)
    hist = [h["val_loss"] for h in trained.history]
    assert hist[-1] < hist[0]
    ref = trained.fit_info["refine"][0]
    assert ref["kept"] and ref["neg_elbo_after"] <= ref["neg_elbo_before"]  # the refinement is an ascent step


# --------------------------------------------------------------------------- #
# identifiability on an easy instance, and the refinement
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def easy():
    """2 sources, 8 segments x 250 points, linear mixing, and an iVAE fitted to them (once)."""
    torch.set_num_threads(1)
    x, u, z = nonlinear_ica_data(n_segments=8, n_per_segment=250, n_sources=2, n_layers=1, seed=0)
    model = IVAE(2, hidden=(16, 16)).fit(x, u, seed=0, max_epochs=30, batch_size=64, verbose=False)
    return x, u, z, model


def test_ivae_recovers_sources_of_an_easy_instance(easy):
    # chance level of the MCC for these 2000 rows is about 0.03 (checked below)
    x, u, z, model = easy
    score = mcc(z, model.encode(x, u), method="spearman").score
    assert score >= 0.95  # observed 0.997
    rng = np.random.default_rng(0)
    assert mcc(z, rng.normal(size=z.shape), method="spearman").score < 0.1


def test_refinement_undoes_a_linear_mixing_of_the_code(easy):
    # mix the fitted code by a fixed matrix: the exact linear ELBO step must unmix it
    x, u, z, fitted = easy
    m = copy.deepcopy(fitted)
    good = mcc(z, m.encode(x, u), method="spearman").score
    mix = torch.tensor([[1.0, 0.9], [0.6, 1.0]])
    m.net.latent_map.copy_(mix @ m.net.latent_map)
    m.net.latent_map_inv.copy_(torch.linalg.inv(m.net.latent_map))
    mixed = mcc(z, m.encode(x, u), method="spearman").score
    t = m._tensors(x, u, "u")
    before = m._neg_elbo_mean(t)
    m.net.refine_linear(t["x"], t["u"], steps=1000)
    assert m._neg_elbo_mean(t) < before  # an ascent step on the ELBO
    assert mixed < good - 0.05  # observed 0.997 -> 0.754
    assert mcc(z, m.encode(x, u), method="spearman").score > good - 0.01  # observed 0.997 again


# --------------------------------------------------------------------------- #
# validation of x and u
# --------------------------------------------------------------------------- #


def test_u_rows_must_match(data):
    x, u, _ = data
    with pytest.raises(DataError, match=r"u has 150 rows but x has 200"):
        IVAE(2, **TINY).fit(x, u[:150], **FAST)
    m = IVAE(2, **TINY).fit(x, u, **FAST)
    with pytest.raises(DataError, match=r"u has 3 rows but x has 5"):
        m.encode(x[:5], u[:3])


def test_u_missing_values_are_named(data):
    x, u, _ = data
    cont = np.column_stack([u.astype(float), np.ones(len(u))])
    cont[3, 0] = np.nan
    with pytest.raises(DataError, match=r"u contains 1 non-finite value\(s\) \(first: NaN at row 3, column 0\)"):
        IVAE(2, **TINY).fit(x, cont, **FAST)
    labels = np.array(["a", "b"] * 100, dtype=object)
    labels[[5, 9]] = None
    with pytest.raises(DataError, match=r"u contains 2 missing \(NaN/None\) value\(s\) \(first at row 5\)"):
        IVAE(2, **TINY).fit(x, labels, **FAST)


def test_other_u_and_x_errors(data):
    x, u, _ = data
    with pytest.raises(DataError, match="needs the auxiliary variable u"):
        IVAE(2, **TINY).fit(x, **FAST)
    with pytest.raises(DataError, match="categorical u must be one label per row"):
        IVAE(2, **TINY).fit(x, np.column_stack([u, u]), aux_type="categorical", **FAST)
    bad = x.copy()
    bad[7, 1] = np.inf
    with pytest.raises(DataError, match=r"x contains 1 non-finite value\(s\) \(first: infinite at row 7, column 1\)"):
        IVAE(2, **TINY).fit(bad, u, **FAST)
    m = IVAE(2, **TINY).fit(x, u, **FAST)
    with pytest.raises(DataError, match=r"u has category 9 \(row 0\) not seen at fit"):
        m.encode(x[:2], np.array([9, 0]))
    with pytest.raises(DataError, match="x has 3 columns but the model was fitted on 2"):
        m.encode(np.zeros((2, 3)), u[:2])
    with pytest.raises(DataError, match="z has 3 columns but latent_dim is 2"):
        m.decode(np.zeros((2, 3)))
    with pytest.raises(NotFittedError):
        IVAE(2).encode(x, u)
    with pytest.raises(MedCausalError, match="latent_dim"):
        IVAE(0)
    assert issubclass(DataError, ValueError)


def test_labels_of_any_type_and_continuous_u(data):
    x, u, _ = data
    names = np.array(["ctrl", "drugA", "drugB", "drugC"])[u]
    m = IVAE(2, **TINY).fit(x, pd.Series(names, dtype="category"), **FAST)
    assert m.aux.categories == ["ctrl", "drugA", "drugB", "drugC"]
    assert m.encode(x, names).shape == (200, 2)
    cont = np.column_stack([u, u ** 2]).astype(float)
    c = IVAE(2, **TINY).fit(x, cont, **FAST)
    assert c.aux.kind == "continuous" and c.aux.width == 2
    with pytest.raises(DataError, match="u has 1 columns but the model was fitted on 2"):
        c.encode(x, cont[:, :1])


def test_vae_ignores_u_and_equals_unconditional_ivae(data):
    x, u, _ = data
    a = VAE(2, **TINY).fit(x, u, seed=1, **FAST)
    b = IVAE(2, conditional_prior=False, **TINY).fit(x, seed=1, **FAST)
    assert np.allclose(a.encode(x), b.encode(x, u), atol=1e-6)


# --------------------------------------------------------------------------- #
# AnnData
# --------------------------------------------------------------------------- #


def test_anndata_path(data):
    anndata = pytest.importorskip("anndata")
    x, u, _ = data
    obs = pd.DataFrame({"segment": pd.Categorical([f"s{i}" for i in u])},
                       index=[f"cell{i}" for i in range(len(u))])
    adata = anndata.AnnData(X=x.astype(np.float32), obs=obs, layers={"scaled": 3.0 * x})
    m = IVAE(2, **TINY).fit(adata, aux_key="segment", seed=0, **FAST)
    direct = m.encode(x.astype(np.float32), obs["segment"].to_numpy())
    assert np.allclose(m.encode(adata), direct, atol=1e-6)  # keys remembered from fit
    assert m.fit_info["aux"]["name"] == "obs column 'segment'"
    arrays = IVAE(2, **TINY).fit(x.astype(np.float32), obs["segment"].to_numpy(), seed=0, **FAST)
    assert np.allclose(arrays.encode(x.astype(np.float32), obs["segment"].to_numpy()), direct, atol=1e-6)
    lay = IVAE(2, **TINY).fit(adata, aux_key="segment", layer="scaled", **FAST)
    assert lay.encode(adata).shape == (200, 2)
    with pytest.raises(DataError, match=r"aux_key 'batch' is not an .obs column"):
        IVAE(2, **TINY).fit(adata, aux_key="batch", **FAST)
    with pytest.raises(DataError, match=r"layer 'counts' not in adata.layers"):
        IVAE(2, **TINY).fit(adata, aux_key="segment", layer="counts", **FAST)
    with pytest.raises(DataError, match="pass aux_key="):
        IVAE(2, **TINY).fit(adata, **FAST)
    adata.obs.loc["cell4", "segment"] = np.nan
    with pytest.raises(DataError, match=r"obs column 'segment' contains 1 missing"):
        IVAE(2, **TINY).fit(adata, aux_key="segment", **FAST)


# --------------------------------------------------------------------------- #
# save / load
# --------------------------------------------------------------------------- #


def test_save_load_round_trip(tmp_path, data):
    x, u, _ = data
    m = IVAE(2, **TINY).fit(x, u, **FAST)
    path = m.save(tmp_path / "ivae.pt")
    back = IVAE.load(path)
    assert np.array_equal(back.encode(x, u), m.encode(x, u))
    assert np.array_equal(back.decode(np.ones((3, 2))), m.decode(np.ones((3, 2))))
    assert back.config() == m.config()
    v = VAE(2, **TINY).fit(x, **FAST)
    loaded = IVAE.load(v.save(tmp_path / "vae.pt"))
    assert isinstance(loaded, VAE) and np.array_equal(loaded.encode(x), v.encode(x))
    with pytest.raises(ModelFileError, match="holds a IVAE, not a VAE"):
        VAE.load(path)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="not a readable"):
        IVAE.load(tmp_path / "junk.pt")
    with pytest.raises(ModelFileError, match="does not exist"):
        IVAE.load(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- #
# synthetic data
# --------------------------------------------------------------------------- #


def test_nonlinear_ica_data_known_structure():
    x, u, z = nonlinear_ica_data(n_segments=5, n_per_segment=4000, n_sources=3, n_layers=1, seed=2)
    assert x.shape == z.shape == (20000, 3) and np.array_equal(np.bincount(u), [4000] * 5)
    sd = np.array([z[u == s].std(axis=0) for s in range(5)])
    assert sd.min() > 0.5 * 0.95 and sd.max() < 3.0 * 1.05  # U(0.5, 3) scales; sampling error ~1-2%
    assert np.allclose(np.array([z[u == s].mean(axis=0) for s in range(5)]), 0.0, atol=0.1)  # centred
    w, *_ = np.linalg.lstsq(z, x, rcond=None)
    assert np.allclose(z @ w, x, atol=1e-9)  # one layer: exactly linear
    assert np.allclose(np.linalg.norm(w, axis=0), 1.0)  # unit-norm columns
    x2, _, z2 = nonlinear_ica_data(n_segments=5, n_per_segment=400, n_sources=3, n_layers=3, seed=2)
    w2, *_ = np.linalg.lstsq(z2, x2, rcond=None)
    assert np.abs(z2 @ w2 - x2).max() > 0.1  # three layers: not linear
    assert len(np.unique(np.round(x2, 9), axis=0)) == len(x2)  # injective on the sample
    with pytest.raises(MedCausalError, match="source"):
        nonlinear_ica_data(source="cauchy")


def test_group_moments_streams_batches_and_refuses_a_row_count_mismatch():
    from medcausal.crl.ivae import group_moments

    gen = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 3, (50, 1), generator=gen).float()
    mean = torch.randn(50, 2, generator=gen)
    second = mean[:, :, None] * mean[:, None, :]
    groups, m1, m2, count = group_moments(((mean[i:i + 7], second[i:i + 7]) for i in range(0, 50, 7)), keys, 2)
    for g, key in enumerate(groups[:, 0].tolist()):  # the batched averages are the plain per-group averages
        rows = keys[:, 0] == key
        assert count[g] == rows.sum()
        assert torch.allclose(m1[g].float(), mean[rows].mean(0), atol=1e-6)
        assert torch.allclose(m2[g].float(), second[rows].mean(0), atol=1e-6)
    one = group_moments([(mean, second)], keys[:, :0], 2)  # no keys: one group of all rows
    assert one[0].shape == (1, 0) and torch.allclose(one[1][0].float(), mean.mean(0), atol=1e-6)
    with pytest.raises(DataError, match="batches hold 40 rows, the keys 50"):
        group_moments([(mean[:40], second[:40])], keys, 2)
    with pytest.raises(DataError, match="more than 50 rows"):
        group_moments([(mean, second), (mean[:1], second[:1])], keys, 2)
    with pytest.raises(MedCausalError, match="at least one row"):  # was: one group of count 0 (weight 0/0)
        group_moments([], keys[:0, :0], 2)


# --------------------------------------------------------------------------- #
# bad arguments, failed and interrupted fits
# --------------------------------------------------------------------------- #

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


def test_fit_accepts_a_numpy_integer_seed():
    x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=10, n_sources=2, seed=0)
    kw = dict(max_epochs=1, verbose=False, refine_steps=2)
    a = IVAE(2, hidden=(4,)).fit(x, u, seed=np.int64(1), **kw)
    b = IVAE(2, hidden=(4,)).fit(x, u, seed=1, **kw)
    assert np.array_equal(a.encode(x, u), b.encode(x, u))
    assert type(a.fit_info["seed"]) is int


@pytest.mark.parametrize("seed", [1.5, -1, None, True])
def test_fit_rejects_a_bad_seed(seed):
    x, u, _ = nonlinear_ica_data(n_segments=2, n_per_segment=5, n_sources=2, seed=0)
    with pytest.raises(MedCausalError, match="seed"):
        IVAE(2, hidden=(4,)).fit(x, u, seed=seed, max_epochs=1, verbose=False)


@pytest.mark.parametrize("hidden", [8, "8", None])
def test_hidden_must_be_a_sequence_of_widths(hidden):
    with pytest.raises(MedCausalError, match="hidden"):
        IVAE(2, hidden=hidden)


@pytest.mark.parametrize("kwargs, name", [
    ({"n_segments": 2.5}, "n_segments"),
    ({"n_segments": None}, "n_segments"),
    ({"n_sources": 0}, "n_sources"),
    ({"scale_range": (-1.0, 0.0)}, "scale_range"),
    ({"scale_range": (2.0, 1.0)}, "scale_range"),
])
def test_nonlinear_ica_data_bad_arguments_name_the_argument(kwargs, name):
    args = {"n_segments": 2, "n_per_segment": 5, "n_sources": 2, **kwargs}
    with pytest.raises(MedCausalError, match=name):
        nonlinear_ica_data(**args)


def test_nonlinear_ica_data_numpy_ints_match_python_ints():
    a = nonlinear_ica_data(np.int64(2), np.int64(5), np.int64(2), seed=np.int64(4))
    b = nonlinear_ica_data(2, 5, 2, seed=4)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


@pytest.fixture(scope="module")
def ivae_data():
    from medcausal.crl import nonlinear_ica_data

    return nonlinear_ica_data(n_segments=3, n_per_segment=20, n_sources=2, seed=0)


@pytest.mark.parametrize("bad", [{"rounds": 0}, {"refine_steps": -1}, {"batch_size": 0}, {"lr": -1.0}])
def test_a_failed_ivae_fit_leaves_the_fitted_model_as_it_was(ivae_data, bad):
    from medcausal.crl import IVAE

    x, u, _ = ivae_data
    model = IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, refine_steps=2, verbose=False)
    before = model.encode(x, u)
    with pytest.raises(MedCausalError):
        model.fit(3.0 * x + 5.0, u + 100, max_epochs=1, verbose=False, **bad)
    # was: the new data's u categories and x scaling replaced the fitted ones (encode then failed)
    np.testing.assert_array_equal(model.encode(x, u), before)


def test_an_interrupted_ivae_refit_restores_the_model(ivae_data, monkeypatch):
    import medcausal.crl.ivae as ivae_module
    from medcausal.crl import IVAE

    x, u, _ = ivae_data
    model = IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, refine_steps=2, verbose=False)
    before = model.encode(x, u)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ivae_module, "train_rounds", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the refit's training
        model.fit(3.0 * x + 5.0, u, max_epochs=1, verbose=False)
    # was: an untrained network and the new data's scaling in place of the fitted ones
    np.testing.assert_array_equal(model.encode(x, u), before)


def test_ivae_max_epochs_none_is_a_clear_error(ivae_data):
    from medcausal.crl import IVAE

    x, u, _ = ivae_data
    with pytest.raises(MedCausalError, match="max_epochs"):  # was: TypeError comparing int and None
        IVAE(2, hidden=(8,)).fit(x, u, max_epochs=None, max_steps=3, verbose=False)


def test_ivae_refit_on_arrays_forgets_the_anndata_keys(ivae_data, tmp_path):
    anndata = pytest.importorskip("anndata")
    from medcausal.crl import IVAE

    x, u, _ = ivae_data
    adata = anndata.AnnData(X=x.astype(np.float32), obs=pd.DataFrame({"batch": u.astype(str)}))
    model = IVAE(2, hidden=(8,)).fit(adata, aux_key="batch", max_epochs=1, refine_steps=0, verbose=False)
    assert model.anndata_keys == {"aux_key": "batch", "layer": None}
    model.fit(x, u, max_epochs=1, refine_steps=0, verbose=False)
    assert model.anndata_keys is None  # was: the earlier fit's keys, saved with the new model
    assert IVAE.load(model.save(tmp_path / "m.pt")).anndata_keys is None


def _fitted_on_anndata(tmp_path=None, sparse_x=False):
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=30, n_sources=2, seed=0)
    X = sparse.csr_matrix(x.astype(np.float32)) if sparse_x else x.astype(np.float32)
    a = ad.AnnData(X, obs=pd.DataFrame({"seg": u.astype(str)}, index=[str(i) for i in range(len(u))]))
    return a, x, u


def test_fit_reads_backed_sparse_anndata(tmp_path):
    import anndata as ad

    a, x, u = _fitted_on_anndata(sparse_x=True)
    a.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    model = IVAE(2, hidden=(8,)).fit(backed, aux_key="seg", max_epochs=1, verbose=False, refine_steps=2)
    in_memory = IVAE(2, hidden=(8,)).fit(a, aux_key="seg", max_epochs=1, verbose=False, refine_steps=2)
    np.testing.assert_allclose(model.encode(backed), in_memory.encode(a), rtol=1e-5, atol=1e-6)


def test_encode_needs_u_only_when_the_encoder_reads_it():
    x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=30, n_sources=2, seed=0)
    model = IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, verbose=False, refine_steps=2)
    np.testing.assert_array_equal(model.encode(x[:4]), model.encode(x[:4], u[:4]))
    with pytest.raises(MedCausalError, match="leave u out"):  # a u given is checked; a new environment
        model.encode(x[:4], np.array([7, 7, 7, 7]))            # encodes without it
    reads_u = IVAE(2, hidden=(8,), encoder_u=True).fit(x, u, max_epochs=1, verbose=False, refine_steps=2)
    with pytest.raises(MedCausalError, match="auxiliary"):
        reads_u.encode(x[:4])


def test_encode_layer_none_is_X_not_the_fits_layer():
    a, x, u = _fitted_on_anndata()
    a.layers["scaled"] = a.X * 100 + 5
    model = IVAE(2, hidden=(8,)).fit(a, aux_key="seg", layer="scaled", max_epochs=1, verbose=False,
                                     refine_steps=2)
    np.testing.assert_array_equal(model.encode(a), model.encode(a, layer="scaled"))  # default: as at fit
    np.testing.assert_array_equal(model.encode(a, layer=None), model.encode(a.X))


# --------------------------------------------------------------------------- #
# model files: every corrupt, foreign or damaged file gives a ModelFileError naming the
# file, loading never runs code (weights_only), and writes are atomic (no partial file)
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.set_num_threads(1)
    x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=40, n_sources=2, seed=0)
    model = IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, refine_steps=5, verbose=False)
    path = model.save(tmp_path_factory.mktemp("files") / "ivae.pt")
    return model, path, x, u


def _rewrite(path, out, edit_spec=None, edit_state=None):
    """Copy a saved file to ``out`` after editing its JSON spec and/or its state dict."""
    payload = torch.load(path, weights_only=True)
    spec = json.loads(payload["medcausal"])
    if edit_spec is not None:
        edit_spec(spec)
    state = dict(payload["state_dict"])
    if edit_state is not None:
        edit_state(state)
    torch.save({"medcausal": json.dumps(spec), "state_dict": state}, out)
    return out


def test_save_is_atomic_and_payload_is_plain_data(saved):
    model, path, x, u = saved
    assert [p.name for p in path.parent.iterdir()] == ["ivae.pt"]  # no leftover temporary file
    payload = torch.load(path, weights_only=True)  # tensors, str: loadable without running code
    assert set(payload) == {"medcausal", "state_dict"}
    spec = json.loads(payload["medcausal"])
    assert spec["format"] == "medcausal-crl" and spec["class"] == "IVAE"
    assert np.array_equal(IVAE.load(path).encode(x, u), model.encode(x, u))


def test_save_failure_leaves_the_old_file_intact(saved, tmp_path, monkeypatch):
    model, path, x, u = saved
    target = tmp_path / "keep.pt"
    model.save(target)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save(target)
    assert target.read_bytes() == before  # unchanged
    assert [p.name for p in tmp_path.iterdir()] == ["keep.pt"]  # temporary file removed


def test_foreign_and_truncated_files(saved, tmp_path):
    _, path, _, _ = saved
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ModelFileError, match=r"foreign\.pt.*torch file but not a medcausal representation"):
        IVAE.load(tmp_path / "foreign.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelFileError, match=r"cut\.pt.*not a readable"):
        IVAE.load(tmp_path / "cut.pt")
    torch.save({"medcausal": "{not json", "state_dict": {}}, tmp_path / "json.pt")
    with pytest.raises(ModelFileError, match=r"json\.pt.*damaged.*JSON"):
        IVAE.load(tmp_path / "json.pt")


def test_wrong_format_newer_version_and_damaged_contents(saved, tmp_path):
    _, path, _, _ = saved

    def other_format(spec):
        spec["format"] = "medcausal-model"

    def newer(spec):
        spec["format_version"] = 99

    def no_config(spec):
        del spec["config"]

    def wrong_shape(state):
        key = next(k for k in state if k.startswith("encoder") and k.endswith("weight"))
        state[key] = torch.zeros(1, 1)

    with pytest.raises(ModelFileError, match=r"format 'medcausal-model', not 'medcausal-crl'"):
        IVAE.load(_rewrite(path, tmp_path / "a.pt", edit_spec=other_format))
    with pytest.raises(ModelFileError, match=r"b\.pt.*newer"):
        IVAE.load(_rewrite(path, tmp_path / "b.pt", edit_spec=newer))
    with pytest.raises(ModelFileError, match=r"c\.pt.*damaged.*KeyError"):
        IVAE.load(_rewrite(path, tmp_path / "c.pt", edit_spec=no_config))
    with pytest.raises(ModelFileError, match=r"d\.pt.*damaged.*RuntimeError"):
        IVAE.load(_rewrite(path, tmp_path / "d.pt", edit_state=wrong_shape))
