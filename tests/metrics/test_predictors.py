"""medcausal.metrics.predictors: the anti-causal predictor learns known targets and checks its input."""

import numpy as np
import pytest
import torch

from medcausal.errors import DataError
from medcausal.metrics import images as im
from medcausal.metrics.predictors import AntiCausalPredictor


def test_predictor_rejects_images_too_small_for_its_blocks():
    with pytest.raises(DataError, match="too small"):  # torch RuntimeError at predict() before
        AntiCausalPredictor((1, 8, 8), {"m": "continuous"})
    assert AntiCausalPredictor((1, 16, 16), {"m": "continuous"}).predict(np.zeros((2, 1, 16, 16)))["m"].shape == (2,)


def test_predictor_rejects_empty_and_non_finite_input():
    p = AntiCausalPredictor((1, 16, 16), {"m": "continuous"}, channels=[4])
    with pytest.raises(DataError, match="no images|empty"):
        p.predict(np.zeros((0, 1, 16, 16)))
    with pytest.raises(DataError, match="non-finite"):
        p.predict(np.full((2, 1, 16, 16), np.nan))
    with pytest.raises(DataError, match="'m'"):
        p.fit(np.zeros((8, 1, 16, 16)), {"m": [np.nan] + [1.0] * 7}, max_epochs=1, verbose=False)
    with pytest.raises(DataError, match="'m'"):
        p.fit(np.zeros((8, 1, 16, 16)), {"m": ["a"] * 8}, max_epochs=1, verbose=False)


def _bars(n, seed):
    """A vertical bar whose column (0..7, continuous) and brightness (binary) are the targets."""
    rng = np.random.default_rng(seed)
    col = rng.integers(0, 8, n)
    bright = rng.integers(0, 2, n)
    x = np.full((n, 1, 8, 8), 0.1, dtype=np.float32)
    x[np.arange(n), 0, :, col] = (0.5 + 0.4 * bright)[:, None]
    return x, col.astype(float), bright


def test_anti_causal_predictor_learns_known_targets():
    torch.manual_seed(0)
    x, col, bright = _bars(600, 0)
    p = AntiCausalPredictor((1, 8, 8), {"col": "continuous", "bright": "binary"}, channels=[8, 16], features=16)
    p.fit(x, {"col": col, "bright": bright}, max_epochs=40, lr=3e-3, verbose=False)
    xt, colt, brt = _bars(200, 1)
    pred = p.predict(xt)
    # Chance: MAE of predicting the mean column is 2.0; accuracy 0.5.
    assert im.effectiveness(pred["col"], colt)["mae"] < 0.8
    assert im.effectiveness(pred["bright"], brt, kind="binary")["accuracy"] > 0.95
    assert p.features(xt).shape == (200, 16)


def test_parent_nll_reads_the_mechanism_layout_and_is_differentiable():
    torch.manual_seed(0)
    p = AntiCausalPredictor((1, 8, 8), {"a": "continuous", "site": 3}, channels=[4], features=8)
    x = torch.rand(5, 1, 8, 8, requires_grad=True)
    parents = torch.cat([torch.randn(5, 1), torch.nn.functional.one_hot(torch.arange(5) % 3, 3).float()], 1)
    nll = p.parent_nll(x, parents)
    assert nll.shape == (5,)
    nll.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Same value as the training loss on the decoded targets.
    batch = {"x": x.detach(), "a": parents[:, 0], "site": torch.arange(5.0) % 3}
    torch.testing.assert_close(p(batch), nll.detach())
    with pytest.raises(DataError, match=r"\[n, 4\]"):
        p.parent_nll(x, parents[:, :2])


def test_predictor_rejects_bad_targets():
    p = AntiCausalPredictor((1, 8, 8), {"b": "binary"}, channels=[4])
    with pytest.raises(DataError, match="'b'"):
        p.fit(np.zeros((4, 1, 8, 8)), {"b": [0, 1, 2, 1]}, max_epochs=1, verbose=False)
    with pytest.raises(DataError, match="missing"):
        p.fit(np.zeros((4, 1, 8, 8)), {}, max_epochs=1, verbose=False)
