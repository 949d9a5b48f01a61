import numpy as np
import pandas as pd
import pytest

import medcausal as mc
from medcausal.errors import GraphError, MedCausalError


def test_parents_children_order():
    g = mc.CausalGraph({"a": "continuous", "b": "binary", "c": "continuous", "d": mc.Categorical(["x", "y"])},
                       edges=[("a", "c"), ("b", "c"), ("c", "d")])
    assert g.parents("c") == ("a", "b")
    assert g.children("c") == ("d",)
    assert g.topological_order == ("a", "b", "c", "d")
    assert g.descendants("a") == {"c", "d"}
    assert g.ancestors("d") == {"a", "b", "c"}
    assert g.roots == ("a", "b")


def test_cycle_is_listed():
    with pytest.raises(GraphError, match=r"cycle: (a -> b -> c -> a|b -> c -> a -> b|c -> a -> b -> c)"):
        mc.CausalGraph({"a": "continuous", "b": "continuous", "c": "continuous"},
                       edges=[("a", "b"), ("b", "c"), ("c", "a")])


def test_unknown_variable_in_edge():
    with pytest.raises(GraphError, match="unknown variable 'agee'"):
        mc.CausalGraph({"age": "continuous", "bp": "continuous"}, edges=[("agee", "bp")])


def test_self_loop():
    with pytest.raises(GraphError, match="self-loop on variable 'bp'"):
        mc.CausalGraph({"bp": "continuous"}, edges=[("bp", "bp")])


def test_duplicate_name():
    with pytest.raises(GraphError, match=r"duplicate variable name\(s\): \['age'\]"):
        mc.CausalGraph([("age", "continuous"), ("age", "binary")])


def test_unknown_type_names_variable():
    with pytest.raises(GraphError, match="variable 'x': unknown type 'real'"):
        mc.CausalGraph({"x": "real"})


def test_errors_are_value_errors():
    assert issubclass(GraphError, MedCausalError) and issubclass(GraphError, ValueError)


def test_types_round_trip_through_dict():
    g = mc.CausalGraph({"age": "continuous", "v": mc.Continuous(dim=2), "s": "binary",
                        "stage": {"type": "categorical", "categories": ["I", "II"]},
                        "mri": mc.Image(shape=(1, 32, 32)), "x": mc.Expression(n_genes=50)},
                       edges=[("age", "mri"), ("stage", "x")])
    assert mc.CausalGraph.from_dict(g.to_dict()) == g
    assert g.variables["mri"].shape == (1, 32, 32)


def test_bad_type_arguments():
    with pytest.raises(GraphError, match="at least|>= 2 categories"):
        mc.Categorical(["only"])
    with pytest.raises(GraphError, match="Image shape"):
        mc.Image(shape=(32, 32))


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


def test_categories_as_a_set_are_refused():
    with pytest.raises(GraphError, match="ordered list"):
        mc.Categorical({"A", "B", "C"})


def test_a_variable_named_like_a_vector_column_is_refused():
    from medcausal.errors import GraphError

    with pytest.raises(GraphError, match="'v' and 'v\\[0\\]' would both be the table column 'v\\[0\\]'"):
        mc.CausalGraph({"v": mc.graph.Continuous(dim=2), "v[0]": "continuous"})


def test_image_with_a_bad_shape_is_a_graph_error_naming_the_variable():
    with pytest.raises(GraphError, match="'64x64'"):
        mc.Image("64x64")
    with pytest.raises(GraphError, match="variable 'mri'.*'64x64'"):
        mc.CausalGraph({"mri": {"type": "image", "shape": "64x64"}})
