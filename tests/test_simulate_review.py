"""Review regressions for medcausal.simulate: resume checks, seeds, ignored options, containers."""

import importlib
import json

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.errors import DataError, InterventionError, MedCausalError
from conftest import linear_gaussian
from test_simulate import interrupted  # noqa: E402  (stop a streamed run before a chunk)

S = importlib.import_module("medcausal.simulate")


@pytest.fixture(scope="module")
def tiny(lg_graph):
    df, _ = linear_gaussian(300, seed=0)
    return mc.CausalModel(lg_graph).fit(df, seed=0, max_epochs=3, verbose=False)


def test_resume_refuses_a_different_min_acceptance(tiny, tmp_path, monkeypatch):
    # min_acceptance sizes the rejection pilot, whose rate sizes every batch: a resumed run
    # with another min_acceptance drew different patients and mixed them with the first run's
    kw = dict(n=1200, where="y > 1", seed=0, chunk_size=600, format="csv", progress=False)
    a = S.simulate(tiny, min_acceptance=1e-3, **kw)
    b = S.simulate(tiny, min_acceptance=1e-4, **kw)
    assert a.attrs["medcausal"]["method"] == "rejection" and not np.allclose(a["y"], b["y"])
    out = tmp_path / "run"
    interrupted(tiny, out, monkeypatch, min_acceptance=1e-3, **kw)
    with pytest.raises(MedCausalError, match="min_acceptance"):
        S.simulate(tiny, out=out, resume=True, min_acceptance=1e-4, **kw)
    run = S.simulate(tiny, out=out, resume=True, min_acceptance=1e-3, **kw)
    np.testing.assert_allclose(run.read()["y"].to_numpy(), a["y"].to_numpy())


def test_resume_refuses_a_different_provenance(tiny, tmp_path, monkeypatch):
    kw = dict(n=200, seed=0, chunk_size=100, format="csv", progress=False)
    out = tmp_path / "run"
    interrupted(tiny, out, monkeypatch, **kw)
    with pytest.raises(MedCausalError, match="provenance"):
        S.simulate(tiny, out=out, resume=True, provenance=False, **kw)
    assert S.simulate(tiny, out=out, resume=True, **kw).read()["synthetic"].eq(True).all()


def test_seed_beyond_int64_is_a_clear_error(tiny):
    with pytest.raises(MedCausalError, match="seed"):
        S.simulate(tiny, 5, seed=2**63)
    assert (S.simulate(tiny, 5, seed=2**63 - 1)["synth_seed"] == 2**63 - 1).all()


def test_augment_sample_refuses_transport_options(tiny):
    df, _ = linear_gaussian(100, seed=1)
    with pytest.raises(InterventionError, match="strategy='sample'"):
        S.augment(tiny, df, target="s == 1", n=80, strategy="sample", do={"x": 5.0}, seed=0)
    with pytest.raises(DataError, match="source="):
        S.augment(tiny, df, target="s == 1", n=80, strategy="sample", source="x > 0", seed=0)


def test_streamed_cohort_reads_back_as_cohort(lg_graph, tmp_path):
    df, _ = linear_gaussian(200, seed=0)
    model = mc.CausalModel(lg_graph).fit(mc.Cohort(df), max_epochs=1, verbose=False)
    mem = S.simulate(model, 30, seed=0, chunk_size=10)
    for fmt in ("csv", "parquet"):
        back = S.simulate(model, 30, seed=0, chunk_size=10, out=tmp_path / fmt, format=fmt).read()
        assert isinstance(mem, mc.Cohort) and isinstance(back, mc.Cohort)
        assert back.ids.tolist() == mem.ids.tolist() == list(range(30))
        np.testing.assert_allclose(back.table["y"].to_numpy(), mem.table["y"].to_numpy(), rtol=1e-6)


def test_written_scans_keep_their_affine(tmp_path):
    # `medcausal augment/worlds/simulate --out x.csv` wrote every NIfTI with the identity affine
    # while the table kept the scans' real `mri_affine`
    import json

    import nibabel as nib

    A = np.diag([2.0, 2.0, 2.0, 1.0])
    A[:3, 3] = [-90.0, -126.0, -72.0]
    table = pd.DataFrame({"id": [0, 1], "age": [60.0, 70.0], "mri_affine": [json.dumps(A.tolist())] * 2})
    arr = np.ones((2, 1, 4, 4, 4), np.float32)
    S._write_output(mc.Cohort(table, {"mri": arr, "mri@old": arr}), tmp_path / "out.csv")
    back = pd.read_csv(tmp_path / "out.csv")
    for col in ("mri_path", "mri@old_path"):
        np.testing.assert_allclose(nib.load(str(tmp_path / back[col][1])).affine, A)


