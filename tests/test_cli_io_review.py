"""Review of the command line, the demos, the io helpers and the iVAE: each test pins a fixed bug."""

import os
import stat

import numpy as np
import pandas as pd
import pytest

import medcausal as mc
from medcausal.cli import main
from medcausal.errors import MedCausalError
from medcausal.io import read_table, write_table

from test_cli import RECIPE as _RECIPE  # noqa: E402  (the CLI tests' triangle recipe)

RECIPE = _RECIPE.format(epochs=1)


@pytest.fixture()
def run(tmp_path):
    mc.synthetic.scm("triangle").sample(60, seed=0).to_csv(tmp_path / "data.csv")
    (tmp_path / "tri.toml").write_text(RECIPE)
    umask = os.umask(0o022)
    try:
        assert main(["fit", str(tmp_path / "tri.toml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    finally:
        os.umask(umask)
    return tmp_path / "run"


def test_fit_run_folder_is_readable_like_the_files_in_it(run):
    # The files get 0666 less the umask (atomic_write); the folder holding them was 0700 (mkdtemp),
    # so collaborators could not open the run at all.
    assert stat.S_IMODE((run / "model.mcm").stat().st_mode) == 0o644
    assert stat.S_IMODE(run.stat().st_mode) == 0o755


def test_counterfactual_keeps_id_columns_as_written(run, tmp_path):
    obs = mc.synthetic.scm("triangle").sample(3, seed=5).reset_index(drop=True)
    obs.insert(0, "patient_id", ["007", "010", "123"])
    obs.to_csv(tmp_path / "obs.csv", index=False)
    assert main(["counterfactual", str(run), "--input", str(tmp_path / "obs.csv"), "--do", "x1=0",
                 "--out", str(tmp_path / "cf.csv")]) == 0
    cf = pd.read_csv(tmp_path / "cf.csv", dtype={"patient_id": str})
    assert cf["patient_id"].tolist() == ["007", "010", "123"]  # was 7, 10, 123
    assert (cf["x1"] == 0.0).all()


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


# --------------------------------------------------------------------------- #
# iVAE


@pytest.fixture(scope="module")
def ivae_data():
    from medcausal.crl import nonlinear_ica_data

    return nonlinear_ica_data(n_segments=3, n_per_segment=20, n_sources=2, seed=0)


@pytest.mark.parametrize("bad", [{"rounds": 0}, {"refine_steps": -1}, {"batch_size": 0}, {"lr": -1.0}])
def test_a_failed_ivae_fit_leaves_the_fitted_model_as_it_was(ivae_data, bad):
    from medcausal.crl import IVAE

    x, u, _ = ivae_data
    model = IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, refine_steps=2, verbose=False)
    before = model.encode(x, u)
    with pytest.raises(MedCausalError):
        model.fit(3.0 * x + 5.0, u + 100, max_epochs=1, verbose=False, **bad)
    # was: the new data's u categories and x scaling replaced the fitted ones (encode then failed)
    np.testing.assert_array_equal(model.encode(x, u), before)


def test_an_interrupted_ivae_refit_restores_the_model(ivae_data, monkeypatch):
    import medcausal.crl.ivae as ivae_module
    from medcausal.crl import IVAE

    x, u, _ = ivae_data
    model = IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, refine_steps=2, verbose=False)
    before = model.encode(x, u)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ivae_module, "train_rounds", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the refit's training
        model.fit(3.0 * x + 5.0, u, max_epochs=1, verbose=False)
    # was: an untrained network and the new data's scaling in place of the fitted ones
    np.testing.assert_array_equal(model.encode(x, u), before)


def test_ivae_max_epochs_none_is_a_clear_error(ivae_data):
    from medcausal.crl import IVAE

    x, u, _ = ivae_data
    with pytest.raises(MedCausalError, match="max_epochs"):  # was: TypeError comparing int and None
        IVAE(2, hidden=(8,)).fit(x, u, max_epochs=None, max_steps=3, verbose=False)


def test_ivae_refit_on_arrays_forgets_the_anndata_keys(ivae_data, tmp_path):
    anndata = pytest.importorskip("anndata")
    from medcausal.crl import IVAE

    x, u, _ = ivae_data
    adata = anndata.AnnData(X=x.astype(np.float32), obs=pd.DataFrame({"batch": u.astype(str)}))
    model = IVAE(2, hidden=(8,)).fit(adata, aux_key="batch", max_epochs=1, refine_steps=0, verbose=False)
    assert model.anndata_keys == {"aux_key": "batch", "layer": None}
    model.fit(x, u, max_epochs=1, refine_steps=0, verbose=False)
    assert model.anndata_keys is None  # was: the earlier fit's keys, saved with the new model
    assert IVAE.load(model.save(tmp_path / "m.pt")).anndata_keys is None


# --------------------------------------------------------------------------- #
# demos


def test_a_failed_demo_rerun_leaves_no_stale_report(tmp_path, monkeypatch):
    import medcausal.synthetic
    from medcausal.demo import run_tabular_demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("# report of an earlier run")
    (out / "report.json").write_text("{}")

    def broken(*a, **k):
        raise MedCausalError("simulator failed")

    monkeypatch.setattr(medcausal.synthetic, "scm", broken)
    with pytest.raises(MedCausalError):
        run_tabular_demo(out, quick=True, verbose=False)
    # was: the earlier report stayed beside whatever this run had written, looking complete
    assert not (out / "report.md").exists() and not (out / "report.json").exists()


# ----------------------------------------------------------------- review, session 15
def test_text_category_codes_survive_csv(tmp_path):
    # "01" read from a CSV became the number 1 and matched no declared category
    rng = np.random.default_rng(0)
    grade = rng.choice(["01", "02", "03"], 120)
    df = pd.DataFrame({"age": rng.normal(60, 10, 120), "grade": grade})
    df["bp"] = 100 + 0.3 * df["age"] + (grade == "03") * 8 + rng.normal(0, 3, 120)
    df.to_csv(tmp_path / "cohort.csv", index=False)
    (tmp_path / "r.toml").write_text(
        'name = "t"\nedges = [["age", "bp"], ["grade", "bp"]]\n[data]\npath = "cohort.csv"\n[variables]\n'
        'age = "continuous"\ngrade = { type = "categorical", categories = ["01", "02", "03"] }\n'
        'bp = "continuous"\n[fit]\nmax_epochs = 1\n')
    run = tmp_path / "run"
    assert main(["fit", str(tmp_path / "r.toml"), "--out", str(run), "--quiet"]) == 0
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.csv")]) == 0
    assert set(pd.read_csv(tmp_path / "s.csv", dtype={"grade": str})["grade"]) <= {"01", "02", "03"}
    assert main(["counterfactual", str(run), "--input", str(tmp_path / "s.csv"), "--do", "age=70",
                 "--out", str(tmp_path / "cf.csv")]) == 0
    cf = pd.read_csv(tmp_path / "cf.csv", dtype={"grade": str})
    assert cf["grade"].tolist() == pd.read_csv(tmp_path / "s.csv", dtype={"grade": str})["grade"].tolist()


def test_fit_overwrite_keeps_the_old_run_if_interrupted(run, monkeypatch):
    # the old run was deleted before the new one moved in: an interruption between lost both
    import medcausal.cli as cli

    before = (run / "model.mcm").read_bytes()
    real = os.replace

    def interrupted(src, dst, *a, **k):
        if os.path.isdir(src) and os.path.basename(src).startswith(".run.") and ".old." not in str(src):
            raise KeyboardInterrupt("at the new run's final rename")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(cli.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["fit", str(run.parent / "tri.toml"), "--out", str(run), "--quiet", "--overwrite"])
    monkeypatch.setattr(cli.os, "replace", real)
    assert (run / "model.mcm").read_bytes() == before
    assert sorted(p.name for p in run.parent.iterdir() if p.name.startswith(".run")) == []  # nothing left over
    assert cli.main(["fit", str(run.parent / "tri.toml"), "--out", str(run), "--quiet", "--overwrite"]) == 0


def test_a_variable_named_like_a_vector_column_is_refused():
    from medcausal.errors import GraphError

    with pytest.raises(GraphError, match="'v' and 'v\\[0\\]' would both be the table column 'v\\[0\\]'"):
        mc.CausalGraph({"v": mc.graph.Continuous(dim=2), "v[0]": "continuous"})


def test_nullable_pandas_dtypes_come_back():
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"smoker": pd.array(rng.random(n) < 0.4, dtype="boolean"),
                       "visits": pd.array(rng.integers(0, 2, n), dtype="Int64"),
                       "site": pd.array(rng.choice(["a", "b"], n), dtype="string")})
    df["bp"] = 120 + 5 * df["smoker"].astype(float) + rng.normal(size=n)
    g = mc.CausalGraph({"smoker": "binary", "visits": "binary", "site": "categorical", "bp": "continuous"},
                       [("smoker", "bp"), ("site", "bp")])
    model = mc.CausalModel(g).fit(df, max_epochs=1, verbose=False)
    cf = model.counterfactual(df.head(3), do={"smoker": True, "site": "b"})
    for out in (model.sample(3, seed=0), cf):
        assert dict(out.dtypes.astype(str)) == dict(df.dtypes.astype(str))
    assert cf["smoker"].tolist() == [True] * 3 and cf["visits"].tolist() == df["visits"].head(3).tolist()


