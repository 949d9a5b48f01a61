"""The perturb-seq benchmark's harness, checked against the simulator's ground truth.

No model is trained here: the harness is fed the two reference "predictions" it reports
beside the models (the simulator's true counterfactual and the unchanged controls), whose
scores are known exactly or bounded.
"""

import numpy as np
import pytest

from medcausal.synthetic.perturbseq import PerturbSeq, parse_perturbation

pytest.importorskip("scanpy")


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("perturbseq")


@pytest.fixture(scope="module")
def sim():
    return PerturbSeq(n_genes=60, seed=0)


def test_held_out_conditions_are_disjoint(bench, sim):
    combos, (cell_type, single) = bench._held_out(sim)
    assert combos == sim.combinations[:2] and cell_type == sim.cell_types[-1]
    members = {m for c in combos for m in parse_perturbation(c)}
    assert single in sim.perturbations and single not in members


def test_true_counterfactual_scores_as_the_ceiling(bench, sim):
    combos, (cell_type, single) = bench._held_out(sim)
    controls = sim.sample(400, seed=1, conditions=["control"])
    targets = [(combos[0], "CT0"), (single, cell_type)]
    truth = bench._evaluate_queries(sim, "true-counterfactual", controls, targets, seed=2)
    same = bench._evaluate_queries(sim, "no-change", controls, targets, seed=2)
    for t, s in zip(truth, same):
        # the true counterfactual of the queried cells: zero per-cell error, perfectly correlated changes
        assert t["cf_rmse"] == 0.0 and t["cf_mae_counts"] == 0.0
        assert t["cf_delta_pearson"] == pytest.approx(1.0, abs=1e-12)
        # against an independent true sample only finite-sample noise is left (~130 cells a side)
        assert t["r2_mean_all"] > 0.95
        # the unchanged controls predict no change at all, and do worse
        assert s["cf_delta_pearson"] == 0.0
        assert s["r2_mean_all"] < t["r2_mean_all"] and s["cf_rmse"] > 0.1
    summary, pair_row = bench._summaries(truth, combos)
    assert summary["cf_rmse"] == 0.0 and pair_row["condition"] == single


def test_true_factors_match_themselves(bench, sim):
    cells = sim.sample(300, seed=3)
    rep = bench._representation(sim, "true-factors", cells)
    for block in ("context", "treatment", "interaction"):
        assert rep[block][f"mcc_{block}"] == pytest.approx(1.0, abs=1e-9)
    # the treatment block clusters by treatment far more than the context block does (the context
    # factors are drawn independently of the treatment; with 17 labels and 300 cells, chance NMI is ~0.17)
    assert rep["treatment"]["nmi_treatment"] > rep["context"]["nmi_treatment"] + 0.2
    assert rep["context"]["nmi_context"] > rep["treatment"]["nmi_context"] + 0.3


def test_true_factors_carry_their_own_within_condition_variation(bench, sim):
    cells = sim.sample(600, seed=3)
    within = bench._within_condition("true-factors", cells)
    assert set(within) == {"context", "treatment", "interaction", "all blocks"}
    for block in ("context", "treatment", "interaction"):
        # each true block holds its own factors exactly and none of the others' (independent noise
        # within a condition; out-of-fold ridge R² of unrelated factors stays near 0)
        assert within[block][block] > 0.999 and within["all blocks"][block] > 0.999
        assert all(abs(within[block][other]) < 0.1 for other in within[block] if other != block)


