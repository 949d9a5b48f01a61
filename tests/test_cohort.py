"""medcausal.cohort: a Cohort's ids, index and meta, and Cohort.write / Cohort.read round trips."""

import numpy as np
import pandas as pd
import pytest

import medcausal as mc
from medcausal import Cohort
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


def test_a_cohort_owns_its_meta():
    meta = {"image_specs": {"mri": {"spacing": [1, 1]}}}
    cohort = mc.Cohort(pd.DataFrame({"a": [1.0, 2.0]}), meta=meta)
    cohort.meta["image_specs"]["mri"]["spacing"].append(9)
    assert meta["image_specs"]["mri"]["spacing"] == [1, 1]


def test_a_cohort_keeps_a_named_index_as_a_column():
    # a named index that is not the id column ("subject") was dropped, its ids lost
    import pandas as pd

    t = pd.DataFrame({"age": [1.0, 2.0]}, index=pd.Index(["s1", "s2"], name="subject"))
    c = mc.Cohort(t, {})
    assert c.table["subject"].tolist() == ["s1", "s2"] and c.ids.tolist() == [0, 1]
    assert mc.Cohort(t.rename_axis("id"), {}).ids.tolist() == ["s1", "s2"]  # named like the id column: the ids


def test_cohort_keeps_an_id_index_and_indexes_by_integer():
    x = np.zeros((3, 1, 4, 4), np.float32)
    df = pd.DataFrame({"id": ["p1", "p2", "p3"], "age": [1.0, 2.0, 3.0]})
    assert Cohort(df.set_index("id"), {"mri": x}).ids.tolist() == ["p1", "p2", "p3"]
    c = Cohort(df, {"mri": x})
    one = c[1]
    assert isinstance(one, Cohort) and one.ids.tolist() == ["p2"] and one.arrays["mri"].shape == (1, 1, 4, 4)
    assert len(c[[]]) == 0 and c[[]].arrays["mri"].shape == (0, 1, 4, 4)
    with pytest.raises(DataError, match="row"):
        c[["p1"]]
