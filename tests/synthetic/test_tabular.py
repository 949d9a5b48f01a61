"""Ground-truth tabular SCMs: structure, determinism, noise recovery, exact counterfactuals."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest

from medcausal.errors import DataError, InterventionError, MedCausalError
from medcausal.synthetic import scm, scm_names
from medcausal.synthetic.tabular import TabularSCM

ALL = [(name, additive) for name in ["chain", "triangle", "diamond", "y", "ladder"]
       for additive in (True, False)]
IDS = [f"{n}-{'add' if a else 'nonadd'}" for n, a in ALL]

SMALL_EDGES = {
    "chain": {("x1", "x2"), ("x2", "x3")},
    "triangle": {("x1", "x2"), ("x1", "x3"), ("x2", "x3")},
    "diamond": {("x1", "x2"), ("x1", "x3"), ("x2", "x3"), ("x2", "x4"), ("x3", "x4")},
    "y": {("x1", "x3"), ("x2", "x3"), ("x3", "x4")},
}
# one intervened variable per SCM that has both ancestors/non-descendants and descendants
MIDDLE = {"chain": "x2", "triangle": "x2", "diamond": "x2", "y": "x3", "ladder": "x7"}


def _sim(name, additive) -> TabularSCM:
    return scm(name, additive=additive)


# --------------------------------------------------------------------------- structure
def test_names_and_unknown_name():
    assert scm_names() == ["chain", "triangle", "diamond", "y", "ladder"]
    with pytest.raises(MedCausalError, match="known: .*chain.*ladder") as exc:
        scm("hexagon")
    assert isinstance(exc.value, ValueError)
    assert scm("Y").name == "y"  # case-insensitive


@pytest.mark.parametrize("name", sorted(SMALL_EDGES))
@pytest.mark.parametrize("additive", [True, False])
def test_small_graph_structure(name, additive):
    sim = _sim(name, additive)
    assert sim.name == name and sim.additive is additive
    assert set(sim.graph.edges) == SMALL_EDGES[name]
    n = len(sim.graph.variables)
    assert sim.graph.topological_order == tuple(f"x{i}" for i in range(1, n + 1))
    assert all(t.kind == "continuous" for t in sim.graph.variables.values())
    assert set(sim.equations) == set(sim.graph.variables)


@pytest.mark.parametrize("additive", [True, False])
def test_ladder_structure(additive):
    g = _sim("ladder", additive).graph
    assert g.topological_order == tuple(f"x{i}" for i in range(1, 31))
    assert len(g.edges) == 13 * 9  # 13 super-node edges, 3 x 3 each
    assert g.roots == ("x1", "x2", "x3")
    assert g.parents("x4") == ("x1", "x2", "x3")
    assert g.parents("x12") == tuple(f"x{i}" for i in range(4, 10))   # super-nodes 2, 3 -> 4
    assert g.parents("x30") == tuple(f"x{i}" for i in range(22, 28))  # super-nodes 8, 9 -> 10
    assert g.descendants("x1") == {f"x{i}" for i in range(4, 31)}


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name,additive", ALL, ids=IDS)
def test_sample_frame_determinism_and_scale(name, additive):
    sim = _sim(name, additive)
    df = sim.sample(10_000, seed=3)
    assert list(df.columns) == list(sim.graph.topological_order)
    assert df.index.name == "unit" and df.index.is_unique
    assert all(df[c].dtype == np.float64 for c in df.columns)
    pd.testing.assert_frame_equal(df, sim.sample(10_000, seed=3))
    # the first rows do not depend on n: unit (seed, row) is always the same unit
    pd.testing.assert_frame_equal(df.iloc[:50], sim.sample(50, seed=3))
    other = sim.sample(50, seed=4)
    assert not set(other.index) & set(df.index)
    assert not np.allclose(other.to_numpy(), df.iloc[:50].to_numpy())
    # well scaled: no explosions, every std roughly within [0.3, 10]
    assert np.isfinite(df.to_numpy()).all()
    std = df.std()
    assert ((std > 0.3) & (std < 10)).all(), std[(std <= 0.3) | (std >= 10)]


def test_seed_none_and_bad_seed_or_n():
    sim = scm("chain")
    a, b = sim.sample(5, seed=None), sim.sample(5, seed=None)
    assert not set(a.index) & set(b.index)
    sim.noise(a)  # the random seed is recorded in the ids
    with pytest.raises(MedCausalError, match="seed"):
        sim.sample(5, seed=-1)
    with pytest.raises(MedCausalError, match="n must"):
        sim.sample(2.5)
    assert sim.sample(0).shape == (0, 3)


@pytest.mark.parametrize("name,additive", ALL, ids=IDS)
def test_noise_is_standard_normal_and_reproduces_data(name, additive):
    sim = _sim(name, additive)
    df = sim.sample(10_000, seed=0)
    u = sim.noise(df)
    assert list(u.columns) == list(df.columns) and u.index.equals(df.index)
    # N(0, 1), independent: 10k draws -> SE(mean) = SE(corr) = 0.01, SE(std) = 0.007
    assert np.abs(u.mean()).max() < 0.04
    assert np.abs(u.std() - 1).max() < 0.03
    corr = np.corrcoef(u.to_numpy(), rowvar=False)
    assert np.abs(corr - np.eye(len(df.columns))).max() < 0.05
    # the recovered noise regenerates every variable through its equation
    for v in sim.graph.topological_order:
        parents = {p: df[p].to_numpy() for p in sim.graph.parents(v)}
        np.testing.assert_allclose(sim.evaluate(v, parents, u[v].to_numpy()), df[v], rtol=1e-12)


def test_noise_recovery_after_slicing_reordering_and_csv():
    sim = scm("diamond", additive=False)
    df = sim.sample(500, seed=11)
    u = sim.noise(df)
    perm = np.random.default_rng(0).permutation(500)[:123]
    pd.testing.assert_frame_equal(sim.noise(df.iloc[perm]), u.iloc[perm])
    pd.testing.assert_frame_equal(sim.noise(df.index[perm]), u.iloc[perm])  # ids alone
    buf = io.StringIO()
    df.iloc[perm].to_csv(buf)
    back = pd.read_csv(io.StringIO(buf.getvalue()), index_col="unit")
    np.testing.assert_array_equal(sim.noise(back).to_numpy(), u.iloc[perm].to_numpy())
    do = {"x2": 0.5}
    np.testing.assert_allclose(sim.counterfactual(back, do).to_numpy(),
                               sim.counterfactual(df, do).iloc[perm].to_numpy(), rtol=1e-12)
    # units from two seeds in one frame
    both = pd.concat([df.iloc[:3], sim.sample(3, seed=12)])
    assert sim.noise(both).shape == (6, 4)


def test_foreign_units_are_refused_with_their_id():
    sim = scm("chain")
    df = sim.sample(10, seed=0)
    with pytest.raises(DataError, match=r"unit 0 was not produced by scm\('chain'"):
        sim.counterfactual(df.reset_index(drop=True), do={"x1": 0.0})
    other = scm("chain", additive=False).sample(3, seed=0)
    with pytest.raises(DataError, match="chain-nonadd:0:0"):
        sim.noise(other)
    mixed = pd.concat([df.iloc[:2], other.iloc[:1]])
    with pytest.raises(DataError, match="1 of 3 rows"):
        sim.noise(mixed)
    with pytest.raises(DataError, match="lack column"):
        sim.counterfactual(df.drop(columns="x3"), do={"x1": 0.0})
    with pytest.raises(DataError, match="missing value"):
        sim.counterfactual(df.assign(x2=np.nan), do={"x1": 0.0})


# --------------------------------------------------------------------------- counterfactuals
@pytest.mark.parametrize("name,additive", ALL, ids=IDS)
def test_null_intervention_returns_factual_exactly(name, additive):
    sim = _sim(name, additive)
    df = sim.sample(300, seed=5)
    for v in sim.graph.topological_order[:4]:
        pd.testing.assert_frame_equal(sim.counterfactual(df, {v: df[v].to_numpy()}), df,
                                      check_exact=True)
        pd.testing.assert_frame_equal(sim.counterfactual(df, {v: lambda a: a}), df,
                                      check_exact=True)


@pytest.mark.parametrize("name,additive", ALL, ids=IDS)
def test_counterfactual_changes_only_descendants(name, additive):
    sim = _sim(name, additive)
    df = sim.sample(400, seed=1)
    target = MIDDLE[name]
    cf = sim.counterfactual(df, do={target: 1.5})
    assert cf.index.equals(df.index) and list(cf.columns) == list(df.columns)
    assert (cf[target] == 1.5).all()
    desc = sim.graph.descendants(target)
    assert desc
    for v in df.columns:
        if v == target:
            continue
        if v in desc:  # a real change (almost surely, in almost every row)
            assert (cf[v] != df[v]).mean() > 0.9, v
        else:  # ancestors and other non-descendants: the factual value, exactly
            assert (cf[v] == df[v]).all(), v
    # each row is the unit's own counterfactual: recomputing on a slice agrees
    sub = df.iloc[::7]
    pd.testing.assert_frame_equal(sim.counterfactual(sub, do={target: 1.5}), cf.iloc[::7])


def test_chain_counterfactual_matches_hand_computation():
    sim = scm("chain", additive=True)
    df = sim.sample(20, seed=2)
    u = sim.noise(df)
    cf = sim.counterfactual(df, do={"x1": 1.0})
    for i in (0, 7, 13):
        u1, u2, u3 = (float(u[c].iloc[i]) for c in ("x1", "x2", "x3"))
        # factual: x1 = u1, x2 = (exp(x1/2) + u2/4) / 0.65, x3 = ((x2-5)^3/15 + u3) / 2.13
        x2 = (math.exp(u1 / 2) + u2 / 4) / 0.65
        assert df["x1"].iloc[i] == u1
        assert df["x2"].iloc[i] == pytest.approx(x2, rel=1e-12)
        x2_cf = (math.exp(0.5) + u2 / 4) / 0.65
        x3_cf = ((x2_cf - 5) ** 3 / 15 + u3) / 2.13
        assert cf["x2"].iloc[i] == pytest.approx(x2_cf, rel=1e-12)
        assert cf["x3"].iloc[i] == pytest.approx(x3_cf, rel=1e-12)


def test_nonadditive_chain_counterfactual_matches_hand_computation():
    sim = scm("chain", additive=False)
    df = sim.sample(20, seed=2)
    u = sim.noise(df)
    cf = sim.counterfactual(df, do={"x1": -0.5})
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    for i in (1, 9):
        u2, u3 = float(u["x2"].iloc[i]), float(u["x3"].iloc[i])
        x2_cf = math.exp((-0.5 + u2) / 2)
        x3_cf = 2 * math.tanh(x2_cf - 1.5) + (0.2 + 2 * sig(x2_cf - 1.5)) * u3
        assert cf["x2"].iloc[i] == pytest.approx(x2_cf, rel=1e-12)
        assert cf["x3"].iloc[i] == pytest.approx(x3_cf, rel=1e-12)


def test_callable_uses_the_units_own_noise_under_counterfactual_parents():
    sim = scm("chain", additive=True)
    df = sim.sample(50, seed=0)
    u = sim.noise(df)
    # x2 alone shifted: current = factual x2
    cf = sim.counterfactual(df, do={"x2": lambda v: v + 1.0})
    np.testing.assert_allclose(cf["x2"], df["x2"] + 1.0, rtol=1e-12)
    np.testing.assert_allclose(cf["x3"], ((cf["x2"] - 5) ** 3 / 15 + u["x3"]) / 2.13, rtol=1e-12)
    # x1 set as well: current x2 is computed from u2 under x1 = 1
    cf2 = sim.counterfactual(df, do={"x1": 1.0, "x2": lambda v: v + 1.0})
    np.testing.assert_allclose(cf2["x2"], (np.exp(0.5) + u["x2"] / 4) / 0.65 + 1.0, rtol=1e-12)
    # a per-row array
    vals = np.linspace(-1, 1, 50)
    np.testing.assert_array_equal(sim.counterfactual(df, do={"x1": vals})["x1"], vals)


def test_intervention_errors():
    sim = scm("triangle")
    df = sim.sample(10)
    with pytest.raises(InterventionError, match="unknown variable 'x9'"):
        sim.counterfactual(df, do={"x9": 1.0})
    with pytest.raises(InterventionError, match="3 values for 10 rows"):
        sim.counterfactual(df, do={"x1": [1.0, 2.0, 3.0]})
    with pytest.raises(InterventionError, match="numbers"):
        sim.sample(5, do={"x2": "high"})
    with pytest.raises(InterventionError, match="finite"):
        sim.sample(5, do={"x2": np.nan})


# --------------------------------------------------------------------------- interventions
def test_interventional_means_match_analytic_values():
    n = 40_000
    sim = scm("chain", additive=True)
    # do(x1 = 1): E[x2] = exp(1/2) / 0.65 (u2 has mean 0); sd(x2) = 1/(4 * 0.65)
    d = sim.sample(n, seed=0, do={"x1": 1.0})
    assert (d["x1"] == 1.0).all()
    assert d["x2"].mean() == pytest.approx(math.exp(0.5) / 0.65, abs=4 * 0.385 / math.sqrt(n))
    # do(x2 = 2): E[x3] = ((2 - 5)^3 / 15) / 2.13; sd(x3) = 1 / 2.13
    d = sim.sample(n, seed=1, do={"x2": 2.0})
    assert d["x3"].mean() == pytest.approx(-27 / 15 / 2.13, abs=4 / 2.13 / math.sqrt(n))
    # non-additive chain, do(x1 = 1): x2 = exp(1/2) exp(u2/2), lognormal mean exp(1/2 + 1/8)
    d = scm("chain", additive=False).sample(n, seed=2, do={"x1": 1.0})
    assert d["x2"].mean() == pytest.approx(math.exp(0.625), abs=4 * 1.0 / math.sqrt(n))


def test_interventional_mean_matches_monte_carlo_of_the_equations():
    """E[x4 | do(x2 = 1)] in the non-additive diamond, by an independent Monte Carlo."""
    sim = scm("diamond", additive=False)
    n = 40_000
    rng = np.random.default_rng(123)
    u1, u3, u4 = rng.standard_normal((3, n))
    x1 = u1
    x2 = np.ones(n)
    x3 = sim.evaluate("x3", {"x1": x1, "x2": x2}, u3)
    x4 = sim.evaluate("x4", {"x2": x2, "x3": x3}, u4)
    d = sim.sample(n, seed=9, do={"x2": 1.0})
    se = math.sqrt(x4.var() * 2 / n)
    assert d["x4"].mean() == pytest.approx(x4.mean(), abs=4 * se)
    assert d["x4"].std() == pytest.approx(x4.std(), rel=0.03)
    # shift intervention: x1 = u1 + 1 exactly
    s = sim.sample(100, seed=4, do={"x1": lambda a: a + 1.0})
    np.testing.assert_allclose(s["x1"], sim.noise(s)["x1"] + 1.0, rtol=0, atol=1e-15)
    # the per-row array form
    arr = np.arange(100.0) / 50
    np.testing.assert_array_equal(sim.sample(100, seed=4, do={"x3": arr})["x3"], arr)


# --------------------------------------------------------------------------- mechanisms
def _residual_gaps(sim: TabularSCM) -> dict[str, float]:
    """Per non-root variable: mean |true counterfactual - additive-residual prediction|,
    when its parents move from one unit's values to another's."""
    a, b = sim.sample(3000, seed=0), sim.sample(3000, seed=1)
    u = sim.noise(a)
    gaps = {}
    for v in sim.graph.topological_order:
        if not sim.graph.parents(v):
            continue
        pa = {p: a[p].to_numpy() for p in sim.graph.parents(v)}
        pb = {p: b[p].to_numpy() for p in sim.graph.parents(v)}  # counterfactual parents
        true = sim.evaluate(v, pb, u[v].to_numpy())
        residual = a[v].to_numpy() - sim.evaluate(v, pa, 0.0)
        gaps[v] = float(np.mean(np.abs(true - (sim.evaluate(v, pb, 0.0) + residual))))
    return gaps


@pytest.mark.parametrize("name", ["chain", "triangle", "diamond", "y", "ladder"])
def test_additive_variants_are_additive_and_nonadditive_are_not(name):
    add = _residual_gaps(scm(name, additive=True))
    nonadd = _residual_gaps(scm(name, additive=False))
    assert add and set(add) == set(nonadd)
    assert max(add.values()) < 1e-9, add             # the residual trick is exact ...
    assert min(nonadd.values()) > 0.1, nonadd        # ... and wrong for the other variant


@pytest.mark.parametrize("name", ["chain", "triangle", "diamond", "y", "ladder"])
def test_nonadditive_equations_strictly_increase_in_their_noise(name):
    sim = scm(name, additive=False)
    rng = np.random.default_rng(0)
    grid = np.linspace(-4, 4, 161)
    for v in sim.graph.topological_order:
        parents = sim.graph.parents(v)
        if not parents:
            continue
        k = 100  # parent configurations, well beyond the observational range
        pa = {p: np.repeat(rng.uniform(-5, 5, size=(k, 1)), grid.size, axis=1) for p in parents}
        x = sim.evaluate(v, pa, np.broadcast_to(grid, (k, grid.size)))
        assert np.all(np.diff(x, axis=1) > 0), v


def test_evaluate_checks_its_inputs():
    sim = scm("y")
    with pytest.raises(DataError, match="x2"):
        sim.evaluate("x3", {"x1": 0.0}, 0.0)
    with pytest.raises(MedCausalError, match="unknown variable"):
        sim.evaluate("x7", {}, 0.0)
