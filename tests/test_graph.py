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
