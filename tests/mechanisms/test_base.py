"""medcausal.mechanisms.base: the machinery every mechanism shares (per-row noise keys)."""

import pandas as pd


def test_a_units_noise_key_does_not_depend_on_the_containers_dtype():
    import numpy as np

    from medcausal.mechanisms.base import RowNoise

    keys = RowNoise.label_keys
    assert keys(pd.Index([5, 6]))[0] == keys(pd.Index([5, "a"]))[0] == keys([5.0])[0] == keys(["5"])[0] \
        == keys(pd.Index([np.int64(5)], dtype=object))[0]
    assert len(set(keys([None, None, "a"]).tolist())) == 3  # a label seen again gets its own draws
    assert len(set(keys([float("nan"), float("nan")]).tolist())) == 2