def test_augmenting_twice_keeps_string_ids_unique(tiny):
    df, _ = linear_gaussian(100, seed=1)
    df.index = [f"p{i}" for i in range(100)]
    once = S.augment(tiny, df, target="s == 1", n=50, seed=0)
    twice = S.augment(tiny, once, target="s == 1", n=60, seed=1)
    assert len(twice) == len(once) + 10 and twice.index.is_unique



# ----------------------------------------------------------------- review, session 15
def test_a_missing_synthetic_flag_is_a_real_row(tiny):
    # real rows concatenated with earlier synthetic output have synthetic=NaN: they are real
    df, _ = linear_gaussian(300, seed=2)
    extra = S.simulate(tiny, 20, where="s == 1", seed=1)[["x", "s", "y", "stage", "synthetic"]]
    extra.index = extra.index + 10_000
    both = pd.concat([df, extra])
    aug = S.augment(tiny, both, target="s == 1", n=200, strategy="transport", seed=0)
    assert not aug.loc[df.index, "synthetic"].any() and aug.loc[extra.index, "synthetic"].all()
    test, _ = linear_gaussian(100, seed=3)
    test["synthetic"] = np.nan
    res = S.evaluate_augmentation(both, test, "stage", n_boot=20)
    assert res.set_index("condition").loc["real", "n_train_real"] == len(df)
    assert res.set_index("condition").loc["real+synthetic", "n_train_synthetic"] == len(extra)


@pytest.fixture(scope="module")
def vector_model():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(200, 2))
    df = pd.DataFrame({"v[0]": v[:, 0], "v[1]": v[:, 1], "y": v.sum(1) + rng.normal(size=200)})
    g = mc.CausalGraph({"v": mc.graph.Continuous(dim=2), "y": "continuous"}, edges=[("v", "y")])
    return mc.CausalModel(g).fit(df, max_epochs=1, verbose=False), df


def test_simulate_reads_a_vector_value_as_model_sample_does(vector_model):
    model, df = vector_model
    out = S.simulate(model, 5, do={"v": [1.0, 2.0]}, seed=0)  # one value for all 5 rows, not 2 per-row values
    assert out[["v[0]", "v[1]"]].values.tolist() == [[1.0, 2.0]] * 5
    assert out["synth_do"].iloc[0] == '{"v": [1.0, 2.0]}'
    frame = pd.DataFrame({"v[1]": [2.0] * 3, "v[0]": [-1.0] * 3})  # columns by name, not position
    assert S.simulate(model, 3, do={"v": frame}, seed=0)[["v[0]", "v[1]"]].values.tolist() == [[-1.0, 2.0]] * 3
    twins = S.counterfactual_patients(model, df.iloc[:3], do={"v": [1.0, 2.0]})
    assert twins["v[1]@v=[1.0, 2.0]"].tolist() == [2.0] * 3


def test_augment_and_twins_keep_anndata(tmp_path):
    sim = mc.synthetic.PerturbSeq(n_genes=20, n_perturbations=2, seed=1)
    cells = sim.sample(200, seed=0)
    model = mc.CausalModel(sim.graph).fit(cells, max_epochs=1, verbose=False)
    aug = S.augment(model, cells, target="cell_type", strategy="sample", seed=0)
    added = aug.uns["medcausal"]["added"]
    assert type(aug).__name__ == "AnnData" and aug.n_obs == 200 + added > 200
    assert aug.obs["synthetic"].sum() == added and aug.obs_names.is_unique
    assert aug.obs["cell_type"].value_counts().nunique() == 1  # rebalanced
    np.testing.assert_array_equal(aug.layers["counts"][:200].toarray(), cells.layers["counts"].toarray())
    twins = S.counterfactual_patients(model, cells[:5].copy(), do={"perturbation": "P0"}, seed=0)
    assert type(twins).__name__ == "AnnData" and twins.obs_names.tolist() == cells.obs_names[:5].tolist()
    cf = model.counterfactual(cells[:5].copy(), do={"perturbation": "P0"}, seed=0)
    np.testing.assert_array_equal(twins.layers["expression@perturbation=P0"].toarray(),
                                  cf.layers["counts"].toarray())
    long = S.counterfactual_patients(model, cells[:5].copy(), do={"perturbation": "P0"}, layout="long")
    assert long.n_obs == 10 and long.obs_names[5] == f"{cells.obs_names[0]}@perturbation=P0"
    aug.write_h5ad(tmp_path / "plain.h5ad")  # the returned AnnData is storable as it is
    for name, result in (("aug", aug), ("twins", twins)):  # as the CLI writes them (the report as JSON text)
        S._write_output(result, tmp_path / f"{name}.h5ad", "nifti")
        back = anndata.read_h5ad(tmp_path / f"{name}.h5ad")
        assert back.n_obs == result.n_obs and set(back.layers) == set(result.layers)
    groups = json.loads(anndata.read_h5ad(tmp_path / "aug.h5ad").uns["medcausal"]["groups"])
    assert sum(g["added"] for g in groups) == added


