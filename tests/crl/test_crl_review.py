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
