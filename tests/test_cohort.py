"""Cohort.write / Cohort.read: a cohort comes back from disk as it was written."""

import numpy as np
import pandas as pd
import pytest

import medcausal as mc
from medcausal.errors import DataError


def _cohort():  # one float64 array and one float32, which come back in their dtypes
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"id": ["007", "b", "c"], "age": [60.0, 70.5, 80.0], "country": ["FR", "NA", "DE"],
                          "visits": [1, 2, 3], "smoker": [True, False, True]})
    return mc.Cohort(table, {"mri": rng.random((3, 1, 8, 6)),
                             "ct": rng.random((3, 1, 4, 5, 3)).astype(np.float32)}, meta={"source": "trial 7"})


@pytest.mark.parametrize("suffix, image_format", [(".csv", "nifti"), (".parquet", "nifti"), (".csv", "png")])
def test_write_read_round_trip(tmp_path, suffix, image_format):
    c = _cohort()
    if image_format == "png":  # PNG holds 2D scans only
        c = mc.Cohort(c.table, {"mri": c.arrays["mri"]}, meta=c.meta)
    back = mc.Cohort.read(c.write(tmp_path / f"cohort{suffix}", image_format=image_format))
    pd.testing.assert_frame_equal(back.table, c.table)  # ids "007" and the text "NA" as written, dtypes kept
    assert back.meta == c.meta and back.id_column == c.id_column
    for name, arr in c.arrays.items():
        # NIfTI keeps float32 exactly; PNG holds 16-bit integers scaled by the cohort's maximum
        tol = (0.0 if arr.dtype == np.float32 else 1e-6) if image_format == "nifti" else arr.max() / 65535
        assert back.arrays[name].shape == arr.shape and back.arrays[name].dtype == arr.dtype
        assert np.abs(back.arrays[name] - arr).max() <= tol


def test_read_needs_the_sidecar(tmp_path):
    path = _cohort().write(tmp_path / "cohort.csv")
    (tmp_path / "cohort.csv.json").unlink()
    with pytest.raises(DataError, match="cohort.csv.json"):
        mc.Cohort.read(path)


def test_write_read_h5ad(tmp_path):
    counts = np.random.default_rng(1).poisson(2.0, (5, 7)).astype(np.float64)
    c = mc.Cohort(pd.DataFrame({"cell_type": list("ababa")}), {"expression": counts}, meta={"screen": 3})
    back = mc.Cohort.read(c.write(tmp_path / "cells.h5ad"))
    np.testing.assert_array_equal(back.arrays["expression"], counts)
    assert back.arrays["expression"].dtype == np.float64 and back.meta == {"screen": 3}
    assert back.table["cell_type"].astype(str).tolist() == list("ababa")


def test_expression_needs_h5ad(tmp_path):
    c = mc.Cohort(pd.DataFrame({"a": [1.0]}), {"expression": np.ones((1, 3))})
    with pytest.raises(DataError, match="h5ad"):
        c.write(tmp_path / "cells.csv")
    assert not (tmp_path / "cells.csv").exists()
