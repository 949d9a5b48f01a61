"""Review tests: bad input to the simulators gets a clear medcausal error; edge cases work."""

import numpy as np
import pytest

from medcausal.errors import DataError, InterventionError, MedCausalError
from medcausal.synthetic.perturbseq import PerturbSeq


@pytest.fixture(scope="module")
def sim():
    return PerturbSeq(n_genes=8, n_perturbations=3, combinations=["P0+P1"], seed=0)


@pytest.fixture(scope="module")
def cells(sim):
    return sim.sample(20, seed=0)


# --------------------------------------------------------------------- PerturbSeq
def test_duplicate_combinations_are_rejected_by_name():
    # "P1+P0" is the same combination as "P0+P1": listing both used to give a duplicated
    # condition and then a GraphError from sim.graph
    with pytest.raises(MedCausalError, match="P1\\+P0"):
        PerturbSeq(n_genes=5, n_perturbations=2, combinations=["P0+P1", "P1+P0"], seed=0)


def test_single_combination_string_is_one_label():
    sim = PerturbSeq(n_genes=5, n_perturbations=2, combinations="P1+P0", seed=0)
    assert sim.conditions == ["control", "P0", "P1", "P0+P1"]
    assert sim.fingerprint == PerturbSeq(n_genes=5, n_perturbations=2, combinations=["P0+P1"],
                                         seed=0).fingerprint


def test_sample_conditions_as_one_string(sim):
    a = sim.sample(6, seed=0, conditions="P1+P0")
    assert a.obs["perturbation"].astype(str).unique().tolist() == ["P0+P1"]


@pytest.mark.parametrize("seed", [1.5, -1, None, "0", True, 10**18])
def test_constructor_seed_must_be_an_integer(seed):
    with pytest.raises(MedCausalError, match="seed"):
        PerturbSeq(n_genes=5, seed=seed)


def test_constructor_numpy_seed_is_the_int_seed():
    a = PerturbSeq(n_genes=5, seed=np.int64(3))
    assert a.fingerprint == PerturbSeq(n_genes=5, seed=3).fingerprint


@pytest.mark.parametrize("kwargs, name", [
    ({"hard_fraction": "x"}, "hard_fraction"),
    ({"control_fraction": None}, "control_fraction"),
    ({"dose_levels": 1.0}, "dose_levels"),
    ({"dose_levels": "ab"}, "dose_levels"),
    ({"library_size": float("nan")}, "library_size"),
    ({"library_size": float("inf")}, "library_size"),
    ({"library_size": "big"}, "library_size"),
    ({"dispersion": float("nan")}, "dispersion"),
])
def test_constructor_bad_numbers_name_the_argument(kwargs, name):
    with pytest.raises(MedCausalError, match=name):
        PerturbSeq(n_genes=5, **kwargs)


@pytest.mark.parametrize("dose", [float("nan"), -1.0, "abc", None])
def test_obs_with_bad_dose_is_a_data_error(sim, cells, dose):
    bad = cells.copy()
    bad.obs["dose"] = dose
    for call in (lambda: sim.expected_counts(bad),
                 lambda: sim.counterfactual(bad, do={"perturbation": "P2"})):
        with pytest.raises(DataError, match="dose"):
            call()


def test_do_dose_not_a_number_is_an_intervention_error(sim, cells):
    with pytest.raises(InterventionError, match="dose"):
        sim.counterfactual(cells, do={"dose": "abc"})


def test_sample_exclude_must_be_pairs(sim):
    with pytest.raises(MedCausalError, match="exclude"):
        sim.sample(5, exclude=["CT0"])


def test_counterfactual_on_reordered_subset_uses_each_cells_own_noise(sim, cells):
    sub = cells[[7, 2, 11]].copy()
    full = sim.counterfactual(cells, do={"perturbation": "P2", "dose": 1.0})
    part = sim.counterfactual(sub, do={"perturbation": "P2", "dose": 1.0})
    assert np.array_equal(full[[7, 2, 11]].X.toarray(), part.X.toarray())
    same = sim.counterfactual(sub, do={"perturbation": sub.obs["perturbation"].to_numpy(),
                                       "dose": sub.obs["dose"].to_numpy()})
    assert (same.X != sub.X).nnz == 0


# --------------------------------------------------------------------- BrainMRI
@pytest.fixture(scope="module")
def brain():
    from medcausal.synthetic.brain import BrainMRI
    sim = BrainMRI(shape=(16, 16))
    return sim, sim.sample(3, seed=0)


@pytest.mark.parametrize("column, value", [("sex", 0.5), ("disease", 3), ("disease", -1)])
def test_brain_table_binary_columns_must_be_0_or_1(brain, column, value):
    sim, cohort = brain
    table = cohort.table.assign(**{column: value})
    with pytest.raises(DataError, match=column):
        sim.counterfactual(table, do={"age": 70.0})
    with pytest.raises(DataError, match=column):
        sim.render(table)


def test_brain_table_binary_columns_as_floats_still_work(brain):
    sim, cohort = brain
    table = cohort.table.assign(sex=cohort.table["sex"].astype(float))
    assert np.array_equal(sim.render(table), cohort.arrays["mri"])


@pytest.mark.parametrize("kwargs, name", [({"shape": (16.5, 16)}, "shape"),
                                          ({"batch_size": "a"}, "batch_size"),
                                          ({"batch_size": 2.5}, "batch_size")])
def test_brain_constructor_rejects_non_integers(kwargs, name):
    from medcausal.synthetic.brain import BrainMRI
    with pytest.raises(MedCausalError, match=name):
        BrainMRI(**kwargs)
