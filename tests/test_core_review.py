"""Review of the core (graph, model, interventions, cohort): each test failed before its fix."""

import numpy as np
import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.errors import DataError, GraphError, InterventionError, MedCausalError
from medcausal.interventions import parse_cli_do


def _data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    s = (rng.random(n) < 0.4).astype(int)
    y = 2 * x + s + 0.5 * rng.normal(size=n)
    return pd.DataFrame({"x": x, "s": s, "y": y, "stage": np.where(y > 0.5, "high", "low")})


GRAPH = mc.CausalGraph({"x": "continuous", "s": "binary", "y": "continuous", "stage": "categorical"},
                       edges=[("x", "y"), ("s", "y"), ("y", "stage")])


@pytest.fixture(scope="module")
def small():
    return mc.CausalModel(GRAPH, mechanisms="additive").fit(_data(), max_epochs=1, verbose=False)


@pytest.mark.parametrize("spec, dim", [({"type": "continuous", "dim": 2.0}, 2), ({"type": "continuous", "dim": "2"}, 2)])
def test_a_vector_dim_read_from_json_or_toml_is_a_plain_int(spec, dim):
    graph = mc.CausalGraph({"v": spec, "y": "continuous"}, edges=[("v", "y")])
    assert graph.variables["v"].dim == dim and type(graph.variables["v"].dim) is int
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(40, 3)), columns=["v[0]", "v[1]", "y"])
    model = mc.CausalModel(graph, mechanisms="additive").fit(df, max_epochs=1, verbose=False)
    assert list(model.sample(2, seed=0).columns) == ["v[0]", "v[1]", "y"]


@pytest.mark.parametrize("make", [lambda: mc.Continuous(dim=2.5), lambda: mc.Continuous(dim=True),
                                  lambda: mc.Expression(2.5), lambda: mc.Image((1, 8.7, 8))])
def test_fractional_sizes_are_refused_not_truncated(make):
    with pytest.raises(GraphError, match="whole number|positive integers"):
        make()


def test_categories_given_as_one_string_are_refused():
    with pytest.raises(GraphError, match="variable 'a'.*string 'low'"):
        mc.CausalGraph({"a": {"type": "categorical", "categories": "low"}})


@pytest.mark.parametrize("edges, culprit", [(["ab"], "'ab'"), ([1], "1")])
def test_an_edge_that_is_not_a_pair_is_refused(edges, culprit):
    with pytest.raises(GraphError, match=f"pair, got {culprit}"):
        mc.CausalGraph({"a": "continuous", "b": "continuous"}, edges=edges)


def test_variables_that_are_not_name_type_pairs_or_lack_a_key_are_graph_errors():
    with pytest.raises(GraphError, match="variables must be"):
        mc.CausalGraph(["a", "b"])
    with pytest.raises(GraphError, match="'variables' key"):
        mc.CausalGraph.from_dict({"edges": []})


def test_non_string_variable_names_are_stored_as_the_names_edges_use():
    graph = mc.CausalGraph({1: "continuous", 2: "continuous"}, edges=[(1, 2)])
    assert list(graph.variables) == ["1", "2"] and graph.parents("2") == ("1",)


def test_a_callable_that_edits_its_argument_leaves_the_observed_data_alone(small):
    obs = _data(5, seed=1)
    before = obs.copy()

    def flip(a):
        a[:] = 1 - a
        return a

    small.counterfactual(obs, do={"s": flip}, seed=0)
    pd.testing.assert_frame_equal(obs, before)


def test_cli_do_refuses_a_variable_given_twice():
    with pytest.raises(InterventionError, match="'age' more than once"):
        parse_cli_do(["age=80", "age=90"])
    with pytest.raises(InterventionError, match="var=value"):
        parse_cli_do(["=80"])


@pytest.mark.parametrize("seed", [None, np.int64(3)])
def test_fit_takes_a_numpy_or_no_seed(seed):
    model = mc.CausalModel(GRAPH, mechanisms="additive").fit(_data(), seed=seed, max_epochs=1, verbose=False)
    assert type(model.fit_info["seed"]) is int


