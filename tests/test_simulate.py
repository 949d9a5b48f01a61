"""Patient simulation, counterfactual twins, augmentation and its evaluation.

Ground truth is the linear-Gaussian SCM of conftest.py:
x ~ N(0,1); s ~ Bernoulli(0.4); y = 2x + s + u, u ~ N(0, 0.5^2); P(stage=high | y) = sigmoid(y - 1).
``fitted`` is a small flow model of it (60 epochs, 3000 rows), so tolerances below cover
its estimation error as well as Monte Carlo error (seeds fixed).
"""

import argparse
import importlib
import json
import tracemalloc

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

import medcausal as mc
from medcausal.errors import DataError, InterventionError, MedCausalError
from conftest import linear_gaussian

S = importlib.import_module("medcausal.simulate")  # the module, even once mc.simulate is the function


# --------------------------------------------------------------------------- simulate
def test_simulate_unconditional_and_provenance(fitted):
    df = S.simulate(fitted, 2000, seed=3, chunk_size=700)
    assert len(df) == 2000 and df.index.tolist() == list(range(2000)) and df.index.name == "id"
    assert list(df.columns) == ["x", "s", "y", "stage", *S.PROVENANCE_COLUMNS]
    assert df["synthetic"].all() and (df["synth_model"] == S.model_id(fitted)).all()
    assert (df["synth_seed"] == 3).all() and df["synth_do"].isna().all() and df["synth_epsilon"].isna().all()
    again = S.simulate(fitted, 2000, seed=3, chunk_size=700)
    pd.testing.assert_frame_equal(df, again)
    assert not S.simulate(fitted, 2000, seed=4, chunk_size=700)["y"].equals(df["y"])
    drawn = S.simulate(fitted, 10, seed=None)
    assert drawn.attrs["medcausal"]["seed"] == drawn["synth_seed"].iloc[0] >= 0
    # analytic moments: E[y] = 0.4, sd(y) = sqrt(4 + 0.24 + 0.25)
    big = S.simulate(fitted, 20000, seed=0, provenance=False)
    assert list(big.columns) == ["x", "s", "y", "stage"]
    assert abs(big["y"].mean() - 0.4) < 0.08 and abs(big["y"].std() - np.sqrt(4.49)) < 0.1


def test_counterfactuals_of_simulated_rows_carry_their_own_provenance(fitted):
    made = S.simulate(fitted, 6, do={"s": 0}, seed=3)
    cf = fitted.counterfactual(made, do={"s": 1}, seed=5)
    assert list(cf.columns) == list(made.columns) and (cf["s"] == 1).all()
    assert (cf["synth_strategy"] == "counterfactual").all() and (cf["synth_do"] == '{"s": 1}').all()
    assert (cf["synth_seed"] == 5).all() and cf["synth_where"].isna().all() and cf["synth_epsilon"].isna().all()
    assert cf["synth_source"].tolist() == made.index.tolist() and (cf["synth_model"] == S.model_id(fitted)).all()
    assert (made["synth_do"] == '{"s": 0}').all() and (made["synth_strategy"] == "simulate").all()  # untouched
    assert fitted.counterfactual(made, do={"s": 1})["synth_seed"].isna().all()  # no seed asked: none claimed
    real = made.assign(synthetic=False)  # e.g. an augmented table's real rows: their counterfactuals are not real
    assert fitted.counterfactual(real, do={"s": 1}, seed=5)["synthetic"].all()
    # a table that tracks only some of the columns keeps tracking those; one that tracks none gains none
    part = fitted.counterfactual(made[["x", "s", "y", "stage", "synth_do"]], do={"s": 1}, seed=5)
    assert list(part.columns) == ["x", "s", "y", "stage", "synth_do"] and (part["synth_do"] == '{"s": 1}').all()
    assert list(fitted.counterfactual(made[["x", "s", "y", "stage"]], do={"s": 1}).columns) == ["x", "s", "y", "stage"]


def test_where_on_discrete_root_is_exact(fitted):
    df = S.simulate(fitted, 20000, where="s == 1", seed=0)
    info = df.attrs["medcausal"]
    assert info["method"] == "exact-roots" and (df["s"] == 1).all()
    assert abs(info["subgroup_probability"] - 0.4) < 0.03  # the model's own P(s=1); truth 0.4
    # y | s=1 = 2x + 1 + u  ->  mean 1, sd sqrt(4.25)
    assert abs(df["y"].mean() - 1.0) < 0.08 and abs(df["y"].std() - np.sqrt(4.25)) < 0.1
    assert df["synth_where"].iloc[0] == "s == 1" and df["synth_do"].isna().all()
    assert (S.simulate(fitted, 50, where="s in [0]", seed=0)["s"] == 0).all()


def test_where_on_continuous_root_rejects_roots_only(fitted):
    df = S.simulate(fitted, 5000, where="x > 1", seed=0)
    info = df.attrs["medcausal"]
    assert info["method"] == "root-rejection" and (df["x"] > 1).all()
    assert abs(info["acceptance_rate"] - norm.sf(1)) < 0.02  # P(x > 1) = 0.1587
    mean_x = norm.pdf(1) / norm.sf(1)  # E[x | x > 1] = 1.525
    assert abs(df["x"].mean() - mean_x) < 0.05
    assert abs(df["y"].mean() - (2 * mean_x + 0.4)) < 0.12
    mixed = S.simulate(fitted, 500, where="x > 0 and s == 0", seed=1)
    assert mixed.attrs["medcausal"]["method"] == "root-rejection"
    assert ((mixed["x"] > 0) & (mixed["s"] == 0)).all()


def test_where_on_descendant_uses_rejection(fitted):
    # The acceptance rate estimates the model's own P(stage = high): against a 200k-draw
    # reference, within 4 binomial sd of ~7,500 draws (0.023). Against the true SCM the
    # model's fit error adds (3,000 rows, 60 epochs; the sample itself is 0.013 off): 0.05.
    p_model = float((fitted.sample(200_000, seed=123)["stage"] == "high").mean())
    p_true = float((linear_gaussian(400_000, seed=9)[0]["stage"] == "high").mean())
    df = S.simulate(fitted, 3000, where="stage == 'high'", seed=0)
    info = df.attrs["medcausal"]
    assert info["method"] == "rejection" and (df["stage"] == "high").all()
    assert abs(info["acceptance_rate"] - p_model) < 0.023
    assert abs(info["acceptance_rate"] - p_true) < 0.05
    assert info["drawn"] >= 3000 / p_model * 0.9 and info["accepted"] >= 3000