def test_recipe_simulator_options_are_typed(tmp_path):
    from medcausal.errors import RecipeError
    from medcausal.recipe import load_recipe

    (tmp_path / "r.toml").write_text('name = "t"\nedges = [["x1", "x2"]]\n[data]\nsynthetic = "chain"\nn = 50\n'
                                     'options = { additive = "false" }\n[variables]\nx1 = "continuous"\n'
                                     'x2 = "continuous"\nx3 = "continuous"\n')
    with pytest.raises(RecipeError, match="data.options.*additive must be True or False, got 'false'"):
        load_recipe(tmp_path / "r.toml").load_data()  # a string was truthy: the additive SCM, silently


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


def test_a_date_category_takes_its_own_csv_output_back(tmp_path):
    # categories are kept as "2022-01-15T00:00:00"; the CSV output says "2022-01-15"
    rng = np.random.default_rng(0)
    visit = pd.to_datetime(rng.choice(["2021-06-01", "2022-01-15"], 100))
    df = pd.DataFrame({"visit": visit, "x": rng.normal(size=100)})
    g = mc.CausalGraph({"visit": "categorical", "x": "continuous"}, [("visit", "x")])
    model = mc.CausalModel(g).fit(df, max_epochs=1, verbose=False)
    write_table(model.sample(3, seed=0), tmp_path / "s.csv")
    back = read_table(tmp_path / "s.csv")
    assert back["visit"].dtype == object  # text as the CSV reader sees it
    cf = model.counterfactual(back, do={"x": 0.1})
    assert pd.to_datetime(cf["visit"]).tolist() == pd.to_datetime(back["visit"]).tolist() and len(cf) == 3
    assert (model.sample(2, do={"visit": "2022-01-15"}, seed=0)["visit"] == pd.Timestamp("2022-01-15")).all()