def test_evaluate_augmentation_leaves_out_columns_the_model_does_not_generate(tiny):
    df, _ = linear_gaussian(300, seed=4)
    df["site"] = np.arange(300) % 3  # not a model variable: NaN on the synthetic rows
    aug = S.augment(tiny, df, target="s == 1", n=250, seed=0)
    test, _ = linear_gaussian(200, seed=5)
    test["site"] = np.arange(200) % 3
    with pytest.warns(UserWarning, match="site"):
        res = S.evaluate_augmentation(aug, test, "stage", n_boot=20)
    assert np.isfinite(res["score"]).all()


def test_binary_variables_written_as_strings_in_where_and_rebalancing(tiny):
    df, _ = linear_gaussian(300, seed=6)
    df["s"] = df["s"].map({0: "False", 1: "True"})  # as a CSV of booleans may read
    model = mc.CausalModel(tiny.graph).fit(df, max_epochs=1, verbose=False)
    assert set(S.simulate(model, 30, where="s == 'True'", seed=0)["s"]) == {"True"}
    with pytest.raises(DataError, match="takes only"):
        S.simulate(model, 30, where="s == 1", seed=0)
    aug = S.augment(model, df, target="s", seed=0)
    counts = aug["s"].value_counts()
    assert counts["True"] == counts["False"] == (df["s"] == "False").sum()


def test_transport_names_its_sources_by_the_index(tiny):
    df, _ = linear_gaussian(200, seed=7)
    df.insert(0, "patient_id", [f"P{i}" for i in range(200)])  # a column of that name is no obstacle
    aug = S.augment(tiny, df, target="s == 1", n=150, strategy="transport", seed=0)
    assert set(aug.loc[aug["synthetic"], "synth_source"]) <= set(df.index)
    with pytest.raises(DataError, match="synth_source"):
        S.augment(tiny, df.set_index(pd.Index([0] * 200)), target="s == 1", n=150, strategy="transport", seed=0)


def test_evaluate_augmentation_refuses_metrics_that_do_not_fit():
    rng = np.random.default_rng(0)

    def frame(n, classes):
        x = rng.normal(size=n)
        y = np.digitize(x, [-0.5, 0.5]) if classes == 3 else (x > 0).astype(int) if classes == 2 else 2 * x
        return pd.DataFrame({"x": x, "y": y})

    with pytest.raises(MedCausalError, match="binary"):
        S.evaluate_augmentation(frame(200, 3), frame(100, 3), "y", metric="f1", n_boot=5)
    with pytest.raises(MedCausalError, match="does not fit a regression"):
        S.evaluate_augmentation(frame(200, 0), frame(100, 0), "y", metric="accuracy", n_boot=5)
    # f1 is defined on a subgroup of one class, so is its interval
    res = S.evaluate_augmentation(frame(300, 2), frame(300, 2), "y", metric="f1", subgroups={"pos": "x > 0.5"},
                                  n_boot=50).set_index("subgroup")
    assert np.isfinite(res.loc["pos", ["score", "score_low", "score_high"]].astype(float)).all()
    for bad in ({"ci": 95}, {"n_boot": 0}):
        with pytest.raises(MedCausalError):
            S.evaluate_augmentation(frame(200, 2), frame(100, 2), "y", **bad)


def test_model_id_is_the_same_for_a_refit_with_the_same_weights(lg_graph):
    df, _ = linear_gaussian(200, seed=8)
    a = mc.CausalModel(lg_graph).fit(df, seed=0, max_epochs=2, verbose=False)
    b = mc.CausalModel(lg_graph).fit(df, seed=0, max_epochs=2, verbose=False)
    assert all(torch.equal(p, q) for p, q in zip(a.mechanisms.state_dict().values(),
                                                  b.mechanisms.state_dict().values()))
    assert S.model_id(a) == S.model_id(b)


def test_augmenting_a_cohort_keeps_only_its_own_id_column(tiny):
    df, _ = linear_gaussian(200, seed=9)
    cohort = mc.Cohort(df.assign(pid=[f"P{i}" for i in range(200)]), {}, id_column="pid")
    for strategy in ("sample", "transport"):
        aug = S.augment(tiny, cohort, target="s == 1", n=150, strategy=strategy, seed=0)
        assert "id" not in aug.table.columns and aug.table["pid"].is_unique
    with pytest.raises(MedCausalError, match="min_acceptance"):
        S.augment(tiny, df, target="s == 1", n=150, strategy="transport", min_acceptance=0, seed=0)



