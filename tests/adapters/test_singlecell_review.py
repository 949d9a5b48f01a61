"""Review of the AnnData adapter: setup validation, dose handling, query validation, Cohort conversion."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import medcausal as mc
from medcausal.adapters import singlecell as scad
from medcausal.errors import DataError, InterventionError
from medcausal.synthetic.perturbseq import PerturbSeq

SMALL = {"hidden": [16], "decoder_hidden": [16]}


@pytest.fixture(scope="module")
def sim():
    return PerturbSeq(n_genes=30, seed=0)


@pytest.fixture(scope="module")
def dosed(sim):
    """Cells whose controls record a vehicle dose (0.1), and a model fitted on them with a dose."""
    a = sim.sample(200, seed=0)
    control = (a.obs["perturbation"].astype(str) == "control").to_numpy()
    a.obs["dose"] = np.where(control, 0.1, a.obs["dose"].to_numpy())
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"],
                       dose_key="dose")
    return a, scad.FCRModel(**SMALL).fit(a, max_epochs=1, seed=0, verbose=False)


@pytest.fixture(scope="module")
def plain(sim):
    """Cells and a model without a dose."""
    a = sim.sample(150, seed=1)
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    return a, scad.FCRModel(**SMALL).fit(a, max_epochs=1, seed=0, verbose=False)


# --------------------------------------------------------------------------- setup_anndata
def test_setup_takes_a_single_covariate_key_as_a_string(sim):
    a = sim.sample(40, seed=2)
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", covariate_keys="cell_type")
    assert scad.get_setup(a)["covariate_keys"] == ["cell_type"]


def test_setup_rejects_repeated_covariate_keys_and_an_empty_separator(sim):
    a = sim.sample(40, seed=2)
    with pytest.raises(DataError, match=r"covariate_keys names \['cell_type'\] more than once"):
        scad.setup_anndata(a, perturbation_key="perturbation", control="control",
                           covariate_keys=["cell_type", "cell_type"])
    with pytest.raises(DataError, match="sep="):
        scad.setup_anndata(a, perturbation_key="perturbation", control="control", sep="")
    assert "medcausal_setup" not in a.uns


# --------------------------------------------------------------------------- doses
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


# --------------------------------------------------------------------------- queries
def test_perturbation_none_keeps_each_cells_own_treatment(plain):
    a, model = plain
    factual = a.obs["perturbation"].astype(str).to_numpy()[:6]
    cf = model.predict_counterfactual(a[:6], perturbation=None, covariates={"cell_type": "CT0"}, seed=2)
    np.testing.assert_array_equal(cf.obs["perturbation"].astype(str), factual)
    assert "perturbation" not in json.loads(cf.uns["medcausal"]["do"])
    explicit = model.predict_counterfactual(a[:6], perturbation=factual, covariates={"cell_type": "CT0"}, seed=2)
    assert (cf.X != explicit.X).nnz == 0


def test_a_per_cell_series_applies_by_cell_name_as_the_simulator_reads_it(sim, plain):
    """A Series of labels (or doses, covariates) is aligned to the cells by its index, as
    PerturbSeq.counterfactual aligns it: the same Series asks both for the same cells' query."""
    a, model = plain
    cells = a[:6]
    labels = pd.Series(["P0", "P1", "P2", "control", "P0", "P1"], index=cells.obs_names)[::-1]
    truth = sim.counterfactual(cells, do={"perturbation": labels}).obs["perturbation"].astype(str)
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


# --------------------------------------------------------------------------- Cohort <-> AnnData
@pytest.mark.parametrize("dense", [False, True])
def test_anndata_to_cohort_reads_a_backed_x(sim, tmp_path, dense):
    a = sim.sample(30, seed=3)
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


# --------------------------------------------------------------------------- session-14 review
def test_a_failed_fit_leaves_the_model_as_it_was(sim):
    a = sim.sample(120, seed=5)
    cell_type = a.obs["cell_type"].astype(str)
    # the 'val' rows hold a cell type the 'train' rows never show: the fit must fail
    a.obs["split"] = np.where(cell_type == cell_type.iloc[0], "val", "train")
    scad.setup_anndata(a, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"],
                       split_key="split")
    fresh = scad.FCRModel(**SMALL)
    with pytest.raises(DataError, match="'val' rows"):
        fresh.fit(a, max_epochs=1, seed=0, verbose=False)
    with pytest.raises(mc.errors.NotFittedError):  # it used to answer with random weights
        fresh.get_latent_representation(a)
    assert fresh.setup is None and fresh.fit_info == {}
    # a fitted model that fails a refit keeps its fit
    good = sim.sample(120, seed=6)
    scad.setup_anndata(good, perturbation_key="perturbation", control="control")
    model = scad.FCRModel(**SMALL).fit(good, max_epochs=1, seed=0, verbose=False)
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


# ---- session 16 review -------------------------------------------------------------------


def test_a_control_dose_written_as_text_na_is_ignored_as_documented():
    a = PerturbSeq(n_genes=20, seed=0).sample(120, seed=0)
    ctrl = (a.obs["perturbation"] == "control").to_numpy()
    a.obs["dose"] = np.where(ctrl, "NA", a.obs["dose"].astype(str))
    scad.setup_anndata(a, "perturbation", "control", dose_key="dose", covariate_keys=["cell_type"])
    model = scad.FCRModel(**SMALL).fit(a, max_epochs=1, verbose=False)  # it raised a bare ValueError
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


def test_predicted_combinations_are_labelled_canonically(sim):
    a = sim.sample(100, seed=0)
    scad.setup_anndata(a, "perturbation", "control", covariate_keys=["cell_type"])
    model = scad.FCRModel(hidden=[8]).fit(a, max_epochs=1, verbose=False)
    cf = model.predict_counterfactual(a[:4], perturbation="P1 + P0")
    assert cf.obs["perturbation"].astype(str).unique().tolist() == ["P0+P1"]


def test_top_degs_warns_about_a_context_without_reference_cells():
    import anndata as ad

    from medcausal.metrics.singlecell import top_degs

    rng = np.random.default_rng(0)
    c = rng.poisson(5, (80, 10)).astype(np.float32)
    obs = pd.DataFrame({"p": ["ctrl"] * 20 + ["A"] * 60, "ct": ["T"] * 40 + ["B"] * 40},
                       index=[f"c{i}" for i in range(80)])
    with pytest.warns(UserWarning, match="'B', 'A'"):
        degs = top_degs(ad.AnnData(c, obs=obs), "p", "ctrl", n_genes=3, context_key="ct", layer=None)
    assert list(degs) == [("T", "A")]


def test_a_cells_counterfactual_counts_do_not_depend_on_the_batch_or_subset(sim):
    a = sim.sample(150, seed=0)
    scad.setup_anndata(a, "perturbation", "control", covariate_keys=["cell_type"])
    model = scad.FCRModel(**SMALL).fit(a, max_epochs=1, verbose=False)
    full = model.predict_counterfactual(a, perturbation="P1", seed=0, batch_size=64)
    part = model.predict_counterfactual(a[40:70], perturbation="P1", seed=0, batch_size=7)
    assert (full.X[40:70] != part.X).nnz == 0