def test_fit_and_sample_refuse_a_seed_that_is_not_an_integer(small):
    with pytest.raises(MedCausalError, match="seed"):
        mc.CausalModel(GRAPH, mechanisms="additive").fit(_data(), seed="abc", max_epochs=1, verbose=False)
    with pytest.raises(MedCausalError, match="seed"):
        small.sample(3, seed="abc")


def test_a_model_fitted_with_numpy_settings_saves_and_loads(tmp_path):
    model = mc.CausalModel(GRAPH, mechanisms="additive").fit(
        _data(), batch_size=np.int64(64), max_epochs=np.int64(1), verbose=False)
    path = model.save(tmp_path / "m.mcm")
    torch.load(path, weights_only=True)
    loaded = mc.CausalModel.load(path)
    assert loaded.fit_info["config"]["batch_size"] == 64


def test_a_loaded_model_refit_learns_new_categories_like_the_original(small, tmp_path):
    loaded = mc.CausalModel.load(small.save(tmp_path / "m.mcm"))
    df = _data()
    df2 = df.assign(stage=np.where(df["stage"] == "low", "low", "very high"))
    loaded.fit(df2, max_epochs=1, verbose=False)
    assert set(loaded.sample(50, seed=0)["stage"]) <= {"low", "very high"}


@pytest.mark.parametrize("data", [{"x": [1.0]}, np.zeros((3, 4))])
def test_counterfactual_of_something_that_is_not_a_table_is_a_data_error(small, data):
    with pytest.raises(DataError, match="counterfactual\\(\\) takes a pandas DataFrame"):
        small.counterfactual(data, do={"x": 1.0})


@pytest.mark.parametrize("n", [None, "abc", "5"])
def test_sample_refuses_an_n_that_is_not_a_number(small, n):
    with pytest.raises(DataError, match="whole number"):
        small.sample(n)


@pytest.mark.parametrize("spec", [5, ["flow"]])
def test_a_mechanism_spec_of_the_wrong_type_names_the_variable(spec):
    with pytest.raises(MedCausalError, match="mechanism for 'y' must be a name"):
        mc.CausalModel(GRAPH, mechanisms={"y": spec})


def test_a_cohort_owns_its_meta():
    meta = {"image_specs": {"mri": {"spacing": [1, 1]}}}
    cohort = mc.Cohort(pd.DataFrame({"a": [1.0, 2.0]}), meta=meta)
    cohort.meta["image_specs"]["mri"]["spacing"].append(9)
    assert meta["image_specs"]["mri"]["spacing"] == [1, 1]


def test_cli_do_keeps_a_category_written_like_a_number():
    """``--do grade=01`` names the category "01" (it used to become 1.0, an unseen category)."""
    import medcausal as mc
    from medcausal.interventions import parse_cli_do

    rng = np.random.default_rng(0)
    grade = rng.choice(["01", "02"], 200)
    df = pd.DataFrame({"grade": grade, "y": (grade == "02") + rng.normal(0, 0.1, 200)})
    g = mc.CausalGraph({"grade": "categorical", "y": "continuous"}, edges=[("grade", "y")])
    model = mc.CausalModel(g).fit(df, seed=0, max_epochs=2)
    do = parse_cli_do(["grade=01"], model.graph.variables)
    assert do == {"grade": "01"}
    assert (model.sample(5, do=do, seed=0)["grade"] == "01").all()
    assert parse_cli_do(["y=01"], model.graph.variables) == {"y": 1.0}  # continuous: a number


def test_a_cohort_keeps_a_named_index_as_a_column():
    # a named index that is not the id column ("subject") was dropped, its ids lost
    import pandas as pd

    t = pd.DataFrame({"age": [1.0, 2.0]}, index=pd.Index(["s1", "s2"], name="subject"))
    c = mc.Cohort(t, {})
    assert c.table["subject"].tolist() == ["s1", "s2"] and c.ids.tolist() == [0, 1]
    assert mc.Cohort(t.rename_axis("id"), {}).ids.tolist() == ["s1", "s2"]  # named like the id column: the ids


# ---- session 16 review of the core -------------------------------------------------------