def test_a_misspelt_mechanism_is_named_before_the_data_are_read(tmp_path, capsys):
    (tmp_path / "r.toml").write_text(RECIPE.replace("[mechanisms]\n", '[mechanisms]\nx2 = "flwo"\n'))
    assert main(["fit", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "r.toml: [mechanisms]" in err and "flwo" in err  # data.csv does not exist: never read


def test_counterfactual_id_column_keys_each_patients_noise(tmp_path, capsys):
    # The CLI keyed a patient's discrete noise by its row number: the same patient got another
    # counterfactual when the input file was sorted differently. --id-column keys it by the id.
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    pd.DataFrame({"a": a, "b": (a + rng.normal(size=200) > 0).astype(int)}).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "r.toml").write_text('name = "ab"\nedges = [["a", "b"]]\n[data]\npath = "d.csv"\n'
                                     '[variables]\na = "continuous"\nb = "binary"\n[fit]\nmax_epochs = 2\n')
    assert main(["fit", str(tmp_path / "r.toml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    obs = pd.DataFrame({"pid": [f"P{i:02d}" for i in range(40)], "a": a[:40], "b": (a[:40] > 0).astype(int)})
    obs.to_csv(tmp_path / "in.csv", index=False)
    obs.iloc[::-1].to_csv(tmp_path / "rev.csv", index=False)
    out = {}
    for name in ("in", "rev"):
        assert main(["counterfactual", str(tmp_path / "run"), "--input", str(tmp_path / f"{name}.csv"),
                     "--do", "a=0", "--id-column", "pid", "--out", str(tmp_path / f"cf_{name}.csv")]) == 0
        out[name] = pd.read_csv(tmp_path / f"cf_{name}.csv")
        assert list(out[name].columns) == ["pid", "a", "b"]
    both = out["in"].merge(out["rev"], on="pid", suffixes=("", "_rev"))
    assert len(both) == 40 and 0 < both["b"].mean() < 1  # the draws are not all alike
    assert (both["b"] == both["b_rev"]).all()
    for name in ("in", "rev"):  # worlds keyed its noise by row number too
        assert main(["worlds", str(tmp_path / "run"), "--input", str(tmp_path / f"{name}.csv"),
                     "--world", "w:a=0", "--id-column", "pid", "--out", str(tmp_path / f"w_{name}.csv")]) == 0
        w = pd.read_csv(tmp_path / f"w_{name}.csv").merge(out["in"], on="pid")
        assert len(w) == 40 and (w["b@w"] == w["b_y"]).all()  # the same as `counterfactual --id-column`
    assert main(["counterfactual", str(tmp_path / "run"), "--input", str(tmp_path / "in.csv"), "--do", "a=0",
                 "--id-column", "patient", "--out", str(tmp_path / "cf_x.csv")]) == 2
    assert "--id-column 'patient' is not a column of" in capsys.readouterr().err
    assert not (tmp_path / "cf_x.csv").exists()
