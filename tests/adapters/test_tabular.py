"""medcausal.adapters.tabular: the column codecs that restore values as the user wrote them."""

import numpy as np
import pandas as pd
import pytest

from medcausal.adapters.tabular import Codec
from medcausal.errors import DataError
from medcausal.graph import Binary, Categorical


def test_binary_codec_from_an_older_file_maps_through_its_categories():
    state = {"dtype": "category", "dtype_categories": [False, True], "ordered": False}
    codec = Codec.from_dict("sex", {"type": {"type": "binary"}, "state": state})
    assert list(codec.restore(np.array([0, 1, 1]))) == [False, True, True]


def test_a_value_outside_the_stored_categories_is_an_error_not_nan():
    state = {"dtype": "category", "dtype_categories": ["low", "mid"], "ordered": False}  # an older file
    codec = Codec("grade", Categorical(("low", "mid", "high")), state)
    with pytest.raises(DataError, match="'grade'.*'high'"):
        codec.restore(np.array(["low", "high"], dtype=object))


def test_a_single_valued_binary_category_column_still_restores_both_values():
    df = pd.DataFrame({"sex": pd.Categorical([True] * 4)})
    codec = Codec.fit("sex", Binary(), df)
    assert list(codec.restore(np.array([0, 1]))) == [False, True]