def test_where_is_evaluated_in_the_intervened_world(fitted):
    df = S.simulate(fitted, 3000, do={"x": 1.0}, where="y > 2.4", seed=0)
    assert (df["x"] == 1.0).all() and (df["y"] > 2.4).all()
    # P(y > 2.4 | do(x=1)) = 0.6 P(u > 0.4) + 0.4 P(u > -0.6), u ~ N(0, 0.5^2)
    p = 0.6 * norm.sf(0.8) + 0.4 * norm.cdf(1.2)
    assert abs(df.attrs["medcausal"]["acceptance_rate"] - p) < 0.04
    assert df["synth_do"].iloc[0] == '{"x": 1.0}'
    # a condition on an intervened root is also decided in that world
    assert S.simulate(fitted, 20, do={"x": 2.0}, where="x > 1", seed=0).attrs["medcausal"]["method"] == "rejection"


def test_simulate_bad_input(fitted):
    for n in (0, -3, 2.5, True, "10"):
        with pytest.raises(DataError, match="n must be a positive integer"):
            S.simulate(fitted, n)
    with pytest.raises(InterventionError, match="'age'"):
        S.simulate(fitted, 10, do={"age": 3})
    with pytest.raises(DataError, match=r"unknown variable\(s\) 'xx' \(did you mean 'x'\?\)"):
        S.simulate(fitted, 10, where="xx > 1")
    with pytest.raises(DataError, match="'stage' is categorical and takes only \\['high', 'low'\\], not 'medium'"):
        S.simulate(fitted, 10, where="stage == 'medium'")
    with pytest.raises(DataError, match="'s' is binary"):
        S.simulate(fitted, 10, where="s == 2 and x > 0")
    with pytest.raises(DataError, match="'s' is binary"):
        S.simulate(fitted, 10, where="s in ['F', 'M']")
    with pytest.raises(DataError, match="zero support"):
        S.simulate(fitted, 10, where="x > 50")
    with pytest.raises(DataError, match="zero support"):
        S.simulate(fitted, 10, where="y > 1000")
    with pytest.raises(mc.errors.LowAcceptanceError, match="acceptance rate .* below min_acceptance=0.05"):
        S.simulate(fitted, 10, where="stage == 'high' and y > 5.5", min_acceptance=0.05)
    with pytest.raises(DataError, match="not a valid condition"):
        S.simulate(fitted, 10, where="x >")
    with pytest.raises(DataError, match="is not a condition"):
        S.simulate(fitted, 10, where="x + 1")
    with pytest.raises(DataError, match="reads no variable"):
        S.simulate(fitted, 10, where="1 == 1")
    with pytest.raises(DataError, match="local variables"):
        S.simulate(fitted, 10, where="x > @t")
    with pytest.raises(InterventionError, match="per-row do= arrays"):
        S.simulate(fitted, 10, do={"x": np.zeros(10)}, where="y > 0")
    with pytest.raises(InterventionError, match="3 values for n=10"):
        S.simulate(fitted, 10, do={"x": np.zeros(3)})


