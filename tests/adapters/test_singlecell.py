"""AnnData adapter: setup validation, encoding, FCRModel fit/query/save, streaming, Cohort <-> AnnData."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.adapters import singlecell as scad
from medcausal.errors import DataError, InterventionError, ModelFileError, NotFittedError
from medcausal.synthetic.perturbseq import PerturbSeq

SMALL = {"hidden": [32], "decoder_hidden": [32]}


@pytest.fixture(scope="module")
def sim():
    return PerturbSeq(n_genes=40, n_perturbations=4, combinations=["P0+P1", "P2+P3"], seed=0)


def _cells(sim, n=400, seed=0):
    a = sim.sample(n, seed=seed, conditions=["control", "P0", "P1", "P2", "P3", "P0+P1"])
    scad.setup_anndata(a, perturbation_key="perturbation", control="control",
                       covariate_keys=["cell_type", "donor"], dose_key="dose")
    return a


@pytest.fixture(scope="module")
def cells(sim):
    return _cells(sim)


@pytest.fixture(scope="module")
def model(cells):
    return scad.FCRModel(**SMALL).fit(cells, max_epochs=3, seed=0, verbose=False)


# --------------------------------------------------------------------------- setup_anndata
def test_setup_records_the_declaration(cells):
    s = scad.get_setup(cells)
    assert s["perturbation_key"] == "perturbation" and s["control"] == "control"
    assert s["perturbations"] == ["P0", "P1", "P2", "P3"]
    assert s["covariate_categories"]["cell_type"] == ["CT0", "CT1", "CT2"]
    assert s["layer"] == "counts" and s["dose_key"] == "dose" and s["max_dose"] == 1.0


def test_setup_copy_leaves_the_original_alone(sim):
    a = sim.sample(50, seed=1)
    out = scad.setup_anndata(a, perturbation_key="perturbation", control="control", copy=True)
    assert "medcausal_setup" in out.uns and "medcausal_setup" not in a.uns
    assert scad.setup_anndata(a, perturbation_key="perturbation", control="control") is None


def test_setup_errors_name_the_culprit(sim):
    a = sim.sample(60, seed=1)
    with pytest.raises(DataError, match=r"'perturbaton' not found \(did you mean 'perturbation'\?\)"):
        scad.setup_anndata(a, perturbation_key="perturbaton", control="control")
    with pytest.raises(DataError, match="'batch' not found"):
        scad.setup_anndata(a, perturbation_key="perturbation", control="control", covariate_keys=["batch"])
    with pytest.raises(DataError, match="control value 'DMSO'"):
        scad.setup_anndata(a, perturbation_key="perturbation", control="DMSO")
    with pytest.raises(DataError, match="layer 'raw' not found"):
        scad.setup_anndata(a, perturbation_key="perturbation", control="control", layer="raw")
    b = a.copy()
    b.obs["perturbation"] = b.obs["perturbation"].astype(str)
    b.obs.iloc[0, b.obs.columns.get_loc("perturbation")] = "P0+"
    with pytest.raises(DataError, match=r"obs\['perturbation'\].*'P0\+' has an empty member"):
        scad.setup_anndata(b, perturbation_key="perturbation", control="control")
    c = a.copy()
    c.layers["counts"] = c.layers["counts"].copy()
    c.layers["counts"].data = np.log1p(c.layers["counts"].data)
    with pytest.raises(DataError, match=r"layers\['counts'\] holds non-integer values.*raw"):
        scad.setup_anndata(c, perturbation_key="perturbation", control="control")
    c.layers["counts"].data = -np.abs(c.layers["counts"].data) - 1
    with pytest.raises(DataError, match="negative values"):
        scad.setup_anndata(c, perturbation_key="perturbation", control="control")
    d = a.copy()
    d.obs["dose"] = -1.0
    with pytest.raises(DataError, match="dose"):
        scad.setup_anndata(d, perturbation_key="perturbation", control="control", dose_key="dose")
    with pytest.raises(DataError, match="not set up"):
        scad.get_setup(sim.sample(5, seed=2))


# --------------------------------------------------------------------------- encoding
def test_treatment_is_multi_hot_over_singles_times_dose(cells):
    s = scad.get_setup(cells)
    obs = pd.DataFrame({"cell_type": ["CT1", "CT0"], "donor": ["D0", "D1"], "perturbation": ["P3+P1", "control"],
                        "dose": [0.5, 0.0]})
    x = scad._encode_obs(obs, s)
    np.testing.assert_array_equal(x[0], [0, 1, 0, 1, 0, 0, 0.5, 0, 0.5])
    np.testing.assert_array_equal(x[1], [1, 0, 0, 0, 1, 0, 0, 0, 0])
    cf = scad._encode_obs(obs, s, perturbation="P0+P2")  # never seen as a combination: still valid
    np.testing.assert_array_equal(cf[:, 5:], [[0.5, 0, 0.5, 0], [1.0, 0, 1.0, 0]])  # control -> max dose
    with pytest.raises(DataError, match="'P9'"):
        scad._encode_obs(obs, s, perturbation="P0+P9")
    with pytest.raises(DataError, match="'CT7'.*not seen at fit"):
        scad._encode_obs(obs.assign(cell_type="CT7"), s)
    with pytest.raises(InterventionError, match="'age'"):
        scad._encode_obs(obs, s, covariates={"age": 3})


# --------------------------------------------------------------------------- FCRModel
def test_latents_are_written_scverse_style(model, cells):
    a = cells.copy()
    assert model.write_latents(a) is None
    for block, k in (("context", 4), ("treatment", 4), ("interaction", 4)):
        assert a.obsm[f"X_fcr_{block}"].shape == (a.n_obs, k)
    b = model.write_latents(cells, copy=True)
    assert "X_fcr_context" in b.obsm and "X_fcr_context" not in cells.obsm
    lat = model.get_latent_representation(cells)
    np.testing.assert_allclose(lat["context"], a.obsm["X_fcr_context"], rtol=1e-6)


def test_factual_counterfactual_gives_back_the_counts(model, cells):
    """Abduction then prediction under the factual treatment reproduces every count exactly."""
    same = model.predict_counterfactual(cells, perturbation=cells.obs["perturbation"].astype(str).to_numpy(),
                                        dose=cells.obs["dose"].to_numpy())
    assert (same.layers["counts"] != cells.layers["counts"]).nnz == 0


def test_counterfactual_of_a_held_out_combination(model, cells):
    cf = model.predict_counterfactual(cells[:30], perturbation="P0+P2", mean=True, seed=1)
    assert cf.shape == (30, cells.n_vars)
    assert (cf.obs["perturbation"] == "P0+P2").all()
    np.testing.assert_array_equal(cf.obs["factual_perturbation"], cells.obs["perturbation"].astype(str)[:30])
    np.testing.assert_array_equal(cf.obs["dose"], np.where(cells.obs["dose"][:30] > 0, cells.obs["dose"][:30], 1.0))
    X = cf.layers["counts"].toarray()
    assert (X >= 0).all() and np.array_equal(X, np.round(X)) and (cf.X != cf.layers["counts"]).nnz == 0
    assert cf.layers["mean"].shape == (30, cells.n_vars) and (cf.layers["mean"] > 0).all()
    prov = cf.uns["medcausal"]
    assert prov["kind"] == "counterfactual" and prov["model"] == "fcr" and prov["abduction"] == "amortized"
    assert '"perturbation": "P0+P2"' in prov["do"]
    again = model.predict_counterfactual(cells[:30], perturbation="P0+P2", seed=1)
    assert (again.X != cf.X).nnz == 0  # seeded


def test_context_counterfactual_and_errors(model, cells):
    cf = model.predict_counterfactual(cells[:10], perturbation="control", covariates={"cell_type": "CT2"})
    assert (cf.obs["cell_type"] == "CT2").all() and (cf.obs["dose"] == 0).all()
    with pytest.raises(DataError, match="'P7'"):
        model.predict_counterfactual(cells[:10], perturbation="P7")
    with pytest.raises(DataError, match="genes"):
        model.predict_counterfactual(cells[:10, :20], perturbation="P0")
    with pytest.raises(NotFittedError):
        scad.FCRModel().get_latent_representation(cells)


def test_save_load_round_trip(model, cells, tmp_path):
    path = model.save(tmp_path / "fcr.pt")
    back = scad.FCRModel.load(path)
    a, b = model.get_latent_representation(cells[:20]), back.get_latent_representation(cells[:20])
    np.testing.assert_array_equal(a["interaction"], b["interaction"])
    x = model.predict_counterfactual(cells[:20], perturbation="P1", seed=3).X
    y = back.predict_counterfactual(cells[:20], perturbation="P1", seed=3).X
    assert (x != y).nnz == 0
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="junk.pt"):
        scad.FCRModel.load(tmp_path / "junk.pt")


def test_streaming_from_backed_h5ad_matches_in_memory(sim, tmp_path):
    """Backed (X on disk) and in-memory fits see the same minibatches and end with equal weights."""
    a = sim.sample(200, seed=4)
    a.X = a.layers["counts"].copy()
    del a.layers["counts"]
    path = scad.write_h5ad(a, tmp_path / "cells.h5ad")
    kw = dict(perturbation_key="perturbation", control="control", covariate_keys=["cell_type"], layer=None)
    scad.setup_anndata(a, **kw)
    backed = scad.read_h5ad(path, backed=True)
    assert backed.isbacked
    scad.setup_anndata(backed, **kw)
    m1 = scad.FCRModel(**SMALL).fit(a, max_epochs=2, seed=0, verbose=False)
    m2 = scad.FCRModel(**SMALL).fit(backed, max_epochs=2, seed=0, verbose=False)
    for (k, v), w in zip(m1.module.state_dict().items(), m2.module.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)
    lat = m2.get_latent_representation(backed)["context"]
    np.testing.assert_allclose(lat, m1.get_latent_representation(a)["context"], rtol=1e-5, atol=1e-6)
    backed.file.close()


def test_backed_views_read_their_own_rows(sim, tmp_path):
    # A view of a backed AnnData (rows 100.. of the file) must read those rows, from the counts
    # layer and from X alike, not the file's first rows.
    a = sim.sample(150, seed=5)
    a.X = a.layers["counts"].copy()
    scad.setup_anndata(a, perturbation_key="perturbation", control="control")
    path = scad.write_h5ad(a, tmp_path / "layer.h5ad")
    backed = scad.read_h5ad(path, backed=True)
    view = backed[100:110]
    for layer in ("counts", None):
        rows = scad._CountRows(view, layer)
        np.testing.assert_array_equal(rows.rows([5, 1, 5]), a.layers["counts"][[105, 101, 105]].toarray())
    model = scad.FCRModel(**SMALL).fit(a, max_epochs=1, seed=0, verbose=False)
    factual = model.predict_counterfactual(view, perturbation=view.obs["perturbation"].astype(str).to_numpy())
    assert (factual.X != a.layers["counts"][100:110]).nnz == 0  # the factual world gives back these cells
    backed.file.close()


def test_split_key_trains_on_train_rows(sim):
    a = sim.sample(150, seed=6)
    a.obs["split"] = np.where(np.arange(150) < 100, "train", "test")
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", split_key="split")
    m = scad.fit_fcr(a, hparams=SMALL, max_epochs=1, verbose=False)
    assert m.fit_info["n_cells"] == 100


def test_declared_val_rows_validate_and_must_hold_what_train_rows_show(sim):
    a = sim.sample(150, seed=6)
    a.obs["split"] = np.where(np.arange(150) < 100, "train", np.where(np.arange(150) < 130, "val", "test"))
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", split_key="split")
    m = scad.fit_fcr(a, hparams=SMALL, max_epochs=1, verbose=False)
    assert (m.fit_info["n_cells"], m.fit_info["n_val_cells"]) == (100, 30)
    labels = a.obs["perturbation"].astype(str)
    assert labels.str.contains("P3").any()
    a.obs["split"] = np.where(labels.str.contains("P3"), "val", "train")  # P3 only in validation rows
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", split_key="split")
    with pytest.raises(DataError, match="obs\\['split'\\] 'val' rows: .*P3"):
        scad.fit_fcr(a, hparams=SMALL, max_epochs=1, verbose=False)


def test_latent_shift_baseline_through_the_same_entry_point(cells):
    m = scad.FCRModel("latent-shift", n_latent=6, **SMALL).fit(cells, max_epochs=2, verbose=False)
    a = m.write_latents(cells, copy=True)
    assert a.obsm["X_latent_shift_basal"].shape == (cells.n_obs, 6)
    same = m.predict_counterfactual(cells, perturbation=cells.obs["perturbation"].astype(str).to_numpy(),
                                    dose=cells.obs["dose"].to_numpy())
    assert (same.X != cells.layers["counts"]).nnz == 0


# --------------------------------------------------------------------------- Cohort <-> AnnData
def test_cohort_round_trip():
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"id": [10, 11, 12], "cell_type": ["A", "B", "A"], "dose": [0.0, 1.0, 0.5]})
    cohort = mc.Cohort(table, {"expression": rng.poisson(3, (3, 5)).astype(np.float32),
                               "embedding": rng.normal(size=(3, 2))})
    a = scad.cohort_to_anndata(cohort, var_names=list("abcde"))
    assert a.obs_names.tolist() == ["10", "11", "12"] and a.var_names.tolist() == list("abcde")
    assert a.obsm["embedding"].shape == (3, 2)
    back = scad.anndata_to_cohort(a, obsm_keys=["embedding"])
    pd.testing.assert_frame_equal(back.table, cohort.table)
    np.testing.assert_array_equal(back.arrays["expression"], cohort.arrays["expression"])
    np.testing.assert_array_equal(back.arrays["embedding"], cohort.arrays["embedding"])
    with pytest.raises(DataError, match="'expr'"):
        scad.cohort_to_anndata(cohort, expression="expr")


def test_anndata_to_cohort_feeds_a_causal_model(sim, tmp_path):
    """The CausalModel path: Expression variable with the fcr mechanism, categorical treatment."""
    import medcausal.mechanisms.fcr  # noqa: F401

    a = sim.sample(200, seed=7, conditions=["control", "P0", "P1"])
    cohort = scad.anndata_to_cohort(a, obs_keys=["cell_type", "perturbation"])
    graph = mc.CausalGraph({"cell_type": "categorical", "perturbation": "categorical",
                            "expression": mc.Expression(a.n_vars)},
                           edges=[("cell_type", "expression"), ("perturbation", "expression")])
    model = mc.CausalModel(graph, mechanisms={"expression": {"name": "fcr", **SMALL,
                                                             "categorical": ["cell_type", "perturbation"]}})
    model.fit(cohort, max_epochs=2, verbose=False)
    assert model.mechanism("expression").treatment_names == ["perturbation"]
    same = model.counterfactual(cohort[:25], do={"perturbation": cohort.table["perturbation"].to_numpy()[:25]})
    np.testing.assert_array_equal(same.arrays["expression"], cohort.arrays["expression"][:25])
    cf = model.counterfactual(cohort[:5], do={"perturbation": "P1"}, seed=0)
    back = scad.cohort_to_anndata(cf)
    assert back.shape == (5, a.n_vars) and (back.obs["perturbation"] == "P1").all()
    loaded = mc.CausalModel.load(model.save(tmp_path / "m.mcm"))
    again = loaded.counterfactual(cohort[:5], do={"perturbation": "P1"}, seed=0)
    np.testing.assert_array_equal(again.arrays["expression"], cf.arrays["expression"])


def test_h5ad_helpers(tmp_path, sim):
    a = sim.sample(20, seed=8)
    path = scad.write_h5ad(a, tmp_path / "x.h5ad")
    assert path.exists() and not list(tmp_path.glob("*.part"))
    assert scad.read_h5ad(path).shape == (20, 40)
    with pytest.raises(DataError, match="does not exist"):
        scad.read_h5ad(tmp_path / "missing.h5ad")
    with pytest.raises(DataError, match="AnnData"):
        scad.write_h5ad({"not": "anndata"}, tmp_path / "y.h5ad")


def test_causal_model_takes_anndata_directly(sim):
    """fit/counterfactual accept AnnData (the graph's one expression variable takes the counts)
    and answer with AnnData, as sample does; Cohort.from_anndata / to_anndata are the same
    conversion."""
    import medcausal.mechanisms.fcr  # noqa: F401

    a = sim.sample(120, seed=9, conditions=["control", "P0"])
    graph = mc.CausalGraph({"perturbation": "categorical", "genes": mc.Expression(a.n_vars)},
                           edges=[("perturbation", "genes")])
    model = mc.CausalModel(graph, mechanisms={"genes": {"name": "fcr", **SMALL, "categorical": ["perturbation"]}})
    model.fit(a, max_epochs=1, verbose=False)
    cf = model.counterfactual(a[:4], do={"perturbation": "P0"}, seed=0)
    via = model.counterfactual(mc.Cohort.from_anndata(a[:4], expression="genes"), do={"perturbation": "P0"}, seed=0)
    assert isinstance(cf, type(a)) and isinstance(via, mc.Cohort)
    assert cf.obs_names.equals(a.obs_names[:4]) and cf.var_names.equals(a.var_names)
    assert (cf.obs["perturbation"] == "P0").all()
    np.testing.assert_array_equal(cf.layers["counts"].toarray(), via.arrays["genes"])
    assert via.to_anndata(expression="genes").shape == (4, a.n_vars)
    drawn = model.sample(6, seed=0)
    assert isinstance(drawn, type(a)) and drawn.shape == (6, a.n_vars)
    bad = mc.CausalModel(mc.CausalGraph({"perturbation": "categorical", "x": "continuous"},
                                        edges=[("perturbation", "x")]))
    with pytest.raises(mc.errors.DataError, match="expression variable"):
        bad.fit(a, max_epochs=1, verbose=False)


def test_fit_learns_its_vocabulary_from_the_train_rows(sim):
    # P3 occurs only in held-out split rows: the model never trains its weights, so asking for
    # it must fail by name rather than answer with untrained weights.
    a = sim.sample(300, seed=7)
    labels = a.obs["perturbation"].astype(str)
    a.obs["split"] = np.where(labels.str.contains("P3"), "test", "train")
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", split_key="split")
    assert "P3" in a.uns["medcausal_setup"]["perturbations"]
    m = scad.FCRModel(**SMALL).fit(a, max_epochs=1, verbose=False)
    assert "P3" not in m.setup["perturbations"]
    with pytest.raises(DataError, match="P3"):
        m.predict_counterfactual(a[:5], perturbation="P3")


def test_doses_enter_relative_to_the_largest_training_dose(sim):
    # The same cells with doses in nM (x 1000) train the same model as with unit doses, and the
    # counterfactual's obs records the dose in the data's own units.
    a = sim.sample(200, seed=8)
    b = a.copy()
    b.obs["dose"] = b.obs["dose"] * 1000.0
    models = []
    for x in (a, b):
        scad.setup_anndata(x, perturbation_key="perturbation", control="control", dose_key="dose")
        models.append(scad.FCRModel(**SMALL).fit(x, max_epochs=2, seed=0, verbose=False))
    for (k, v), w in zip(models[0].module.state_dict().items(), models[1].module.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)
    cf = models[1].predict_counterfactual(b[:4], perturbation="P1", dose=500.0)
    assert np.allclose(cf.obs["dose"].to_numpy(float), 500.0)


def test_missing_control_doses_and_other_named_errors(sim):
    a = sim.sample(120, seed=10)
    control = (a.obs["perturbation"] == "control").to_numpy()
    a.obs.loc[control, "dose"] = np.nan  # often how real data store an untreated cell's dose
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", dose_key="dose")
    m = scad.FCRModel(**SMALL).fit(a, max_epochs=1, verbose=False)
    same = m.predict_counterfactual(a[control], perturbation="control")
    assert (same.X != a.layers["counts"][control]).nnz == 0
    assert np.isfinite(m.get_latent_representation(a)["context"]).all()
    with pytest.raises(DataError, match="no cells"):
        m.predict_counterfactual(a[:0], perturbation="P0")
    with pytest.raises(DataError, match="layer=None"):
        scad.setup_anndata(a, perturbation_key="perturbation", control="control", layer="raw")
    a.obs.loc[~control, "dose"] = np.nan
    with pytest.raises(DataError, match="treated cells"):
        scad.setup_anndata(a, perturbation_key="perturbation", control="control", dose_key="dose")


def test_backed_data_refuses_copies_and_in_place_rewrites(sim, tmp_path):
    a = sim.sample(30, seed=11)
    scad.setup_anndata(a, perturbation_key="perturbation", control="control")
    backed = scad.read_h5ad(scad.write_h5ad(a, tmp_path / "b.h5ad"), backed=True)
    with pytest.raises(DataError, match="to_memory"):
        scad.write_h5ad(backed, tmp_path / "c.h5ad")
    with pytest.raises(DataError, match="copy=False"):
        scad.setup_anndata(backed, perturbation_key="perturbation", control="control", copy=True)
    assert backed.filename == tmp_path / "b.h5ad"  # still backed by its own file
    backed.file.close()


# --------------------------------------------------------------------------- doses, queries and failed fits, on a smaller simulator

TINY = {"hidden": [16], "decoder_hidden": [16]}


@pytest.fixture(scope="module")
def small_sim():
    return PerturbSeq(n_genes=30, seed=0)


@pytest.fixture(scope="module")
def dosed(small_sim):
    """Cells whose controls record a vehicle dose (0.1), and a model fitted on them with a dose."""
    a = small_sim.sample(200, seed=0)
    control = (a.obs["perturbation"].astype(str) == "control").to_numpy()
    a.obs["dose"] = np.where(control, 0.1, a.obs["dose"].to_numpy())
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"],
                       dose_key="dose")
    return a, scad.FCRModel(**TINY).fit(a, max_epochs=1, seed=0, verbose=False)


@pytest.fixture(scope="module")
def plain(small_sim):
    """Cells and a model without a dose."""
    a = small_sim.sample(150, seed=1)
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    return a, scad.FCRModel(**TINY).fit(a, max_epochs=1, seed=0, verbose=False)


def test_setup_takes_a_single_covariate_key_as_a_string(small_sim):
    a = small_sim.sample(40, seed=2)
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", covariate_keys="cell_type")
    assert scad.get_setup(a)["covariate_keys"] == ["cell_type"]


def test_setup_rejects_repeated_covariate_keys_and_an_empty_separator(small_sim):
    a = small_sim.sample(40, seed=2)
    with pytest.raises(DataError, match=r"covariate_keys names \['cell_type'\] more than once"):
        scad.setup_anndata(a, perturbation_key="perturbation", control="control",
                           covariate_keys=["cell_type", "cell_type"])
    with pytest.raises(DataError, match="sep="):
        scad.setup_anndata(a, perturbation_key="perturbation", control="control", sep="")
    assert "medcausal_setup" not in a.uns


def test_controls_get_the_largest_dose_whatever_vehicle_dose_they_record(dosed):
    a, model = dosed
    control = (a.obs["perturbation"].astype(str) == "control").to_numpy()
    assert model.setup["max_dose"] == 1.0
    cf = model.predict_counterfactual(a[control][:5], perturbation="P1")
    np.testing.assert_array_equal(cf.obs["dose"].to_numpy(float), 1.0)
    np.testing.assert_array_equal(cf.obs["factual_dose"].to_numpy(float), 0.1)


def test_counterfactual_obs_records_the_dose_exactly(dosed):
    a, model = dosed
    cf = model.predict_counterfactual(a[:5], perturbation="P1", dose=0.123)
    assert cf.obs["dose"].tolist() == [0.123] * 5
    treated = (a.obs["perturbation"].astype(str) != "control").to_numpy()
    labels = a.obs["perturbation"].astype(str)[treated][:8]
    same = model.predict_counterfactual(a[treated][:8], perturbation=labels)
    np.testing.assert_array_equal(same.obs["dose"].to_numpy(float), same.obs["factual_dose"].to_numpy(float))


def test_a_dose_for_a_model_without_one_is_refused(plain):
    a, model = plain
    with pytest.raises(InterventionError, match="no dose.*dose_key"):
        model.predict_counterfactual(a[:5], perturbation="P0", dose=5.0)


def test_perturbation_none_keeps_each_cells_own_treatment(plain):
    a, model = plain
    factual = a.obs["perturbation"].astype(str).to_numpy()[:6]
    cf = model.predict_counterfactual(a[:6], perturbation=None, covariates={"cell_type": "CT0"}, seed=2)
    np.testing.assert_array_equal(cf.obs["perturbation"].astype(str), factual)
    assert "perturbation" not in json.loads(cf.uns["medcausal"]["do"])
    explicit = model.predict_counterfactual(a[:6], perturbation=factual, covariates={"cell_type": "CT0"}, seed=2)
    assert (cf.X != explicit.X).nnz == 0


def test_a_per_cell_series_applies_by_cell_name_as_the_simulator_reads_it(small_sim, plain):
    """A Series of labels (or doses, covariates) is aligned to the cells by its index, as
    PerturbSeq.counterfactual aligns it: the same Series asks both for the same cells' query."""
    a, model = plain
    cells = a[:6]
    labels = pd.Series(["P0", "P1", "P2", "control", "P0", "P1"], index=cells.obs_names)[::-1]
    truth = small_sim.counterfactual(cells, do={"perturbation": labels}).obs["perturbation"].astype(str)
    cf = model.predict_counterfactual(cells, perturbation=labels, covariates={"cell_type": labels.map(
        lambda p: "CT1" if p == "P0" else "CT0")}, seed=2)
    np.testing.assert_array_equal(cf.obs["perturbation"].astype(str), truth)
    np.testing.assert_array_equal(cf.obs["perturbation"].astype(str), ["P0", "P1", "P2", "control", "P0", "P1"])
    np.testing.assert_array_equal(cf.obs["cell_type"].astype(str), ["CT1", "CT0", "CT0", "CT0", "CT1", "CT0"])
    by_position = model.predict_counterfactual(cells, perturbation=labels.loc[cells.obs_names].to_numpy(),
                                               covariates={"cell_type": np.array(["CT1", "CT0", "CT0", "CT0", "CT1",
                                                                                  "CT0"])}, seed=2)
    assert (cf.X != by_position.X).nnz == 0
    with pytest.raises(InterventionError, match=r"perturbation= is a pandas Series whose index does not match"):
        model.predict_counterfactual(cells, perturbation=pd.Series(list(labels), index=range(6)))


def test_queries_reject_non_integer_counts_by_layer(plain):
    a, model = plain
    b = a[:20].copy()
    b.layers["counts"] = b.layers["counts"].copy()
    b.layers["counts"].data = np.log1p(b.layers["counts"].data)
    with pytest.raises(DataError, match=r"layers\['counts'\] holds non-integer"):
        model.get_latent_representation(b)
    with pytest.raises(DataError, match=r"layers\['counts'\] holds non-integer"):
        model.predict_counterfactual(b, perturbation="P0")


@pytest.mark.parametrize("dense", [False, True])
def test_anndata_to_cohort_reads_a_backed_x(small_sim, tmp_path, dense):
    a = small_sim.sample(30, seed=3)
    a.X = a.layers["counts"].toarray() if dense else a.layers["counts"].copy()
    backed = scad.read_h5ad(scad.write_h5ad(a, tmp_path / "x.h5ad"), backed=True)
    try:
        got = scad.anndata_to_cohort(backed, layer=None, obs_keys=["perturbation"])
        np.testing.assert_array_equal(got.arrays["expression"], a.layers["counts"].toarray())
        np.testing.assert_array_equal(got.table["id"], a.obs_names)
    finally:
        backed.file.close()


def test_anndata_to_cohort_keeps_the_cohort_ids_when_obs_keys_leave_them_out():
    table = pd.DataFrame({"id": [10, 11, 12], "ct": ["A", "B", "A"]})
    cohort = mc.Cohort(table, {"expression": np.arange(6, dtype=np.float32).reshape(3, 2)})
    back = scad.anndata_to_cohort(scad.cohort_to_anndata(cohort), obs_keys=["ct"])
    pd.testing.assert_frame_equal(back.table, cohort.table)


def test_a_failed_fit_leaves_the_model_as_it_was(small_sim):
    a = small_sim.sample(120, seed=5)
    cell_type = a.obs["cell_type"].astype(str)
    # the 'val' rows hold a cell type the 'train' rows never show: the fit must fail
    a.obs["split"] = np.where(cell_type == cell_type.iloc[0], "val", "train")
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"],
                       split_key="split")
    fresh = scad.FCRModel(**TINY)
    with pytest.raises(DataError, match="'val' rows"):
        fresh.fit(a, max_epochs=1, seed=0, verbose=False)
    with pytest.raises(mc.errors.NotFittedError):  # it used to answer with random weights
        fresh.get_latent_representation(a)
    assert fresh.setup is None and fresh.fit_info == {}
    # a fitted model that fails a refit keeps its fit
    good = small_sim.sample(120, seed=6)
    scad.setup_anndata(good, perturbation_key="perturbation", control="control")
    model = scad.FCRModel(**TINY).fit(good, max_epochs=1, seed=0, verbose=False)
    before = model.get_latent_representation(good)
    module, info = model.module, dict(model.fit_info)
    with pytest.raises(DataError, match="'val' rows"):
        model.fit(a, max_epochs=1, seed=0, verbose=False)
    assert model.module is module and model.fit_info == info
    after = model.get_latent_representation(good)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_annotating_a_view_of_backed_data_is_refused_before_any_work(plain, tmp_path):
    a, model = plain
    backed = scad.read_h5ad(scad.write_h5ad(a, tmp_path / "p.h5ad"), backed=True)
    try:
        view = backed[:20]
        with pytest.raises(DataError, match="to_memory"):
            model.write_latents(view)
        with pytest.raises(DataError, match="to_memory"):
            scad.setup_anndata(view, perturbation_key="perturbation", control="control")
        model.write_latents(view.to_memory())  # the fix the message names works
    finally:
        backed.file.close()