def test_a_shift_function_gets_a_scalar_as_a_flat_array_like_the_simulator_gives_it(small):
    """A per-row shift ``a + offsets`` broadcast (n, 1) + (n,) to (n, n) and was refused."""
    sim = mc.synthetic.scm("chain", additive=True)
    model = mc.CausalModel(sim.graph, mechanisms="additive").fit(sim.sample(300, seed=0), max_epochs=2,
                                                                  verbose=False)
    obs = sim.sample(4, seed=1)
    offsets = np.array([0.1, 0.2, 0.3, 0.4])
    shift = lambda a: a + offsets  # noqa: E731
    cf = model.counterfactual(obs, do={"x1": shift}, seed=0)
    np.testing.assert_allclose(cf["x1"], sim.counterfactual(obs, do={"x1": shift})["x1"], rtol=1e-6)
    seen = []
    model.sample(3, do={"x1": lambda a: seen.append(a.shape) or a}, seed=0)
    assert seen == [(3,)]


def test_a_series_intervention_means_the_same_to_the_model_and_to_every_simulator():
    """The model aligned a pd.Series by its index and the simulators by position."""
    sim = mc.synthetic.scm("chain", additive=True)
    model = mc.CausalModel(sim.graph, mechanisms="additive").fit(sim.sample(300, seed=0), max_epochs=2,
                                                                  verbose=False)
    obs = sim.sample(3, seed=1)
    target = (obs["x1"] + 1.0).iloc[::-1]  # each unit's own value, listed in another order
    expected = (obs["x1"] + 1.0).to_numpy()
    np.testing.assert_allclose(sim.counterfactual(obs, do={"x1": target})["x1"], expected)
    np.testing.assert_allclose(model.counterfactual(obs, do={"x1": target})["x1"], expected)
    brain = mc.synthetic.BrainMRI(shape=(16, 16))
    c = brain.sample(3, seed=0)
    ages = pd.Series([50.0, 60.0, 70.0])[::-1]
    assert brain.counterfactual(c, do={"age": ages}).table["age"].tolist() == [50.0, 60.0, 70.0]
    cells = mc.synthetic.PerturbSeq(n_genes=10, seed=0).sample(3, seed=0)
    labels = pd.Series(["P0", "P1", "P2"], index=cells.obs_names)[::-1]
    cf = mc.synthetic.PerturbSeq(n_genes=10, seed=0).counterfactual(cells, do={"perturbation": labels})
    assert cf.obs["perturbation"].astype(str).tolist() == ["P0", "P1", "P2"]
    with pytest.raises(InterventionError, match="index"):
        sim.counterfactual(obs, do={"x1": pd.Series([1.0, 2.0, 3.0], index=[7, 8, 9])})


@pytest.mark.parametrize("name", ["type", "train", "float", "to", "training", "_modules"])
def test_a_variable_may_be_named_like_a_module_attribute(name):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=60)})
    df[name] = 2 * df["a"] + rng.normal(size=60)
    model = mc.CausalModel(mc.CausalGraph({"a": "continuous", name: "continuous"}, edges=[("a", name)]),
                           mechanisms="additive").fit(df, max_epochs=1, verbose=False)
    assert list(model.sample(2, seed=0).columns) == ["a", name]


@pytest.mark.parametrize("names", [("x", "x|pa"), ("a.b", "a\u00b7b")])
def test_variables_whose_internal_names_clash_are_refused(names):
    """``x|pa`` overwrote x's parents in training; ``a.b`` and ``a·b`` shared one mechanism."""
    with pytest.raises(GraphError, match="rename one"):
        mc.CausalModel(mc.CausalGraph({n: "continuous" for n in names}))


def test_fit_with_a_torch_device_saves(tmp_path):
    model = mc.CausalModel(GRAPH, mechanisms="additive").fit(_data(), max_epochs=1, verbose=False,
                                                              device=torch.device("cpu"))
    assert model.fit_info["config"]["device"] == "cpu"
    model.save(tmp_path / "m.mcm")


def test_history_survives_save_and_load(small, tmp_path):
    assert mc.CausalModel(GRAPH).history == []
    loaded = mc.CausalModel.load(small.save(tmp_path / "m.mcm"))
    assert loaded.history == small.history and len(loaded.history) == 1