def test_per_row_do_arrays_are_split_across_chunks(fitted):
    arr = np.linspace(-1, 1, 250)
    df = S.simulate(fitted, 250, do={"x": arr}, seed=0, chunk_size=100)
    np.testing.assert_allclose(df["x"], arr)
    cond = S.simulate(fitted, 250, do={"x": arr}, where="s == 1", seed=0, chunk_size=100)
    np.testing.assert_allclose(cond["x"], arr)
    assert (cond["s"] == 1).all()


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_stream_to_folder_matches_in_memory(fitted, tmp_path, fmt):
    mem = S.simulate(fitted, 1050, where="s == 1", seed=5, chunk_size=300)
    run = S.simulate(fitted, 1050, where="s == 1", seed=5, chunk_size=300, out=tmp_path / "run", format=fmt)
    assert run.parts == [f"part-0000{i}.{fmt}" for i in range(4)]
    assert (tmp_path / "run" / S.MARKER).is_file()
    info = json.loads((tmp_path / "run" / S.SIDECAR).read_text())
    assert info["status"] == "complete" and info["n"] == 1050 and info["method"] == "exact-roots"
    assert [p["rows"] for p in info["parts"]] == [300, 300, 300, 150]
    back = S.read_run(tmp_path / "run")
    assert back.index.tolist() == mem.index.tolist()
    pd.testing.assert_frame_equal(back[["x", "s", "y"]], mem[["x", "s", "y"]], check_dtype=False,
                                  check_index_type=False)
    assert (back["stage"].astype(str) == mem["stage"].astype(str)).all() and back["synthetic"].all()
    # an existing folder is never silently replaced
    with pytest.raises(MedCausalError, match="already exists"):
        S.simulate(fitted, 10, seed=0, out=tmp_path / "run", format=fmt)
    S.simulate(fitted, 10, seed=0, out=tmp_path / "run", format=fmt, overwrite=True)
    assert len(S.read_run(tmp_path / "run")) == 10 and not (tmp_path / "run" / f"part-00003.{fmt}").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(MedCausalError, match="notes.txt"):
        S.simulate(fitted, 10, seed=0, out=tmp_path / "mine", format=fmt, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_interrupted_run_leaves_complete_parts_and_resumes(fitted, tmp_path, monkeypatch):
    calls = {"n": 0}
    draw = S._simulate_chunk

    def chunk(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while chunk 3 was drawn
        return draw(*args, **kw)

    monkeypatch.setattr(S, "_simulate_chunk", chunk)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        S.simulate(fitted, 500, do={"x": 0.5}, seed=1, chunk_size=100, out=out, format="csv")
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.csv", "part-00001.csv", S.SIDECAR]
    with pytest.raises(DataError, match="incomplete .* 2 of 5 parts"):
        S.read_run(out)
    assert len(S.read_run(out, allow_incomplete=True)) == 200
    with pytest.raises(MedCausalError, match="differs in \\['n'\\]"):
        S.simulate(fitted, 600, do={"x": 0.5}, seed=1, chunk_size=100, out=out, format="csv", resume=True)
    with pytest.raises(InterventionError, match="callable cannot be verified"):
        S.simulate(fitted, 500, do={"x": lambda x: 0.5 * x}, seed=1, chunk_size=100, out=out, format="csv",
                   resume=True)
    run = S.simulate(fitted, 500, do={"x": 0.5}, seed=1, chunk_size=100, out=out, format="csv", resume=True)
    assert calls["n"] == 6  # only chunks 2, 3, 4 were drawn again
    whole = S.simulate(fitted, 500, do={"x": 0.5}, seed=1, chunk_size=100)
    np.testing.assert_allclose(run.read()["y"].to_numpy(), whole["y"].to_numpy(), rtol=1e-12)


def interrupted(model, out, monkeypatch, at=1, **kw):
    """Start a streamed run and stop it (Ctrl-C) before chunk ``at`` is written."""
    write = S._write_part

    def stop(path, i, *a, **k):
        if i == at:
            raise KeyboardInterrupt
        return write(path, i, *a, **k)

    monkeypatch.setattr(S, "_write_part", stop)
    with pytest.raises(KeyboardInterrupt):
        S.simulate(model, out=out, **kw)
    monkeypatch.setattr(S, "_write_part", write)


def test_a_resumed_rejection_run_equals_the_uninterrupted_one(fitted, tmp_path, monkeypatch):
    # rejection batches were sized by the acceptance rate counted over earlier chunks, which a
    # resumed process (holding only the pilot's count) did not have: its later chunks differed
    kw = dict(where="y > 1", seed=7, chunk_size=700, format="csv", progress=False)
    whole = S.simulate(fitted, 2100, out=tmp_path / "a", **kw)
    interrupted(fitted, tmp_path / "b", monkeypatch, at=2, n=2100, **kw)
    resumed = S.simulate(fitted, 2100, out=tmp_path / "b", resume=True, **kw)
    assert resumed.info["method"] == whole.info["method"] == "rejection"
    pd.testing.assert_frame_equal(resumed.read(), whole.read())


def test_streaming_memory_is_flat_in_n(fitted, tmp_path):
    def peak(n, name):
        tracemalloc.start()
        S.simulate(fitted, n, seed=0, chunk_size=2000, out=tmp_path / name, format="csv", provenance=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(4000, "a"), peak(30000, "b")
    in_memory_rows = 30000 * 4 * 8  # what holding the large result's four columns alone would take
    assert large < 1.5 * small and large - small < in_memory_rows / 2, (small, large)


# --------------------------------------------------------------------------- counterfactual twins
def test_counterfactual_patients_wide_matches_ground_truth(fitted):
    test, u = linear_gaussian(400, seed=21)
    twins = S.counterfactual_patients(fitted, test, do={"lo": {"x": -1.0}, "hi": {"x": 1.0}})
    assert list(twins.columns[:5]) == ["patient_id", "x", "s", "y", "stage"]
    assert twins["patient_id"].tolist() == list(range(400))
    for w, value in (("lo", -1.0), ("hi", 1.0)):
        assert (twins[f"x@{w}"] == value).all() and f"s@{w}" not in twins  # s is not a descendant of x
        true_y = 2 * value + test["s"] + u
        assert np.mean((twins[f"y@{w}"] - true_y) ** 2) < 0.02
        np.testing.assert_allclose(twins[f"effect:y@{w}"], twins[f"y@{w}"] - twins["y"])
        assert np.mean((twins[f"effect:y@{w}"] - 2 * (value - test["x"])) ** 2) < 0.02
        assert f"stage@{w}" in twins and f"effect:stage@{w}" not in twins  # categorical: no difference
        assert f"effect:x@{w}" not in twins
    twins2 = S.counterfactual_patients(fitted, test, do={"lo": {"x": -1.0}, "hi": {"x": 1.0}},
                                       outcomes=["x", "y"])
    np.testing.assert_allclose(twins2["effect:x@hi"], 1.0 - test["x"])


def test_counterfactual_patients_long_ids_and_lists(fitted):
    test, _ = linear_gaussian(30, seed=2)
    test.index = pd.Index([f"p{i}" for i in range(30)], name="mrn")
    long = S.counterfactual_patients(fitted, test, do=[{"x": 0.0}, {"s": 1}], layout="long")
    assert len(long) == 90 and list(long.columns[:2]) == ["mrn", "world"]
    assert long["world"].unique().tolist() == ["factual", "x=0.0", "s=1"]
    fact = long[long["world"] == "factual"]
    pd.testing.assert_frame_equal(fact[["x", "s", "y"]].reset_index(drop=True),
                                  test[["x", "s", "y"]].reset_index(drop=True))
    assert fact["effect:y"].isna().all()
    ws = long[long["world"] == "s=1"]
    assert (ws["s"] == 1).all() and (ws["mrn"].to_numpy() == test.index.to_numpy()).all()
    # for patients already at s=1 the counterfactual equals the factual
    np.testing.assert_allclose(ws["effect:y"].to_numpy()[test["s"].to_numpy() == 1], 0.0, atol=1e-4)
    table = test.reset_index()
    by_col = S.counterfactual_patients(fitted, table, do={"x": 0.0}, id_column="mrn")
    assert by_col["mrn"].tolist() == table["mrn"].tolist() and "x=0.0" in by_col.columns[-1]


def test_counterfactual_patients_bad_input(fitted):
    test, _ = linear_gaussian(5, seed=2)
    with pytest.raises(InterventionError, match="'dose'"):
        S.counterfactual_patients(fitted, test, do={"a": {"x": 1.0}, "b": {"dose": 1.0}})
    with pytest.raises(InterventionError, match="'factual'"):
        S.counterfactual_patients(fitted, test, do={"factual": {"x": 1.0}})
    with pytest.raises(InterventionError, match="at least one world"):
        S.counterfactual_patients(fitted, test, do={})
    with pytest.raises(InterventionError, match="mixes worlds"):
        S.counterfactual_patients(fitted, test, do={"a": {"x": 1.0}, "x": 2.0})
    with pytest.raises(DataError, match="not unique"):
        S.counterfactual_patients(fitted, test.iloc[[0, 0, 1]], do={"x": 1.0})
    with pytest.raises(DataError, match="not scalar"):
        S.counterfactual_patients(fitted, test, do={"x": 1.0}, outcomes=["stage"])
    with pytest.raises(DataError, match="id_column='nope'"):
        S.counterfactual_patients(fitted, test, do={"x": 1.0}, id_column="nope")


def test_cohort_in_cohort_out(lg_graph, lg_data, tmp_path):
    df = lg_data[0].iloc[:400]
    model = mc.CausalModel(lg_graph).fit(mc.Cohort(df), max_epochs=2, verbose=False)
    c = S.simulate(model, 120, where="s == 0", seed=0, chunk_size=50)
    assert isinstance(c, mc.Cohort) and c.ids.tolist() == list(range(120)) and c.table["synthetic"].all()
    run = S.simulate(model, 120, seed=0, chunk_size=50, out=tmp_path / "c", format="csv")
    assert len(run.read()) == 120
    twins = S.counterfactual_patients(model, mc.Cohort(df.iloc[:10]), do={"t": {"s": 1}})
    assert isinstance(twins, mc.Cohort) and "y@t" in twins.table and twins.id_column == "id"


# --------------------------------------------------------------------------- augment
def _scarce(lg_data, keep=60):
    df = lg_data[0]
    return pd.concat([df[df["s"] == 0], df[df["s"] == 1].iloc[:keep]]).reset_index(drop=True)


def test_augment_by_sampling(fitted, lg_data, monkeypatch):
    real = _scarce(lg_data)
    aug = S.augment(fitted, real, target="s == 1", n=560, strategy="sample", seed=0)
    syn = aug[aug["synthetic"]]
    assert len(syn) == 500 and (syn["s"] == 1).all() and int((aug["s"] == 1).sum()) == 560
    pd.testing.assert_frame_equal(aug.iloc[:len(real)][list(real.columns)], real)
    assert not aug.iloc[:len(real)]["synthetic"].any() and aug.iloc[:len(real)]["synth_model"].isna().all()
    assert syn.index.tolist() == list(range(len(real), len(real) + 500))
    assert (syn["synth_strategy"] == "sample").all() and (syn["synth_model"] == S.model_id(fitted)).all()
    assert (syn["synth_where"] == "s == 1").all() and syn["synth_epsilon"].isna().all()
    assert abs(syn["y"].mean() - 1.0) < 0.25  # E[y | s=1] = 1
    assert aug.attrs["medcausal"]["groups"][0]["sample"]["method"] == "exact-roots"
    monkeypatch.setattr(fitted, "privacy", {"epsilon": 3.0, "delta": 1e-5, "privacy_unit": "patient"})
    aug = S.augment(fitted, real, target="s == 1", n=70, seed=0)
    assert (aug.loc[aug["synthetic"], "synth_epsilon"] == 3.0).all()


def test_augment_by_counterfactual_transport(fitted, lg_data):
    real = _scarce(lg_data)
    aug = S.augment(fitted, real, target="s == 1", n=560, strategy="transport", seed=0)
    syn = aug[aug["synthetic"]]
    assert len(syn) == 500 and (syn["s"] == 1).all() and (syn["synth_do"] == '{"s": 1}').all()
    src = real.loc[syn["synth_source"].astype(int).to_numpy()]
    assert (src["s"] == 0).all() and src.index.is_unique  # real controls, each used once
    np.testing.assert_allclose(syn["x"].to_numpy(), src["x"].to_numpy())  # x is not a descendant of s
    # the true counterfactual of y = 2x + s + u under do(s=1) from s=0 is y + 1
    assert np.mean(np.abs(syn["y"].to_numpy() - (src["y"].to_numpy() + 1.0))) < 0.1
    info = aug.attrs["medcausal"]["groups"][0]["transport"]
    assert info["acceptance_rate"] == 1.0 and not info["reused_patients"]
    mixed = S.augment(fitted, real, target="s == 1", n=160, strategy="mixed", seed=0)
    assert mixed["synth_strategy"].value_counts().to_dict() == {"sample": 50, "transport": 50}
    # a condition beyond the intervention keeps only transported patients that meet it
    sub = S.augment(fitted, real, target="s == 1 and y > 2", n=300, strategy="transport", seed=0)
    moved = sub[sub["synthetic"]]
    assert ((moved["s"] == 1) & (moved["y"] > 2)).all()
    assert sub.attrs["medcausal"]["groups"][0]["transport"]["acceptance_rate"] < 0.5


def test_augment_provenance_keeps_exact_integers_through_parquet(fitted, lg_data, tmp_path):
    # real rows have no seed or source (None): the columns must stay integers, not float64
    real = _scarce(lg_data)
    aug = S.augment(fitted, real, target="s == 1", n=160, strategy="mixed", seed=2**61 + 1)
    aug.to_parquet(tmp_path / "aug.parquet")
    back = pd.read_parquet(tmp_path / "aug.parquet")
    syn = back[back["synthetic"]]
    assert str(syn["synth_seed"].dtype) == "Int64" and back.loc[~back["synthetic"], "synth_seed"].isna().all()
    assert syn["synth_seed"].tolist() == aug.loc[aug["synthetic"], "synth_seed"].tolist()
    assert syn["synth_seed"].max() > 2**53  # beyond float64's integers: exact only as Int64
    moved = syn["synth_source"].dropna()
    assert len(moved) == 50 and set(moved) <= set(real.index)


def test_augment_rebalance_and_errors(fitted, lg_data):
    real = lg_data[0].iloc[:600]
    counts = real["stage"].value_counts()
    aug = S.augment(fitted, real, target="stage", strategy="transport", seed=0)
    assert aug["stage"].value_counts().to_dict() == {"high": counts.max(), "low": counts.max()}
    assert aug.attrs["medcausal"]["mode"] == "rebalance"
    with pytest.raises(DataError, match="n must be a positive integer"):
        S.augment(fitted, real, target="s == 1", n=0)
    with pytest.raises(DataError, match="needs n="):
        S.augment(fitted, real, target="s == 1")
    with pytest.raises(MedCausalError, match="pass do= explicitly"):
        S.augment(fitted, real, target="y > 3", n=700, strategy="transport")
    with pytest.raises(DataError, match="'sex'"):
        S.augment(fitted, real, target="sex == 1", n=700)
    with pytest.raises(MedCausalError, match="strategy must be"):
        S.augment(fitted, real, target="s == 1", n=700, strategy="smote")
    with pytest.raises(DataError, match="missing column"):
        S.augment(fitted, real.drop(columns=["y"]), target="s == 1", n=700)
    with pytest.raises(InterventionError, match="cannot be combined with rebalancing"):
        S.augment(fitted, real, target="stage", do={"y": 1.0})
    moved = S.augment(fitted, real, target="y > 3", n=200, strategy="transport", do={"x": 2.0}, seed=0)
    assert (moved.loc[moved["synthetic"], "x"] == 2.0).all()
    # augmenting an augmented cohort keeps the old flags and transports real patients only
    again = S.augment(fitted, moved, target="y > 3", n=260, strategy="transport", do={"x": 2.5}, seed=1)
    new = again.iloc[len(moved):]
    assert len(new) == 60 and new["synthetic"].all() and again.iloc[:len(moved)]["synthetic"].equals(moved["synthetic"])
    assert not moved.loc[new["synth_source"].to_numpy(), "synthetic"].any()


def test_model_id_survives_save_and_load(fitted, tmp_path):
    loaded = mc.CausalModel.load(fitted.save(tmp_path / "m.mcm"))
    assert S.model_id(loaded) == S.model_id(fitted)
    other = mc.CausalModel(fitted.graph).fit(linear_gaussian(300, seed=1)[0], max_epochs=1, verbose=False)
    assert S.model_id(other) != S.model_id(fitted)


# --------------------------------------------------------------------------- evaluate_augmentation
def _interaction_cohort(n, seed, frac_g=0.5):
    """y depends on x1 in group g=0 and on x2 in group g=1 (so pooled models fail on a scarce group)."""
    rng = np.random.default_rng(seed)
    g = (rng.random(n) < frac_g).astype(int)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    y = (x1 * (1 - g) + x2 * g + 0.5 * rng.normal(size=n) > 0).astype(int)
    return pd.DataFrame({"g": g, "x1": x1, "x2": x2, "x1g": x1 * g, "x2g": x2 * g, "y": y})


def test_evaluate_augmentation_gain_with_oracle_synthetic_data():
    train = _interaction_cohort(1000, 0, frac_g=0.008)  # ~8 rows of the scarce group
    test = _interaction_cohort(2000, 1)
    oracle = _interaction_cohort(600, 2, frac_g=1.0)     # synthetic rows from the true SCM
    res = S.evaluate_augmentation(train, test, "y", synthetic=oracle, subgroups={"scarce": "g == 1"},
                                  n_boot=300, seed=0)
    r = res.set_index(["subgroup", "condition"])
    assert r.loc[("scarce", "real+synthetic"), "gain_low"] > 0.02
    assert r.loc[("scarce", "real+synthetic"), "score"] > 0.9
    assert r.loc[("scarce", "real"), "gain"] == 0 and r.loc[("scarce", "real"), "gain_high"] == 0
    assert r.loc[("scarce", "real"), "n_train_subgroup"] == int(train["g"].sum())
    assert r.loc[("scarce", "synthetic"), "n_train_real"] == 0
    assert r.loc[("all", "real"), "n_test"] == 2000


def test_evaluate_augmentation_scores_match_sklearn_and_null_synthetic():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = _interaction_cohort(800, 3, 0.3), _interaction_cohort(800, 4, 0.3)
    noise = _interaction_cohort(800, 5, 0.3)
    noise["y"] = 1 - noise["y"]  # a wrong synthetic mechanism
    aug = pd.concat([train.assign(synthetic=False), noise.assign(synthetic=True)], ignore_index=True)
    feats = ["x1", "x2", "g"]
    res = S.evaluate_augmentation(aug, test, "y", features=feats, n_boot=400, seed=1)
    r = res.set_index("condition")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train[feats], train["y"])
    expect = roc_auc_score(test["y"], clf.predict_proba(test[feats])[:, 1])
    assert r.loc["real", "score"] == pytest.approx(expect, abs=1e-9)
    # synthetic data with the mechanism inverted teach the inverse rule: AUC well below 0.5
    assert r.loc["synthetic", "score_high"] < 0.5 and r.loc["synthetic", "gain_high"] < -0.3
    assert r.loc["real+synthetic", "n_train_synthetic"] == 800 and r.loc["real", "n_train_real"] == 800


def test_bootstrap_metrics_match_sklearn():
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) + 0.3 * y, 1)  # many ties
    boots = rng.integers(0, 300, size=(5, 300))
    got = S._boot_scores("roc_auc", None, y, p, boots)
    np.testing.assert_allclose(got, [skm.roc_auc_score(y[b], p[b]) for b in boots], atol=1e-12)
    yc, pc = rng.choice(["a", "b", "c"], 300), rng.choice(["a", "b", "c"], 300)
    np.testing.assert_allclose(S._boot_scores("balanced_accuracy", None, yc, pc, boots),
                               [skm.balanced_accuracy_score(yc[b], pc[b]) for b in boots], atol=1e-12)
    yr, pr = rng.normal(size=300), rng.normal(size=300)
    np.testing.assert_allclose(S._boot_scores("r2", None, yr, pr, boots),
                               [skm.r2_score(yr[b], pr[b]) for b in boots], atol=1e-12)
    np.testing.assert_allclose(S._boot_scores("mae", None, yr, pr, boots),
                               [skm.mean_absolute_error(yr[b], pr[b]) for b in boots], atol=1e-12)