def test_a_control_dose_written_as_text_na_is_ignored_as_documented():
    a = PerturbSeq(n_genes=20, seed=0).sample(120, seed=0)
    ctrl = (a.obs["perturbation"] == "control").to_numpy()
    a.obs["dose"] = np.where(ctrl, "NA", a.obs["dose"].astype(str))
    scad.setup_anndata(a, "perturbation", "control", dose_key="dose", covariate_keys=["cell_type"])
    model = scad.FCRModel(**TINY).fit(a, max_epochs=1, verbose=False)  # it raised a bare ValueError
    assert model.setup["max_dose"] == pd.to_numeric(a.obs["dose"], errors="coerce")[~ctrl].max()
    cf = model.predict_counterfactual(a[:5], perturbation="P0")
    assert cf.shape == (5, 20)


def test_anndata_to_cohort_keeps_the_barcodes_beside_an_obs_id_column():
    import anndata as ad

    a = ad.AnnData(np.ones((3, 2), np.float32), obs=pd.DataFrame({"id": ["donor1", "donor1", "donor2"]},
                                                                  index=["AAAC-1", "AAAG-1", "AACT-1"]))
    c = scad.anndata_to_cohort(a, layer=None)
    assert c.ids.tolist() == ["AAAC-1", "AAAG-1", "AACT-1"]
    assert c.table["id"].tolist() == ["donor1", "donor1", "donor2"]