def test_augmenting_an_augmented_csv_again_keeps_its_real_rows_real(tiny, tmp_path):
    # the CLI read the provenance columns as text: "False" was truthy, every real row became synthetic
    df, _ = linear_gaussian(200, seed=10)
    once = S.augment(tiny, df, target="s == 1", n=150, seed=0)
    once.to_csv(tmp_path / "once.csv")
    back = S._read_input(tiny, tmp_path / "once.csv")
    np.testing.assert_array_equal(S._synthetic_flag(back), once["synthetic"].to_numpy())
    twice = S.augment(tiny, back, target="s == 1", n=170, strategy="transport", seed=1)
    assert int(twice["synthetic"].sum()) == int(once["synthetic"].sum()) + 20


# ---- session 16 review -------------------------------------------------------------------


@pytest.fixture(scope="module")
def private():
    import warnings

    df, _ = linear_gaussian(300, seed=0)
    graph = mc.CausalGraph({"x": "continuous", "s": "binary", "y": "continuous",
                            "stage": {"type": "categorical", "categories": ["high", "low"]}},
                           edges=[("x", "y"), ("s", "y"), ("y", "stage")])
    bounds = {"x": (-10.0, 10.0), "y": (-10.0, 10.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mc.CausalModel(graph).fit(df, seed=0, max_epochs=1, verbose=False,
                                            privacy=mc.Privacy(noise_multiplier=1.0, public_bounds=bounds))


def test_transported_rows_carry_no_dp_epsilon(private):
    """A transported row is a counterfactual of a real patient: it was stamped with the model's epsilon."""
    df, _ = linear_gaussian(200, seed=7)
    aug = S.augment(private, df, target="s == 1", n=150, strategy="mixed", seed=0)
    synth = aug[aug["synthetic"]]
    transported = synth["synth_strategy"] == "transport"
    assert transported.any() and (~transported).any()
    assert synth.loc[transported, "synth_epsilon"].isna().all()
    assert (synth.loc[~transported, "synth_epsilon"] == private.privacy["epsilon"]).all()
    # so is a counterfactual of any row, a sampled one included: it reveals the row it derives from
    cf = private.counterfactual(synth, do={"s": 1}, seed=2**64 - 1)
    assert cf["synth_epsilon"].isna().all() and cf["synthetic"].all() and (cf["synth_strategy"] == "counterfactual").all()
    assert (cf["synth_seed"] == -1).all()  # 2**64 - 1 as the int64 torch seeds its generator with alike
    pd.testing.assert_frame_equal(cf, private.counterfactual(synth, do={"s": 1}, seed=-1))
    assert "transported rows are counterfactuals" in aug.attrs["medcausal"]["privacy"]["covers"]


def test_cli_counterfactuals_of_a_dp_model_say_the_guarantee_does_not_cover_them(private, tmp_path, capsys):
    from medcausal.cli import main

    private.save(tmp_path / "m.mcm")
    df, _ = linear_gaussian(20, seed=3)
    df.to_csv(tmp_path / "in.csv", index=False)
    assert main(["counterfactual", str(tmp_path / "m.mcm"), "--input", str(tmp_path / "in.csv"), "--do", "x=1",
                 "--out", str(tmp_path / "cf.csv")]) == 0
    assert "does NOT cover them" in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "m.mcm"), "-n", "5", "--out", str(tmp_path / "s.csv")]) == 0
    assert "does NOT cover" not in capsys.readouterr().out


def test_cli_augment_names_sources_by_the_id_column(tiny, tmp_path):
    """Without --id-column, synth_source held the row number, which named another patient once the
    CSV's rows were not in id order."""
    from medcausal.cli import main

    tiny.save(tmp_path / "m.mcm")
    df, _ = linear_gaussian(200, seed=7)
    df.insert(0, "patient_id", [f"P{i:03d}" for i in range(200)])
    df = df.iloc[::-1]
    df.to_csv(tmp_path / "in.csv", index=False)
    assert main(["augment", str(tmp_path / "m.mcm"), "--input", str(tmp_path / "in.csv"), "--target", "s == 1",
                 "-n", "120", "--strategy", "transport", "--id-column", "patient_id",
                 "--out", str(tmp_path / "aug.csv"), "--quiet"]) == 0
    aug = pd.read_csv(tmp_path / "aug.csv")
    synth = aug[aug["synthetic"]]
    assert len(synth) and set(synth["synth_source"]) <= set(df["patient_id"])
    assert synth["patient_id"].str.startswith("syn-").all() and aug["patient_id"].is_unique
    assert main(["augment", str(tmp_path / "m.mcm"), "--input", str(tmp_path / "in.csv"), "--target", "s == 1",
                 "--id-column", "pid", "--out", str(tmp_path / "x.csv"), "--quiet"]) == 2  # named in the error
