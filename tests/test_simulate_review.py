"""Review regressions for medcausal.simulate: resume checks, seeds, ignored options, containers."""

import importlib

import numpy as np
import pandas as pd
import pytest

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