def test_setup_names_an_empty_X():
    import anndata as ad

    b = ad.AnnData(obs=pd.DataFrame({"p": ["c", "A", "A"]}, index=list("xyz")), var=pd.DataFrame(index=["g1", "g2"]))
    b.layers["counts"] = np.ones((3, 2))
    with pytest.raises(DataError, match="adata.X"):
        scad.setup_anndata(b, "p", "c", layer=None)


def test_predicted_combinations_are_labelled_canonically(small_sim):
    a = small_sim.sample(100, seed=0)
    scad.setup_anndata(a, "perturbation", "control", covariate_keys=["cell_type"])
    model = scad.FCRModel(hidden=[8]).fit(a, max_epochs=1, verbose=False)
    cf = model.predict_counterfactual(a[:4], perturbation="P1 + P0")
    assert cf.obs["perturbation"].astype(str).unique().tolist() == ["P0+P1"]


def test_a_cells_counterfactual_counts_do_not_depend_on_the_batch_or_subset(small_sim):
    a = small_sim.sample(150, seed=0)
    scad.setup_anndata(a, "perturbation", "control", covariate_keys=["cell_type"])
    model = scad.FCRModel(**TINY).fit(a, max_epochs=1, verbose=False)
    full = model.predict_counterfactual(a, perturbation="P1", seed=0, batch_size=64)
    part = model.predict_counterfactual(a[40:70], perturbation="P1", seed=0, batch_size=7)
    assert (full.X[40:70] != part.X).nnz == 0
