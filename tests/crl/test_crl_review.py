"""Review tests for the iVAE and its synthetic data: seeds and bad arguments."""

import numpy as np
import pytest

from medcausal.crl.ivae import IVAE, nonlinear_ica_data
from medcausal.errors import MedCausalError


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


# ---- session 16 review -------------------------------------------------------------------


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
