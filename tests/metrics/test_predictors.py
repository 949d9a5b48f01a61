"""medcausal.metrics.predictors: the anti-causal predictor's input checks."""

import numpy as np
import pytest

from medcausal.errors import DataError
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
