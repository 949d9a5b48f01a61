"""medcausal.io: reading and writing tables (CSV, compressed CSV, Parquet)."""

import pandas as pd
import pytest

from medcausal.io import read_table, write_table


@pytest.mark.parametrize("name", ["t.csv.gz", "t.csv.bz2", "t.csv.xz"])
def test_write_table_compresses_as_the_name_says(tmp_path, name):
    df = pd.DataFrame({"a": [1.5, 2.5], "b": ["x", "y"]})
    write_table(df, tmp_path / name)
    pd.testing.assert_frame_equal(read_table(tmp_path / name), df)  # was: "Not a gzipped file"


def test_write_table_keeps_a_named_multiindex(tmp_path):
    idx = pd.MultiIndex.from_tuples([("p1", 0), ("p1", 1), ("p2", 0)], names=["patient", "visit"])
    df = pd.DataFrame({"v": [1.0, 2.0, 3.0]}, index=idx)
    for name in ("t.csv", "t.parquet"):
        write_table(df, tmp_path / name)
        back = read_table(tmp_path / name)
        if name.endswith(".csv"):
            back = back.set_index(["patient", "visit"])
        pd.testing.assert_frame_equal(back, df)  # the index was dropped


def test_text_columns_keep_na_like_words(tmp_path):
    # "NA" (Namibia), "None", "null" in an id/note column were read as missing
    (tmp_path / "t.csv").write_text("pid,country,note,age\n007,NA,None,61.2\n008,US,null,\n009,,n/a,1\n")
    t = read_table(tmp_path / "t.csv", str_columns=["pid", "country", "note"])
    assert t["pid"].tolist() == ["007", "008", "009"] and t["country"].tolist()[:2] == ["NA", "US"]
    assert t["note"].tolist() == ["None", "null", "n/a"] and t["age"].isna().tolist() == [False, True, False]
    assert pd.isna(t["country"][2])  # an empty field is still missing


def test_other_columns_keep_pandas_default_missing_words(tmp_path):
    parsers = pytest.importorskip("pandas._libs.parsers")
    from medcausal.io import _PANDAS_NA_WORDS

    assert set(_PANDAS_NA_WORDS) == set(parsers.STR_NA_VALUES)  # our copy of pandas' list has not drifted
    (tmp_path / "t.csv").write_text("pid,age,site\n1,NA,null\n2,3.5,a\n")
    t = read_table(tmp_path / "t.csv", str_columns=["pid"])
    assert t["age"].isna().tolist() == [True, False] and t["age"].dtype == float
    assert t["site"].isna().tolist() == [True, False] and t["pid"].tolist() == ["1", "2"]
