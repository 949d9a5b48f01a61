import json
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.cli import main

RECIPE = """
name = "tri"
edges = [["x1", "x2"], ["x1", "x3"], ["x2", "x3"]]

[data]
path = "data.csv"

[variables]
x1 = "continuous"
x2 = "continuous"
x3 = "continuous"

[mechanisms]
x3 = {{ name = "additive", hidden = [16] }}

[fit]
seed = 0
max_epochs = {epochs}
"""


@pytest.fixture()
def recipe(tmp_path):
    sim = mc.synthetic.scm("triangle")
    sim.sample(300, seed=0).to_csv(tmp_path / "data.csv")
    path = tmp_path / "tri.toml"
    path.write_text(RECIPE.format(epochs=3))
    return path


def test_fit_sample_counterfactual_end_to_end(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", str(recipe), "--out", str(run), "--quiet"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["fit.json", "model.mcm", "recipe.toml"]
    assert json.loads((run / "fit.json").read_text())["fit"]["n_rows"] == 300
    torch.load(run / "model.mcm", weights_only=True)

    assert main(["sample", str(run), "-n", "50", "--do", "x1=0.5", "--out", str(tmp_path / "s.csv")]) == 0
    s = pd.read_csv(tmp_path / "s.csv")
    assert len(s) == 50 and (s["x1"] == 0.5).all()

    sim = mc.synthetic.scm("triangle")
    obs = sim.sample(20, seed=5)
    obs.to_csv(tmp_path / "obs.csv")
    assert main(["counterfactual", str(run), "--input", str(tmp_path / "obs.csv"), "--do", "x2=1.0",
                 "--out", str(tmp_path / "cf.parquet")]) == 0
    cf = pd.read_parquet(tmp_path / "cf.parquet")
    assert list(cf.columns) == ["unit", "x1", "x2", "x3"]
    given = pd.read_csv(tmp_path / "obs.csv")
    assert (cf["x2"] == 1.0).all() and (cf["x1"] == given["x1"]).all()  # ancestors untouched
    assert "wrote 20 counterfactuals" in capsys.readouterr().out


def test_fit_refuses_to_overwrite(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["fit", str(recipe), "--out", str(run), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_fit_overwrite_replaces_a_run_folder_and_nothing_else(recipe, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["fit", str(recipe), "--out", str(run), "--quiet"]) == 0
    assert main(["fit", str(recipe), "--out", str(run), "--quiet", "--overwrite"]) == 0  # a run: replaced
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    # the folder holding the recipe and the data, the working folder, a plain file: all refused, untouched
    assert main(["fit", str(recipe), "--out", str(tmp_path), "--quiet", "--overwrite"]) == 2
    assert "working folder" in capsys.readouterr().err
    assert main(["fit", str(recipe), "--out", ".", "--quiet", "--overwrite"]) == 2
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["fit", str(recipe), "--out", str(other), "--quiet", "--overwrite"]) == 2
    assert "['notes.txt']" in capsys.readouterr().err and (other / "notes.txt").read_text() == "keep me"
    assert main(["fit", str(recipe), "--out", str(tmp_path / "data.csv"), "--quiet", "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["results"])


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace('x2 = "continuous"', 'x2 = "continous"'), "variable 'x2': unknown type 'continous'"),
    (lambda t: t.replace("seed = 0", "sed = 0"), "fit.sed: Extra inputs are not permitted"),
    (lambda t: t.replace('["x2", "x3"]', '["x2", "x9"]'), "unknown variable 'x9'"),
    (lambda t: t.replace('path = "data.csv"', 'path = "nope.csv"'), "data file .*nope.csv.* does not exist"),
    (lambda t: t.replace("[data]", "[data"), "invalid TOML"),
    (lambda t: t.replace("max_epochs = 3", "max_epochs = 0"), "fit.max_epochs: Input should be greater"),
])
def test_bad_recipes_name_the_key(recipe, tmp_path, capsys, edit, message):
    recipe.write_text(edit(recipe.read_text()))
    assert main(["fit", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "run").exists()


def test_query_errors(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    main(["fit", str(recipe), "--out", str(run), "--quiet"])
    assert main(["sample", str(run), "-n", "5", "--do", "age=3", "--out", str(tmp_path / "s.csv")]) == 2
    assert "unknown variable 'age'" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
    assert main(["sample", str(tmp_path / "nope"), "-n", "5", "--out", str(tmp_path / "s.csv")]) == 2
    assert "run directory" in capsys.readouterr().err
    pd.DataFrame({"x1": [1.0]}).to_csv(tmp_path / "bad.csv", index=False)
    assert main(["counterfactual", str(run), "--input", str(tmp_path / "bad.csv"), "--do", "x1=0",
                 "--out", str(tmp_path / "cf.csv")]) == 2
    assert "missing column(s) 'x2'" in capsys.readouterr().err


def test_help_on_every_command(capsys):
    for cmd in ([], ["fit"], ["sample"], ["counterfactual"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: medcausal" in capsys.readouterr().out


def test_demo_quick(tmp_path):
    # `medcausal demo --quick`: the brain-MRI demo at toy size, every output written.
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] is True and set(report["results"]) == {"hvae", "cvae"}
    assert report["queries"] == ["do(age+20)", "do(disease flip)", "do(sex flip)"]
    for name, res in report["results"].items():
        assert set(res["queries"]) == set(report["queries"])
        for q in res["queries"].values():
            # Even after a few dozen steps, the patient's own abducted noise beats a fresh sample
            # under the same counterfactual parents (the null-abduction baseline) by far.
            assert q["cf"]["mae"] < 0.5 * q["null_abduction"]["mae"], (name, q)
            assert q["oracle"] and q["effectiveness"]["scanner"]["accuracy"] >= 0.0
            # the MAE splits into the pixels the truth changes and the rest (the scans are float32)
            c = q["change"]
            assert q["cf"]["mae"] == pytest.approx(c["changed_fraction"] * c["missed"]
                                                   + (1 - c["changed_fraction"]) * c["error_elsewhere"], rel=1e-4)
        # The abducted pixel noise makes the null counterfactual exact up to float32 rounding.
        assert res["null_max_abs_error"] < 1e-4 and max(res["composition"]) < 1e-5
        assert len(res["composition"]) == 10 and len(res["reversibility"]) == 3
        assert res["cf_ms_per_patient"] > 0 and np.isfinite(res["fid_samples_vs_real"])
        # one KL per latent group (hvae: its 3 latent levels by default; cvae: its one code)
        assert len(res["latent_kl_nats"]) == {"hvae": 3, "cvae": 1}[name]
    assert (out / "counterfactuals.png").stat().st_size > 10000
    assert "hvae" in (out / "report.md").read_text() and "cvae" in (out / "report.md").read_text()
    assert "hvae captured" in (out / "report.md").read_text()
    model = mc.CausalModel.load(out / "model.mcm")
    assert model.mechanism("mri").name == "hvae"
    assert mc.CausalModel.load(out / "model_cvae.mcm").mechanism("mri").name == "cvae"


def test_demo_tabular_quick(tmp_path, capsys):
    # `medcausal demo --tabular --quick`: the tabular demo through the command line.
    out = tmp_path / "tab"
    assert main(["demo", "--tabular", "--out", str(out), "--quick", "--quiet"]) == 0
    assert "report" in capsys.readouterr().out
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    assert mc.CausalModel.load(out / "model_flow.mcm").mechanism("x3").name == "flow"
    assert (out / "counterfactuals.csv").is_file() and (out / "model_additive.mcm").is_file()


def test_shipped_recipe_with_synthetic_data(tmp_path):
    from pathlib import Path
    recipe = Path(__file__).parents[1] / "cohorts" / "triangle.toml"
    text = recipe.read_text().replace("n = 5000", "n = 300").replace("max_epochs = 200", "max_epochs = 2")
    (tmp_path / "tri.toml").write_text(text)
    assert main(["fit", str(tmp_path / "tri.toml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert mc.CausalModel.load(tmp_path / "run" / "model.mcm").fit_info["n_rows"] == 300


def test_data_needs_exactly_one_source(recipe, tmp_path, capsys):
    recipe.write_text(recipe.read_text().replace('path = "data.csv"', 'path = "data.csv"\nsynthetic = "chain"'))
    assert main(["fit", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "exactly one of data.path" in capsys.readouterr().err


def test_an_unwritable_output_path_is_an_error_not_a_traceback(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", str(recipe), "--out", str(run), "--quiet"]) == 0
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    assert main(["sample", str(run), "-n", "5", "--out", str(blocker / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert "medcausal sample: error:" in err and "blocker" in err and "Traceback" not in err


def test_sample_and_counterfactual_outputs_are_tables_and_not_replaced_silently(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", str(recipe), "--out", str(run), "--quiet"]) == 0
    out = tmp_path / "s.csv"
    assert main(["sample", str(run), "-n", "5", "--out", str(out)]) == 0
    first = out.read_bytes()
    assert main(["sample", str(run), "-n", "7", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == first
    assert main(["sample", str(run), "-n", "7", "--out", str(out), "--overwrite"]) == 0
    assert len(pd.read_csv(out)) == 7
    assert main(["counterfactual", str(run), "--input", str(out), "--do", "x2=1.0",
                 "--out", str(tmp_path / "cf.xlsx")]) == 2
    assert ".csv or .parquet" in capsys.readouterr().err and not (tmp_path / "cf.xlsx").exists()


BRAIN_RECIPE = """
name = "brain"
edges = [["age", "brain_volume"], ["brain_volume", "mri"], ["age", "mri"]]
[data]
synthetic = "brain"
n = 64
seed = 0
options = {{ shape = [16, 16] }}
[variables]
age = "continuous"
brain_volume = "continuous"
mri = {{ type = "image", shape = [1, 16, 16] }}
[mechanisms]
mri = {{ name = "cvae", channels = [4, 8], z_dim = 2, hidden = 16 }}
[fit]
max_epochs = 1
batch_size = 32
"""


def test_sample_and_counterfactual_of_an_image_model_write_the_scans(tmp_path):
    # a Cohort result crashed `sample` (write_table took a Cohort); `counterfactual` could not read scans back
    recipe = tmp_path / "brain.toml"
    recipe.write_text(BRAIN_RECIPE.format())
    run, out, cf = tmp_path / "run", tmp_path / "s.csv", tmp_path / "cf.csv"
    assert main(["fit", str(recipe), "--out", str(run), "--quiet"]) == 0
    assert main(["sample", str(run), "-n", "3", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) == 3 and all((tmp_path / p).is_file() for p in table["mri_path"])
    assert main(["counterfactual", str(run), "--input", str(out), "--do", "age=80", "--out", str(cf)]) == 0
    back = pd.read_csv(cf)
    assert (back["age"] == 80).all() and all((tmp_path / p).is_file() for p in back["mri_path"])


ONE_EPOCH_RECIPE = RECIPE.format(epochs=1)  # the triangle recipe above, fitted for one epoch


@pytest.fixture()
def run(tmp_path):
    mc.synthetic.scm("triangle").sample(60, seed=0).to_csv(tmp_path / "data.csv")
    (tmp_path / "tri.toml").write_text(ONE_EPOCH_RECIPE)
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


def test_a_misspelt_mechanism_is_named_before_the_data_are_read(tmp_path, capsys):
    (tmp_path / "r.toml").write_text(ONE_EPOCH_RECIPE.replace("[mechanisms]\n", '[mechanisms]\nx2 = "flwo"\n'))
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