def test_evaluate_augmentation_errors_and_regression():
    train, test = _interaction_cohort(200, 3), _interaction_cohort(200, 4)
    with pytest.raises(DataError, match="synthetic rows"):
        S.evaluate_augmentation(train, test.assign(synthetic=True), "y")
    with pytest.raises(DataError, match="label 'z'"):
        S.evaluate_augmentation(train, test, "z")
    with pytest.raises(MedCausalError, match="unknown metric 'auc'"):
        S.evaluate_augmentation(train, test, "y", metric="auc")
    one_class = _interaction_cohort(100, 6).assign(y=1)
    res = S.evaluate_augmentation(train, test, "y", synthetic=one_class, n_boot=20).set_index("condition")
    assert np.isnan(res.loc["synthetic", "score"]) and "cannot train" in res.loc["synthetic", "note"]
    reg = S.evaluate_augmentation(train, test, "x1", features=["x1g", "g"], n_boot=50, metric="mae")
    assert reg["metric"].iloc[0] == "mae" and reg["score"].iloc[0] > 0


# --------------------------------------------------------------------------- CLI and containers
def test_cli_commands(fitted, lg_data, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fitted.save(run_dir / "model.mcm")
    parser = argparse.ArgumentParser(prog="medcausal")
    S.add_commands(parser.add_subparsers(dest="command"))

    def cli(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    assert cli("simulate", run_dir, "-n", 300, "--where", "s == 1", "--chunk-size", 100, "--quiet",
               "--out", tmp_path / "sim") == 0
    assert (S.read_run(tmp_path / "sim")["s"] == 1).all()
    assert cli("simulate", run_dir, "-n", 50, "--do", "x=1", "--out", tmp_path / "one.csv", "--quiet") == 0
    one = pd.read_csv(tmp_path / "one.csv")
    assert len(one) == 50 and (one["x"] == 1.0).all() and one["synthetic"].all()
    assert json.loads((tmp_path / "one.csv.json").read_text())["method"] == "unconditional"
    _scarce(lg_data).to_csv(tmp_path / "real.csv", index=False)
    assert cli("augment", run_dir, "--input", tmp_path / "real.csv", "--target", "s == 1", "-n", 100,
               "--strategy", "transport", "--out", tmp_path / "aug.csv", "--quiet") == 0
    aug = pd.read_csv(tmp_path / "aug.csv")
    assert int((aug["s"] == 1).sum()) == 100 and aug["synthetic"].sum() == 40
    lg_data[0].iloc[:20].to_csv(tmp_path / "p.csv", index=False)
    assert cli("worlds", run_dir, "--input", tmp_path / "p.csv", "--world", "a:x=0", "--world", "b:x=1,s=1",
               "--out", tmp_path / "tw.csv") == 0
    tw = pd.read_csv(tmp_path / "tw.csv")
    assert {"x@a", "x@b", "s@b", "effect:y@b"} <= set(tw.columns) and len(tw) == 20
    with pytest.raises(MedCausalError, match="already exists"):
        cli("worlds", run_dir, "--input", tmp_path / "p.csv", "--do", "x=0", "--out", tmp_path / "tw.csv")
    with pytest.raises(MedCausalError, match=r"\['hi'\] more than once"):  # the first world was dropped
        cli("worlds", run_dir, "--input", tmp_path / "p.csv", "--world", "hi:x=1", "--world", "hi:x=2",
            "--out", tmp_path / "tw2.csv")
    # a binary read back as True/False takes --do s=True, as it prints
    assert cli("simulate", run_dir, "-n", 5, "--do", "s=True", "--out", tmp_path / "t.csv", "--quiet") == 0
    assert (pd.read_csv(tmp_path / "t.csv")["s"] == 1).all()


def test_anndata_container_helpers():
    anndata = pytest.importorskip("anndata")
    a = anndata.AnnData(np.arange(12, dtype=np.float32).reshape(4, 3),
                        obs=pd.DataFrame({"drug": ["a", "b", "a", "b"]}, index=list("wxyz")))
    part = S._take(a, [1, 3])
    assert S._table(part)["drug"].tolist() == ["b", "b"] and part.X[:, 0].tolist() == [3.0, 9.0]
    both = S._concat([part, S._take(a, [0])])
    S._set_ids(both, np.arange(3))
    S._assign(both, {"synthetic": np.ones(3, bool)})
    assert both.obs_names.tolist() == ["0", "1", "2"] and both.obs["synthetic"].all() and both.shape == (3, 3)


def test_names_that_need_backticks():
    rng = np.random.default_rng(0)
    sex = (rng.random(300) < 0.2).astype(int)
    df = pd.DataFrame({"pt.sex": sex, "bp": 120 + 8 * sex + rng.normal(0, 5, 300)})
    g = mc.CausalGraph({"pt.sex": "binary", "bp": "continuous"}, edges=[("pt.sex", "bp")])
    model = mc.CausalModel(g).fit(df, max_epochs=2, verbose=False)
    sub = S.simulate(model, 20, where="`pt.sex` == 1", seed=0)
    assert sub.attrs["medcausal"]["method"] == "exact-roots" and (sub["pt.sex"] == 1).all()
    bal = S.augment(model, df, target="pt.sex", strategy="transport", seed=0)
    assert bal["pt.sex"].value_counts().to_dict() == {0: 300 - sex.sum(), 1: 300 - sex.sum()}
    with pytest.raises(DataError, match="'pt.sex' is binary"):
        S.simulate(model, 5, where="`pt.sex` == 'F'")


# --------------------------------------------------------------------------- images and cells
def _squares(n, seed, flip=False):
    """Ground truth for the image path: class 1 scans carry a bright 4x4 square (+2 sd), class 0 do not."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    X[:, :, 2:6, 2:6] += 2.0 * y[:, None, None, None]
    label = (1 - y) if flip else y
    return mc.Cohort(pd.DataFrame({"y": label, "g": rng.integers(0, 2, n)}), {"img": X})


def test_image_classifier_learns_and_checks_input():
    from sklearn.metrics import roc_auc_score

    tr, te = _squares(200, 0), _squares(300, 1)
    clf = S.ImageClassifier(channels=(4,), steps=80, seed=0).fit(tr.arrays["img"], tr.table["y"])
    p = clf.predict_proba(te.arrays["img"])[:, 1]
    assert roc_auc_score(te.table["y"], p) > 0.95  # separable by construction
    again = S.ImageClassifier(channels=(4,), steps=80, seed=0).fit(tr.arrays["img"], tr.table["y"])
    np.testing.assert_array_equal(again.predict_proba(te.arrays["img"])[:, 1], p)  # seeded
    assert clf.n_steps_ == 80 and list(clf.classes_) == [0, 1]
    with pytest.raises(DataError, match="shape"):
        clf.predict_proba(np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"\[n, C, H, W\]"):
        S.ImageClassifier().fit(np.zeros((4, 8)), [0, 1, 0, 1])
    with pytest.raises(DataError, match="two classes"):
        S.ImageClassifier().fit(np.zeros((4, 1, 4, 4)), [1, 1, 1, 1])


def test_evaluate_augmentation_on_images():
    real, test = _squares(24, 2), _squares(300, 3)
    oracle, flipped = _squares(200, 4), _squares(200, 5, flip=True)  # flipped: every label inverted
    est = S.ImageClassifier(channels=(4,), steps=60, seed=0)
    res = S.evaluate_augmentation(real, test, "y", synthetic={"oracle": oracle, "flipped": flipped},
                                  features=["img"], estimator=est, subgroups={"g1": "g == 1"}, n_boot=200, seed=0)
    assert res["condition"].tolist()[:5] == ["real", "real+oracle", "oracle", "real+flipped", "flipped"]
    score = res[res["subgroup"] == "all"].set_index("condition")["score"]
    # scans and labels stay aligned through the split and concatenation: the oracle set alone ranks the
    # test scans almost perfectly, the label-inverted set almost perfectly backwards
    assert score["oracle"] > 0.95 and score["flipped"] < 0.05
    assert res.loc[res["condition"] == "real+oracle", "n_train_synthetic"].iloc[0] == 200
    # default: the one image array shared by train and test; synthetic rows found by their flag
    aug = S._concat([mc.Cohort(real.table.assign(synthetic=False), real.arrays),
                     mc.Cohort(oracle.table.assign(synthetic=True), oracle.arrays)])
    res2 = S.evaluate_augmentation(aug, test, "y", estimator=est, n_boot=50)
    assert res2["condition"].tolist() == ["real", "real+synthetic", "synthetic"]
    assert res2["n_train_real"].tolist() == [24, 24, 0]
    with pytest.raises(mc.errors.CapabilityError, match="mix image"):
        S.evaluate_augmentation(real, test, "y", features=["img", "g"])
    with pytest.raises(DataError, match="synthetic set 'tab' has no image array 'img'"):
        S.evaluate_augmentation(real, test, "y", synthetic={"tab": oracle.table}, features=["img"])
    reg = mc.Cohort(real.table.assign(v=np.linspace(0, 1, 24)), real.arrays)
    with pytest.raises(mc.errors.CapabilityError, match="regression"):
        S.evaluate_augmentation(reg, mc.Cohort(test.table.assign(v=0.5), test.arrays), "v", features=["img"],
                                task="regression")


@pytest.fixture(scope="module")
def brain_model():
    import warnings

    sim = mc.synthetic.BrainMRI(shape=(16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mc.errors.OutOfSupportWarning)
        data = sim.sample(48, seed=0)
    model = mc.CausalModel(sim.graph, mechanisms={"mri": {"name": "cvae", "channels": [4, 8], "z_dim": 4,
                                                          "hidden": 16}})
    return model.fit(data, max_epochs=1, seed=0, verbose=False), data


@pytest.mark.parametrize("image_format", ["nifti", "png"])
def test_simulate_image_model_streams_scan_files(brain_model, tmp_path, image_format):
    model, _ = brain_model
    mem = S.simulate(model, 10, seed=0, chunk_size=4)
    assert isinstance(mem, mc.Cohort) and mem.arrays["mri"].shape == (10, 1, 16, 16)
    run = S.simulate(model, 10, seed=0, chunk_size=4, out=tmp_path / "run", format="csv", image_format=image_format)
    suffix = ".nii.gz" if image_format == "nifti" else ".png"
    assert sorted(p.name for p in (run.path / "part-00001.mri").iterdir()) == [f"{i}{suffix}" for i in range(4, 8)]
    part = pd.read_csv(run.path / "part-00000.csv")
    assert set(S.PROVENANCE_COLUMNS) <= set(part.columns) and part["synthetic"].all()
    assert part["mri_path"].tolist() == [f"part-00000.mri/{i}{suffix}" for i in range(4)]
    meta = json.loads((run.path / "simulation.json").read_text())
    assert meta["image_format"] == image_format and meta["parts"][0]["images"] == {"mri": "part-00000.mri"}
    back = S.read_run(run.path)
    assert isinstance(back, mc.Cohort) and back.table["id"].tolist() == list(range(10))
    # NIfTI keeps float32 exactly; PNG quantizes to 16 bits of each chunk's maximum (half a step per row)
    tol = 0.0 if image_format == "nifti" else 0.5 * back.table["mri_scale"].to_numpy()[:, None, None, None] + 1e-7
    assert (np.abs(back.arrays["mri"] - mem.arrays["mri"]) <= tol).all()
    # interrupted after a chunk's scans but before its table: resume redoes that chunk whole
    (run.path / S.MARKER).unlink()
    (run.path / "part-00002.csv").unlink()
    (run.path / "part-00002.mri" / f"9{suffix}").unlink()
    side = json.loads((run.path / "simulation.json").read_text())
    side["parts"] = side["parts"][:2]
    (run.path / "simulation.json").write_text(json.dumps(side))
    with pytest.raises(DataError, match="incomplete"):
        S.read_run(run.path)
    S.simulate(model, 10, seed=0, chunk_size=4, out=tmp_path / "run", format="csv", image_format=image_format,
               resume=True)
    assert (np.abs(S.read_run(run.path).arrays["mri"] - mem.arrays["mri"]) <= tol).all()
    S.simulate(model, 4, seed=1, chunk_size=4, out=tmp_path / "run", format="csv", overwrite=True,
               image_format=image_format)
    assert sorted(p.name for p in run.path.iterdir()) == ["_SUCCESS", "part-00000.csv", "part-00000.mri",
                                                           "simulation.json"]
    with pytest.raises(MedCausalError, match="image_format"):
        S.simulate(model, 4, image_format="jpeg")


def test_cli_writes_scans_and_h5ad(brain_model, tmp_path):
    model, data = brain_model
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model.save(run_dir / "model.mcm")
    parser = argparse.ArgumentParser(prog="medcausal")
    S.add_commands(parser.add_subparsers(dest="command"))

    def cli(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    assert cli("simulate", run_dir, "-n", 6, "--where", "sex == 0", "--out", tmp_path / "sim.csv", "--quiet") == 0
    sim = pd.read_csv(tmp_path / "sim.csv")
    assert (sim["sex"] == 0).all() and sim["synthetic"].all() and set(S.PROVENANCE_COLUMNS) <= set(sim.columns)
    assert all((tmp_path / p).is_file() and p.startswith("sim_mri/") and p.endswith(".nii.gz")
               for p in sim["mri_path"])
    side = json.loads((tmp_path / "sim.csv.json").read_text())
    assert side["images"] == {"mri": "sim_mri"} and side["status"] == "complete" and side["rows"] == 6
    # augment real patients from a CSV that names their scans: the scans are read back and written out
    real = data[np.flatnonzero(data.table["sex"].to_numpy() == 0)[:6]]
    mc.adapters.write_images(real, tmp_path / "real", format="nifti", table_name="real.csv")
    assert cli("augment", run_dir, "--input", tmp_path / "real" / "real.csv", "--target", "sex == 1", "-n", 3,
               "--strategy", "transport", "--out", tmp_path / "aug.csv", "--quiet") == 0
    aug = pd.read_csv(tmp_path / "aug.csv")
    syn = aug["synthetic"].to_numpy(dtype=bool)
    assert len(aug) == 9 and syn.sum() == 3 and (aug.loc[syn, "sex"] == 1).all()
    assert aug.loc[syn, "synth_source"].isin(real.ids.tolist()).all() and (aug.loc[syn, "synth_strategy"] == "transport").all()
    assert all(p.startswith("aug_mri/") and p.endswith(".nii.gz") for p in aug["mri_path"])
    back = mc.adapters.load_images(None, table=tmp_path / "aug.csv", image_column="mri_path", shape=(1, 16, 16),
                                   intensity=None, progress=False)
    np.testing.assert_array_equal(back.arrays["mri"][~syn], real.arrays["mri"])  # real scans kept as they were
    # PNG cannot hold the model's slightly negative pixels: a clear error, never a silent clip
    with pytest.raises(DataError, match="PNG cannot hold negative values"):
        cli("augment", run_dir, "--input", tmp_path / "real" / "real.csv", "--target", "sex == 1", "-n", 3,
            "--strategy", "transport", "--image-format", "png", "--out", tmp_path / "aug2.csv", "--quiet")
    assert json.loads((tmp_path / "aug.csv.json").read_text())["synthetic_rows"] == 3
    # worlds from a simulation folder: one scan per world, files beside the table
    assert cli("simulate", run_dir, "-n", 4, "--out", tmp_path / "simrun", "--format", "csv", "--quiet") == 0
    assert cli("worlds", run_dir, "--input", tmp_path / "simrun", "--world", "old:age=80",
               "--out", tmp_path / "tw.csv") == 0
    tw = pd.read_csv(tmp_path / "tw.csv")
    assert len(tw) == 4 and any(c.startswith("mri") and c.endswith("_path") for c in tw.columns)
    for col in [c for c in tw.columns if c.endswith("_path")]:
        assert all((tmp_path / p).is_file() for p in tw[col])
    with pytest.raises(DataError, match="h5ad output needs single-cell data"):
        cli("simulate", run_dir, "-n", 2, "--out", tmp_path / "x.h5ad", "--quiet")
    with pytest.raises(DataError, match="mri_path"):
        data.table.to_csv(tmp_path / "noscans.csv", index=False)
        cli("augment", run_dir, "--input", tmp_path / "noscans.csv", "--target", "sex == 1",
            "--out", tmp_path / "a2.csv", "--quiet")


def test_expression_results_are_written_as_h5ad(tmp_path):
    anndata = pytest.importorskip("anndata")
    counts = np.arange(12, dtype=np.float32).reshape(4, 3)
    prov = S._provenance(4, model_key="m1", strategy="simulate", do=None, where=None, seed=0, epsilon=None)
    cells = mc.Cohort(pd.DataFrame({"drug": ["a", "b", "a", "b"], **prov}), {"expression": counts})
    S._write_output(cells, tmp_path / "cells.h5ad")
    a = anndata.read_h5ad(tmp_path / "cells.h5ad")
    np.testing.assert_array_equal(a.layers["counts"].toarray(), counts)
    assert a.obs["synthetic"].astype(bool).all() and (a.obs["synth_model"] == "m1").all()
    with pytest.raises(DataError, match=r"\.h5ad"):
        S._write_output(cells, tmp_path / "cells.csv")
    # a streamed chunk: table part + .h5ad, read back into the same cohort
    extra = S._write_part(tmp_path, 0, "csv", cells)
    assert extra["h5ad"] == "part-00000.h5ad" and extra["h5ad_arrays"] == ["expression"]
    arrays = S._read_part_arrays(tmp_path, extra, pd.read_csv(tmp_path / "part-00000.csv"))
    np.testing.assert_array_equal(arrays["expression"], counts)


# --------------------------------------------------------------------------- bad input, resume checks, provenance and containers

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


# --------------------------------------------------------------------------- a differentially private model's synthetic rows

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