def test_linear_readout_bounds_by_what_the_code_holds(bench, sim):
    cells = sim.sample(600, seed=3)
    # the true factors read themselves exactly out of sample; the programs, the factors pushed
    # through the program graph's tanh edges, only approximately
    truth = bench._linear_readout("true-factors", cells)
    assert all(truth[b] == pytest.approx(1.0, abs=1e-9) for b in ("context", "treatment", "interaction"))
    assert 0.5 < truth["programs"] < 0.999

    class Mixed:  # a code that mixes all true factors linearly, with the interaction factors dropped
        def get_latent_representation(self, cells):
            rng = np.random.default_rng(0)
            z = np.concatenate([cells.obsm["z_context"], cells.obsm["z_treatment"]], axis=1)
            return {"basal": z @ rng.normal(size=(z.shape[1], z.shape[1]))}

    r = bench._linear_readout(Mixed(), cells)
    # an invertible mixing is undone by the affine map; dropped factors are only predicted through
    # their condition means (shared with the other blocks), far below 1
    assert r["context"] > 0.999 and r["treatment"] > 0.999 and r["interaction"] < 0.8


def test_mlp_readout_undoes_a_nonlinear_code(bench, sim):
    cells = sim.sample(600, seed=3)

    class Warped:  # the true factors through an invertible elementwise z + z^3 / 3, interaction factors dropped
        def get_latent_representation(self, cells):
            z = np.concatenate([cells.obsm["z_context"], cells.obsm["z_treatment"]], axis=1)
            return {"basal": z + z ** 3 / 3}

    linear, mlp = bench._linear_readout(Warped(), cells), bench._mlp_readout(Warped(), cells)
    # the warp defeats an affine map (0.95 / 0.88 with seed 0) but not the MLP (0.99 / 0.99, fitted
    # on 420 cells); the dropped block stays unreadable for both (about 0.3)
    assert mlp["context"] > 0.97 and mlp["treatment"] > 0.97
    assert linear["context"] < mlp["context"] - 0.03 and linear["treatment"] < mlp["treatment"] - 0.03
    assert mlp["interaction"] < 0.5 and linear["interaction"] < 0.5


def test_targets_are_read_against_the_thresholds(bench):
    def model(deg, allg, mcc_tx, nmi_x, nmi_xt):
        return {"held_out_combinations_mean": {"r2_mean_deg": deg, "r2_mean_all": allg},
                "representation": {"interaction": {"mcc_interaction": mcc_tx},
                                   "context": {"nmi_context": nmi_x, "nmi_treatment": nmi_xt}}}

    report = {"models": {"fcr": model(0.8, 0.94, 0.79, 0.85, 0.1),
                         "latent-shift": model(0.9, 0.5, 0.0, 0.0, 0.0)}}
    met = [t["met"] for t in bench._targets(report)]
    # deg >= 0.8, deg > base, all >= 0.95, all > base, MCC >= 0.8, NMI_x >= 0.85, NMI_xt <= 0.1
    assert met == [True, False, False, True, False, True, True]
    assert bench._targets({"models": {"latent-shift": report["models"]["latent-shift"]}}) == []


def test_result_stem_names_the_simulator_seed(bench):
    # seed 0 keeps the committed file names; another simulator never overwrites them
    assert bench.result_stem(False, 0) == "perturbseq" and bench.result_stem(True, 0) == "perturbseq_quick"
    assert bench.result_stem(False, 2) == "perturbseq_sim2" and bench.result_stem(True, 1) == "perturbseq_quick_sim1"
    assert bench.result_stem(False, 0, 10000.0) == "perturbseq_lib10000"
    assert bench.result_stem(False, 0, 1234567.0) == "perturbseq_lib1234567"  # no rounding to 6 digits
    assert bench.result_stem(False, 0, 2500.5) == "perturbseq_lib2500.5"
    assert bench.ceiling_stem(0) == "perturbseq_ceiling" and bench.ceiling_stem(1, 5e3) == "perturbseq_ceiling_sim1_lib5000"


@pytest.mark.parametrize("flags", [["--fit-seed", "1"], ["--rounds", "2"], ["--fcr-hparams", '{"beta": 2}']])
def test_protocol_changes_need_a_stem(bench, flags, tmp_path, capsys):
    # before any training: the run would otherwise overwrite the protocol's own result files
    with pytest.raises(SystemExit):
        bench.main([*flags, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert flags[0] in err and "--stem" in err
    assert not list(tmp_path.iterdir())
