"""Regression tests for review findings: discrete round trips, per-row intervention shapes,
resume checks, non-finite scans in figures, and recipe/graph input errors."""

import importlib
import json

import numpy as np
import pandas as pd
import pytest

import medcausal as mc
from medcausal.adapters.tabular import Codec
from medcausal.errors import DataError, GraphError, InterventionError, MedCausalError, RecipeError
from medcausal.graph import Binary, Categorical
from medcausal.recipe import load_recipe

S = importlib.import_module("medcausal.simulate")


def _fit(df, variables, edges):
    return mc.CausalModel(mc.CausalGraph(variables, edges=edges)).fit(df, max_steps=3, verbose=False)


@pytest.fixture(scope="module")
def category_model():
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"grade": pd.Categorical(rng.choice(["low", "mid", "high"], n)),
                       "bp": rng.normal(size=n),
                       "sex": pd.Categorical(rng.integers(0, 2, n).astype(bool)),
                       "smoker": pd.Categorical(rng.integers(0, 2, n).astype(str)),
                       "diabetic": np.where(rng.integers(0, 2, n) == 1, "True", "False").astype(object)})
    variables = {"grade": Categorical(("low", "mid", "high", "extreme")), "bp": "continuous",
                 "sex": "binary", "smoker": "binary", "diabetic": "binary"}
    edges = [("grade", "bp"), ("sex", "bp"), ("smoker", "bp"), ("diabetic", "bp")]
    return df, _fit(df, variables, edges)


# -- 1. discrete values come back in the user's representation, never as silent NaN ----------------
def test_declared_extra_category_is_restored(category_model):
    df, m = category_model
    out = m.sample(3, do={"grade": "extreme"}, seed=0)
    assert out["grade"].tolist() == ["extreme"] * 3
    assert list(out["grade"].cat.categories) == ["high", "low", "mid", "extreme"]
    assert not m.sample(500, seed=1)["grade"].isna().any()


def test_binary_values_come_back_as_the_user_wrote_them(category_model):
    df, m = category_model
    out = m.sample(300, seed=0)
    assert not out[["sex", "smoker", "diabetic"]].isna().any().any()
    assert set(out["sex"]) == {False, True} and set(out["smoker"]) == {"0", "1"}
    assert set(out["diabetic"]) == {"True", "False"}
    cf = m.counterfactual(df.head(3), do={"sex": True, "smoker": "1", "diabetic": "False"})
    assert cf["sex"].tolist() == [True] * 3 and cf["smoker"].tolist() == ["1"] * 3
    assert cf["diabetic"].tolist() == ["False"] * 3


def test_model_with_category_columns_saves_and_loads(category_model, tmp_path):
    df, m = category_model
    back = mc.CausalModel.load(m.save(tmp_path / "m.pt"))
    out = back.sample(50, do={"grade": "extreme"}, seed=0)
    assert (out["grade"] == "extreme").all() and set(out["sex"]) <= {False, True}


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


# -- 2. per-row arrays for discrete variables: one value per row ----------------------------------
@pytest.fixture(scope="module")
def small_model():
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"sex": rng.integers(0, 2, n), "grade": rng.choice(["a", "b"], n),
                       "bp": rng.normal(size=n)})
    return _fit(df, {"sex": "binary", "grade": "categorical", "bp": "continuous"},
                [("sex", "bp"), ("grade", "bp")])


@pytest.mark.parametrize("do", [{"sex": np.ones((4, 2))}, {"grade": np.array([["a", "b"]] * 4)},
                                {"sex": lambda s: np.stack([s, s], 1)}])
def test_a_2d_per_row_array_for_a_discrete_variable_is_refused(small_model, do):
    name = next(iter(do))
    with pytest.raises(InterventionError, match=f"'{name}' needs 1 value per row, got shape \\(4, 2\\)"):
        small_model.sample(4, do=do, seed=0)


def test_a_column_shaped_per_row_array_is_accepted(small_model):
    out = small_model.sample(4, do={"sex": np.ones((4, 1)), "grade": np.array([["b"]] * 4)}, seed=0)
    assert out["sex"].tolist() == [1] * 4 and out["grade"].tolist() == ["b"] * 4


# -- 3. resume checks the intervention itself, not a summary of it --------------------------------
def _interrupt(out):
    """Make a finished run look interrupted after its first chunk."""
    (out / S.MARKER).unlink()
    (out / "part-00001.csv").unlink()
    meta = json.loads((out / S.SIDECAR).read_text())
    meta["parts"] = meta["parts"][:1]
    (out / S.SIDECAR).write_text(json.dumps(meta))
    return meta


def test_resume_refuses_a_different_per_row_array(small_model, tmp_path):
    out = tmp_path / "run"
    kw = dict(seed=0, chunk_size=3, out=out, format="csv")
    S.simulate(small_model, 6, do={"bp": np.full(6, -1.0)}, **kw)
    _interrupt(out)
    with pytest.raises(MedCausalError, match="differs in \\['do'\\]"):
        S.simulate(small_model, 6, do={"bp": np.full(6, 1.0)}, resume=True, **kw)
    run = S.simulate(small_model, 6, do={"bp": np.full(6, -1.0)}, resume=True, **kw)
    assert run.read()["bp"].tolist() == [-1.0] * 6


def test_resume_refuses_a_callable(small_model, tmp_path):
    out = tmp_path / "run"
    kw = dict(seed=0, chunk_size=3, out=out, format="csv")
    S.simulate(small_model, 6, do={"bp": lambda b: b + 1}, **kw)
    _interrupt(out)
    with pytest.raises(InterventionError, match="'bp'.*callable cannot be verified"):
        S.simulate(small_model, 6, do={"bp": lambda b: b - 1}, resume=True, **kw)


def test_resume_refuses_an_array_run_from_an_older_sidecar(small_model, tmp_path):
    out = tmp_path / "run"
    kw = dict(seed=0, chunk_size=3, out=out, format="csv")
    S.simulate(small_model, 6, do={"bp": np.full(6, -1.0)}, **kw)
    meta = _interrupt(out)
    meta["do"] = {"bp": "<per-row array of 6>"}  # as older versions wrote it
    (out / S.SIDECAR).write_text(json.dumps(meta))
    with pytest.raises(MedCausalError, match="differs in \\['do'\\]"):
        S.simulate(small_model, 6, do={"bp": np.full(6, -1.0)}, resume=True, **kw)


# -- 4. non-finite pixels in a figure ---------------------------------------------------------------
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


# -- 5, 6. recipes: bad image shapes and non-UTF-8 files ------------------------------------------
def test_image_with_a_bad_shape_is_a_graph_error_naming_the_variable():
    with pytest.raises(GraphError, match="'64x64'"):
        mc.Image("64x64")
    with pytest.raises(GraphError, match="variable 'mri'.*'64x64'"):
        mc.CausalGraph({"mri": {"type": "image", "shape": "64x64"}})


def test_recipe_with_a_bad_image_shape_names_the_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[data]\npath="d.csv"\n[variables]\nmri={type="image", shape="64x64"}\n')
    with pytest.raises(RecipeError, match="r.toml.*'mri'.*'64x64'"):
        load_recipe(p)


def test_recipe_that_is_not_utf8_names_the_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_bytes('# caf\xe9\n[data]\npath="d.csv"\n[variables]\na="continuous"\n'.encode("latin-1"))
    with pytest.raises(RecipeError, match="r.toml.*not UTF-8"):
        load_recipe(p)