@pytest.mark.parametrize("setting", [{"lr": "0.1"}, {"val_fraction": None}, {"seed": 2**70}])
def test_bad_fit_settings_name_the_setting(setting):
    with pytest.raises(MedCausalError, match=next(iter(setting))):
        mc.CausalModel(GRAPH, mechanisms="additive").fit(_data(), max_epochs=1, verbose=False, **setting)


def test_sample_refuses_a_seed_out_of_range(small):
    with pytest.raises(MedCausalError, match="seed"):
        small.sample(2, seed=2**70)


def test_categories_as_a_set_are_refused():
    with pytest.raises(GraphError, match="ordered list"):
        mc.Categorical({"A", "B", "C"})


def test_integer_column_labels_are_named_as_the_problem():
    df = pd.DataFrame(np.random.default_rng(0).normal(size=(30, 2)))
    graph = mc.CausalGraph({0: "continuous", 1: "continuous"}, edges=[(0, 1)])
    with pytest.raises(DataError, match="astype\\(str\\)"):
        mc.CausalModel(graph, mechanisms="additive").fit(df, max_epochs=1, verbose=False)


def test_a_units_counterfactual_is_the_same_asked_alone_or_with_others():
    """Discrete abduction drew from one generator over the whole query: a unit's counterfactual
    category depended on which other units were asked with it."""
    data = _data(400)
    model = mc.CausalModel(GRAPH).fit(data, max_epochs=2, verbose=False)
    full = model.counterfactual(data, do={"x": 1.5}, seed=3)
    part = model.counterfactual(data.iloc[100:140], do={"x": 1.5}, seed=3)
    alone = model.counterfactual(data.iloc[[120]], do={"x": 1.5}, seed=3)
    pd.testing.assert_frame_equal(part, full.iloc[100:140])
    pd.testing.assert_frame_equal(alone, full.iloc[[120]])
    assert (full["stage"] != data["stage"]).any()  # the query moves the discrete descendant
    assert not model.counterfactual(data, do={"x": 1.5}, seed=4)["stage"].equals(full["stage"])  # seed matters


def test_every_unreadable_column_is_named_in_one_error():
    """Missing values were reported one column per fit, and a binary's as 'values other than 0/1: [nan]'."""
    df = _data(60)
    df.loc[[1, 2], "s"] = np.nan
    df.loc[[3], "x"] = np.nan
    with pytest.raises(DataError) as err:
        mc.CausalModel(GRAPH, mechanisms="additive").fit(df, max_epochs=1, verbose=False)
    text = str(err.value)
    assert "2 variables" in text and "'s' is binary but has 2 missing value(s)" in text and "'x'" in text


def test_a_text_binary_column_gets_a_hint_and_yes_no_reads_as_binary():
    df = _data(80)
    df["s"] = np.where(df["s"] == 1, "M", "F")
    with pytest.raises(DataError, match="is categorical: declare it"):
        mc.CausalModel(GRAPH, mechanisms="additive").fit(df, max_epochs=1, verbose=False)
    df["s"] = np.where(df["s"] == "M", "Yes", "No")
    model = mc.CausalModel(GRAPH, mechanisms="additive").fit(df, max_epochs=1, verbose=False)
    assert set(model.sample(200, seed=0)["s"]) == {"Yes", "No"}
    assert model.counterfactual(df.iloc[:3], do={"s": "Yes"})["s"].tolist() == ["Yes"] * 3


def test_a_units_noise_key_does_not_depend_on_the_containers_dtype():
    import numpy as np

    from medcausal.mechanisms.base import RowNoise

    keys = RowNoise.label_keys
    assert keys(pd.Index([5, 6]))[0] == keys(pd.Index([5, "a"]))[0] == keys([5.0])[0] == keys(["5"])[0] \
        == keys(pd.Index([np.int64(5)], dtype=object))[0]
    assert len(set(keys([None, None, "a"]).tolist())) == 3  # a label seen again gets its own draws
    assert len(set(keys([float("nan"), float("nan")]).tolist())) == 2
