"""medcausal.figures: the counterfactual figure helpers."""

import numpy as np
import pytest

from medcausal.errors import DataError


@pytest.mark.parametrize("where", ["factual", "counterfactual"])
def test_counterfactual_grid_refuses_non_finite_scans(tmp_path, where):
    from medcausal.figures import counterfactual_grid
    x = np.random.default_rng(0).random((2, 1, 16, 16)).astype(np.float32)
    bad = x.copy()
    bad[1, 0, 3, 3] = np.nan
    fact, cf = (bad, x) if where == "factual" else (x, bad)
    label = "factual" if where == "factual" else "counterfactual 'do\\(age=80\\)'"
    with pytest.raises(DataError, match=f"{label}.*non-finite.*patient\\(s\\) \\[1\\]"):
        counterfactual_grid(fact, {"do(age=80)": cf}, tmp_path / "grid.png")
    assert not (tmp_path / "grid.png").exists()
