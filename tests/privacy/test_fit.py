"""``CausalModel.fit(privacy=...)``: the ledger, the budget, the privacy unit, private preprocessing."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.cohort import Cohort
from medcausal.errors import DataError, MedCausalError
from medcausal.mechanisms.flow import FlowMechanism
from medcausal.privacy import Privacy, PrivacyError, PrivacyWarning, format_ledger
from medcausal.privacy import engine, ledger, stats

from conftest import repeated_visits

BOUNDS = {"x1": (-5, 5), "x2": (-2, 15), "x3": (-15, 15)}
FAST = dict(max_epochs=2, batch_size=512, verbose=False)
N = 3000


@pytest.fixture(scope="module")
def chain():
    sim = mc.synthetic.scm("chain")
    return sim, sim.sample(N, seed=0)


@pytest.fixture(scope="module")
def dp_model(chain):
    sim, df = chain
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        return mc.CausalModel(sim.graph).fit(df, seed=0, privacy=Privacy(epsilon=2.0, public_bounds=BOUNDS), **FAST)


def test_ledger_meets_the_target_and_covers_every_access(dp_model):
    led = dp_model.privacy
    assert led["dp"] is True and led["mode"] == "target-epsilon"
    assert 2.0 * 0.97 <= led["epsilon"] <= 2.0  # calibrated to the target, never above it
    assert led["delta"] == 1e-5 and led["n_records"] == N and led["privacy_unit"] == "row"
    assert led["steps"] == 2 * math.ceil(N / 512) and led["sample_rate"] == 1 / math.ceil(N / 512)
    assert led["expected_batch_size"] == pytest.approx(N / math.ceil(N / 512))  # Poisson: 500, not 512
    # the history is the DP statistics (standardization) + the DP-SGD steps, one accountant
    stats_entry, sgd = led["history"]
    assert stats_entry[1] == 1.0 and stats_entry[2] == 1
    assert sgd == [led["noise_multiplier"], led["sample_rate"], led["steps"]]
    assert led["epsilon"] == pytest.approx(ledger.epsilon_of(led["history"], led["delta"]), rel=1e-9)
    assert ledger.epsilon_of([sgd], led["delta"]) < led["epsilon"]  # the statistics cost budget too
    for key in ("accountant", "noise_multiplier", "max_grad_norm", "versions", "preprocessing", "scope"):
        assert key in led
    json.dumps(led)  # pure JSON


def test_no_loss_curve_is_released(dp_model):
    assert all(set(h) == {"epoch", "steps", "lr"} for h in dp_model.history)
    assert dp_model.fit_info["best_val_loss"] is None


def test_ledger_is_saved_in_the_model_file(dp_model, chain, tmp_path):
    path = dp_model.save(tmp_path / "m.mcm")
    loaded = mc.CausalModel.load(path)
    assert loaded.privacy == json.loads(json.dumps(dp_model.privacy))
    out = loaded.sample(5, seed=0)
    assert out.attrs["privacy"]["epsilon"] == dp_model.privacy["epsilon"]
    cf = loaded.counterfactual(chain[1].iloc[:3], do={"x1": 0.0})
    assert cf.attrs["privacy"]["epsilon"] == dp_model.privacy["epsilon"]
    # a counterfactual's rows reveal their input rows: its attrs say the guarantee does not cover them
    assert "input row" in cf.attrs["privacy"]["covers"] and "every row" in out.attrs["privacy"]["covers"]
    assert "differentially private" in format_ledger(loaded.privacy)
    assert loaded.history == dp_model.history  # epochs, steps and learning rate only: no losses


def test_non_private_model_says_so(chain, tmp_path):
    sim, df = chain
    m = mc.CausalModel(sim.graph).fit(df.iloc[:100], max_epochs=1, verbose=False)
    assert m.privacy is None and m.sample(3, seed=0).attrs["privacy"] is None
    assert mc.CausalModel.load(m.save(tmp_path / "m.mcm")).privacy is None
    assert "NOT differentially private" in format_ledger(None)


def test_fixed_noise_mode_reports_its_epsilon(chain):
    sim, df = chain
    m = mc.CausalModel(sim.graph).fit(df, privacy=Privacy(noise_multiplier=1.0, public_bounds=BOUNDS,
                                                           standardize="bounds"), **FAST)
    led = m.privacy
    assert led["noise_multiplier"] == 1.0 and led["target_epsilon"] is None
    assert led["history"] == [[1.0, led["sample_rate"], led["steps"]]]  # no DP statistics with "bounds"
    assert led["epsilon"] == pytest.approx(ledger.epsilon_of(led["history"], led["delta"]))
    assert m.codecs["x1"].state["loc"] == [0.0] and m.codecs["x1"].state["scale"] == [2.5]


def test_dp_standardization_is_skipped_when_n_is_too_small_for_it(chain):
    sim, df = chain
    plan = engine.prepare(Privacy(epsilon=2.0, public_bounds=BOUNDS), df.iloc[:300], sim.graph, {},
                          batch_size=100, max_epochs=1, max_steps=None)
    assert plan.history == [] and "skipped" in plan.preprocessing["standardization"]
    assert plan.codecs["x2"].state["loc"] == [6.5]  # from the bounds (-2, 15)


def test_delta_at_least_one_over_n_is_refused_unless_forced(chain):
    sim, df = chain
    small = df.iloc[:50]
    p = dict(public_bounds=BOUNDS, standardize="bounds")
    with pytest.raises(PrivacyError, match="1/N"):
        mc.CausalModel(sim.graph).fit(small, privacy=Privacy(epsilon=5, delta=0.05, **p), **FAST)
    with pytest.warns(PrivacyWarning, match="force=True"):
        m = mc.CausalModel(sim.graph).fit(small, privacy=Privacy(epsilon=5, delta=0.05, force=True, **p),
                                          **FAST)
    assert m.privacy["delta"] == 0.05


def test_private_constants_need_public_declarations():
    g = mc.CausalGraph({"age": "continuous", "stage": "categorical", "sbp": "continuous"},
                       edges=[("age", "sbp"), ("stage", "sbp")])
    df = pd.DataFrame({"age": [50.0, 60, 70, 80], "stage": ["a", "b", "a", "b"], "sbp": [120.0, 130, 125, 140]})
    with pytest.raises(PrivacyError) as e:
        mc.CausalModel(g).fit(df, privacy=Privacy(epsilon=1, delta=1e-3, public_bounds={"age": (18, 100)}))
    msg = str(e.value)
    assert "'sbp'" in msg and "public bounds" in msg and "'stage'" in msg and "categories" in msg
    with pytest.raises(PrivacyError, match="unknown variable"):
        mc.CausalModel(g).fit(df, privacy=Privacy(epsilon=1, delta=1e-3, public_bounds={
            "age": (18, 100), "sbp": (80, 200), "bmi": (10, 60)}))


def test_values_outside_public_bounds_are_clipped_with_a_warning():
    g = mc.CausalGraph({"x": "continuous"})
    df = pd.DataFrame({"x": [-5.0, 0.0, 0.5, 9.0]})
    privacy = Privacy(noise_multiplier=1.0, delta=1e-3, public_bounds={"x": (-1, 1)}, standardize="bounds")
    with pytest.warns(PrivacyWarning, match="2 value"):
        plan = engine.prepare(privacy, df, g, {}, batch_size=4, max_epochs=1, max_steps=None)
    assert plan.data["x"].tolist() == [-1.0, 0.0, 0.5, 1.0]
    assert df["x"].tolist() == [-5.0, 0.0, 0.5, 9.0]  # the caller's data are untouched


def test_dp_standardization_is_close_to_the_true_moments():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x": rng.normal(40.0, 8.0, 20000)})
    g = mc.CausalGraph({"x": "continuous"})
    plan = engine.prepare(Privacy(epsilon=4.0, public_bounds={"x": (0, 100)}, noise_seed=0), df, g, {},
                          batch_size=512, max_epochs=1, max_steps=None)
    loc, scale = plan.codecs["x"].state["loc"][0], plan.codecs["x"].state["scale"][0]
    # noise multiplier z ~ 9.9 for 10% of eps=4: sd of the mean z * sqrt(2) * 50 / N ~ 0.035, of the
    # scale ~ 0.12 (through the noisy second moment); 0.5 is > 4 sd of either (noise pinned anyway)
    assert abs(loc - df["x"].mean()) < 0.5 and abs(scale - df["x"].std()) < 0.5
    assert plan.history[0][1:] == [1.0, 1] and plan.dp_statistics
    assert ledger.epsilon_of(plan.history, plan.delta) == pytest.approx(0.4, rel=0.01)  # stats_share


def test_a_positive_variable_is_standardized_on_its_log_from_public_bounds():
    # declared positive, the model works on log(x): the private constants must be on that scale
    # too (with the raw bounds the codec would standardize log values by the raw range)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"crp": np.exp(rng.normal(1.0, 0.5, 20000))})
    g = mc.CausalGraph({"crp": mc.graph.Continuous(positive=True)})
    plan = engine.prepare(Privacy(epsilon=4.0, public_bounds={"crp": (0.1, 100)}, noise_seed=0), df, g, {},
                          batch_size=512, max_epochs=1, max_steps=None)
    state = plan.codecs["crp"].state
    assert abs(state["loc"][0] - 1.0) < 0.1 and abs(state["scale"][0] - 0.5) < 0.1  # log-scale moments
    assert state["min"] == [0.1] and state["max"] == [100]  # the raw bounds, for the support check
    bounds = engine.prepare(Privacy(epsilon=4.0, public_bounds={"crp": (0.1, 100)}, standardize="bounds"), df, g,
                            {}, batch_size=512, max_epochs=1, max_steps=None).codecs["crp"].state
    assert bounds["loc"][0] == pytest.approx((math.log(0.1) + math.log(100)) / 2)
    with pytest.raises(PrivacyError, match=r"public_bounds of 'crp': \[0.0, 100.0\] must lie above 0"):
        engine.prepare(Privacy(epsilon=4.0, public_bounds={"crp": (0, 100)}), df, g, {}, batch_size=512,
                       max_epochs=1, max_steps=None)


def test_secure_mode_cannot_be_seeded():
    g = mc.CausalGraph({"x": "continuous"})
    df = pd.DataFrame({"x": np.linspace(0, 1, 10)})
    kw = dict(epsilon=1.0, delta=1e-3, secure_mode=True, public_bounds={"x": (0, 1)})
    with pytest.raises(PrivacyError, match="cannot be seeded"):
        engine.prepare(Privacy(noise_seed=0, **kw), df, g, {}, batch_size=4, max_epochs=1, max_steps=None)
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        with pytest.raises(PrivacyError, match="torchcsprng"):
            engine.prepare(Privacy(**kw), df, g, {}, batch_size=4, max_epochs=1, max_steps=None)


def test_the_dp_noise_is_fresh_unless_pinned_and_never_stored(tmp_path):
    # fit(seed=...) is stored in the model file (and 0 by default): if it seeded the noise, anyone
    # with the file and the other records could replay both neighbouring worlds exactly.
    g = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    df = repeated_visits(100, 1)[["x", "y"]]

    def fit(**extra):
        p = Privacy(noise_multiplier=1.0, delta=1e-3, standardize="bounds",
                    public_bounds={"x": (-4, 4), "y": (-12, 12)}, **extra)
        m = mc.CausalModel(g, mechanisms="additive").fit(df, max_epochs=1, batch_size=20, verbose=False,
                                                         privacy=p, seed=0)
        return m, torch.cat([v.flatten() for v in m.mechanisms.state_dict().values()])

    (a, wa), (b, wb) = fit(), fit()
    assert not torch.equal(wa, wb)  # same fit seed, fresh noise
    assert a.fit_info["seed"] == 0 and a.privacy["noise"] == "fresh OS entropy, not stored"
    (c, wc), (_, wd) = fit(noise_seed=7), fit(noise_seed=7)
    torch.testing.assert_close(wc, wd)  # pinned for tests: reproducible, and the ledger says so
    assert "pinned" in c.privacy["noise"] and c.privacy["settings"]["noise_seed"] == "pinned (withheld)"
    saved = c.save(tmp_path / "m.mcm").read_bytes()
    assert b'"noise_seed": 7' not in saved


def test_unit_column_makes_a_patient_one_record():
    g = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    df = repeated_visits()
    p = Privacy(noise_multiplier=1.0, delta=1e-3, unit_column="patient", standardize="bounds",
                public_bounds={"x": (-4, 4), "y": (-12, 12)})
    m = mc.CausalModel(g).fit(df, max_epochs=1, batch_size=10, verbose=False, privacy=p)
    led = m.privacy
    assert led["n_records"] == 40 and "patient" in led["privacy_unit"]
    # the row count (and the fit's time, which grows with it) would tell a patient's number of rows
    assert led["n_rows"] is None and m.fit_info["n_rows"] is None and m.fit_info["seconds"] is None
    assert led["sample_rate"] == 0.25 and led["group_privacy"] is None
    with pytest.raises(DataError, match="did you mean 'patient'"):
        mc.CausalModel(g).fit(df, privacy=Privacy(noise_multiplier=1.0, delta=1e-3, unit_column="patien",
                                                  public_bounds=p.public_bounds))


def test_row_level_dp_on_multi_row_units_needs_force_and_reports_group_privacy():
    g = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    df = repeated_visits()
    kw = dict(noise_multiplier=1.0, delta=1e-4, unit_column="patient", row_level=True, standardize="bounds",
              public_bounds={"x": (-4, 4), "y": (-12, 12)})
    # the conversion is for a declared public bound, never the data's own maximum
    with pytest.raises(PrivacyError, match="declare max_rows_per_unit"):
        mc.CausalModel(g).fit(df, max_epochs=1, verbose=False, privacy=Privacy(force=True, **kw))
    with pytest.raises(PrivacyError, match="more than max_rows_per_unit=2"):
        mc.CausalModel(g).fit(df, max_epochs=1, verbose=False, privacy=Privacy(force=True, max_rows_per_unit=2, **kw))
    with pytest.raises(PrivacyError, match="up to 4 rows per unit"):
        mc.CausalModel(g).fit(df, max_epochs=1, verbose=False, privacy=Privacy(max_rows_per_unit=4, **kw))
    with pytest.warns(PrivacyWarning, match="group_privacy"):
        m = mc.CausalModel(g).fit(df, max_epochs=1, batch_size=30, verbose=False,
                                  privacy=Privacy(force=True, max_rows_per_unit=4, **kw))
    led = m.privacy
    assert led["privacy_unit"] == "row" and led["n_records"] == 120
    gp = led["group_privacy"]
    assert gp["unit"] == "patient" and gp["group_size"] == 4  # the declared bound; the data have 3
    assert gp["epsilon"] == pytest.approx(4 * led["epsilon"])
    assert gp["delta"] == pytest.approx(min(1.0, 4 * math.exp(3 * led["epsilon"]) * led["delta"]))


def test_repeated_cohort_ids_and_single_cells_need_a_unit():
    g = mc.CausalGraph({"x": "continuous"})
    cohort = Cohort(pd.DataFrame({"id": [1, 1, 2, 2], "x": [0.1, 0.2, 0.3, 0.4]}))
    p = dict(noise_multiplier=1.0, delta=1e-3, public_bounds={"x": (0, 1)}, standardize="bounds")
    args = dict(batch_size=2, max_epochs=1, max_steps=None)
    with pytest.raises(PrivacyError, match="unit_column='id'"):
        engine.prepare(Privacy(**p), cohort, g, {}, **args)
    assert engine.prepare(Privacy(unit_column="id", **p), cohort, g, {}, **args).n_records == 2

    gc = mc.CausalGraph({"drug": "binary", "expr": mc.Expression(5)}, edges=[("drug", "expr")])
    cells = Cohort(pd.DataFrame({"donor": ["a", "a", "b", "c"], "drug": [0, 1, 0, 1]}),
                   {"expr": np.ones((4, 5))})
    q = dict(noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(PrivacyError, match="donor"):
        engine.prepare(Privacy(**q), cells, gc, {}, **args)
    plan = engine.prepare(Privacy(unit_column="donor", **q), cells, gc, {}, **args)
    assert plan.n_records == 3 and plan.rows_of(torch.tensor([0]))[0].tolist() == [0, 1]
    with pytest.warns(PrivacyWarning, match="cell-level"):
        assert engine.prepare(Privacy(force=True, **q), cells, gc, {}, **args).n_records == 4


def test_additive_noise_model_is_finalized_privately(chain):
    sim, df = chain
    m = mc.CausalModel(sim.graph, mechanisms="additive").fit(
        df, privacy=Privacy(epsilon=3.0, public_bounds=BOUNDS), **FAST)
    led = m.privacy
    assert len(led["dp_statistics"]) == 4  # standardization + one residual query per variable
    assert led["history"][0][2] == 1 and [h[1] for h in led["history"]].count(1.0) == 4
    assert led["epsilon"] <= 3.0
    q = m.mechanism("x2").residual_quantiles[:, 0].double()
    z = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(len(q), dtype=torch.float64) + 0.5) / len(q))
    slope, intercept = np.polyfit(z.numpy(), q.numpy(), 1)
    assert np.allclose(q.numpy(), intercept + slope * z.numpy(), atol=1e-5)  # Gaussian, not data quantiles


def test_mechanisms_that_read_data_without_a_private_version_are_refused():
    class Leaky(FlowMechanism):
        name = "leaky"

        def finalize(self, value, parents):
            self.data_max = value.max()

    with pytest.raises(PrivacyError, match="'leaky'.*finalize"):
        stats.private_finalizer(Leaky)

    class Opt(FlowMechanism):
        name = "opted-out"
        dp_compatible = False
        dp_incompatible_reason = "its sampler memorizes training rows"

    g = mc.CausalGraph({"x": "continuous"})
    df = pd.DataFrame({"x": np.linspace(0, 1, 10)})
    with pytest.raises(PrivacyError, match="memorizes"):
        engine.prepare(Privacy(epsilon=1.0, delta=1e-3, public_bounds={"x": (0, 1)}), df, g, {"x": Opt},
                       batch_size=4, max_epochs=1, max_steps=None)


def test_tiny_batches_with_empty_poisson_draws_still_train():
    g = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    df = repeated_visits(12, 1)
    m = mc.CausalModel(g, mechanisms="additive").fit(
        df[["x", "y"]], max_epochs=3, batch_size=1, verbose=False,
        privacy=Privacy(noise_multiplier=0.8, delta=1e-3, standardize="bounds",
                        public_bounds={"x": (-4, 4), "y": (-12, 12)}))
    assert m.privacy["steps"] == 36 and m.privacy["sample_rate"] == pytest.approx(1 / 12)


def test_target_epsilon_too_small_for_the_statistics_is_refused():
    with pytest.raises(PrivacyError, match="cannot be reached|statistics alone"):
        ledger.calibrate_noise(target_epsilon=0.5, delta=1e-5, sample_rate=0.5, steps=10,
                               prior=[[0.5, 1.0, 1]])


@pytest.mark.parametrize("mode", ["vmap", "ghost"])
def test_physical_batches_give_the_same_model_as_whole_logical_batches(mode):
    """BatchMemoryManager only splits the work: same Poisson batches, same clipping, same noise."""
    g = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    df = repeated_visits(300, 1)[["x", "y"]]
    weights = []
    for physical in (None, 16):
        p = Privacy(noise_multiplier=1.0, delta=1e-4, standardize="bounds", grad_sample_mode=mode,
                    physical_batch_size=physical, public_bounds={"x": (-4, 4), "y": (-12, 12)}, noise_seed=3)
        m = mc.CausalModel(g, mechanisms="additive").fit(df, max_epochs=2, batch_size=60, verbose=False,
                                                         privacy=p, seed=3)
        assert m.privacy["grad_sample_mode"] == mode and m.privacy["steps"] == 10
        weights.append(torch.cat([v.flatten() for v in m.mechanisms.state_dict().values()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)


def test_a_private_model_file_holds_the_declared_categories_not_the_datas():
    # a pandas categorical column's dtype lists the categories present; the private codec must keep
    # the declared list, or a rare category would reveal whether its holder trained the model
    g = mc.CausalGraph({"dx": mc.Categorical(("common", "other", "rare_disease")), "y": "continuous"},
                       edges=[("dx", "y")])
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"dx": pd.Categorical(rng.choice(["common", "other"], 60)), "y": rng.normal(size=60)})
    m = mc.CausalModel(g, mechanisms={"y": "additive"}).fit(
        df, max_epochs=1, batch_size=20, verbose=False,
        privacy=Privacy(noise_multiplier=1.0, delta=1e-3, standardize="bounds", public_bounds={"y": (-4, 4)}))
    assert m.codecs["dx"].state["dtype_categories"] == ["common", "other", "rare_disease"]


def test_a_binary_category_column_trains_privately_and_keeps_no_labels():
    # it used to crash (Binary has no categories); the labels a column holds are data, not public
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"smoker": pd.Categorical(rng.choice(["False", "True"], 60)), "x": rng.normal(size=60)})
    g = mc.CausalGraph({"smoker": "binary", "x": "continuous"}, edges=[("smoker", "x")])
    p = Privacy(noise_multiplier=1.0, delta=1e-3, public_bounds={"x": (-4, 4)})
    m = mc.CausalModel(g).fit(df, max_epochs=1, batch_size=10, verbose=False, privacy=p)
    assert m.privacy["n_rows"] == 60  # one row per record: the row count is N, public
    assert set(np.asarray(m.sample(50, seed=0)["smoker"], dtype=float)) <= {0.0, 1.0}


def test_the_ledger_is_tied_to_the_weights_it_describes(tmp_path):
    from medcausal.errors import ModelFileError
    from medcausal.io import save_model_file
    from medcausal.privacy import PrivacyError

    rng = np.random.default_rng(0)
    x = rng.normal(size=80)
    df = pd.DataFrame({"x": x, "y": 2 * x + rng.normal(size=80)})
    g = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    p = Privacy(noise_multiplier=1.0, delta=1e-3, public_bounds={"x": (-4, 4), "y": (-12, 12)})
    m = mc.CausalModel(g).fit(df, max_epochs=1, batch_size=10, verbose=False, privacy=p)
    m.save(tmp_path / "dp.mcm")  # untouched weights: saved with their ledger
    assert mc.CausalModel.load(tmp_path / "dp.mcm").privacy["epsilon"] == m.privacy["epsilon"]
    assert m.sample(5, seed=0).attrs["privacy"]["epsilon"] == m.privacy["epsilon"]
    with torch.no_grad():  # as a mechanism retrained without privacy= would
        next(m.mechanisms.parameters()).add_(0.1)
    with pytest.raises(PrivacyError, match="no longer describes"):
        m.save(tmp_path / "changed.mcm")
    assert not (tmp_path / "changed.mcm").exists()
    assert m.sample(5, seed=0).attrs["privacy"] is None  # its outputs claim no guarantee
    assert m.dp_ledger() is None and m.privacy is not None
    # nor do simulate's and augment's provenance, nor the audit's DP bound (they read the stale ledger)
    sim = mc.simulate(m, 4, seed=0)
    assert sim["synth_epsilon"].isna().all() and sim.attrs["medcausal"]["epsilon"] is None
    assert sim.attrs["medcausal"]["privacy"] is None
    from medcausal.privacy.audit import audit
    assert audit(m, df.iloc[:40], df.iloc[40:], attacks=["loss"]).epsilon is None
    save_model_file(tmp_path / "forged.mcm", m.spec(), m.mechanisms.state_dict())  # ledger + other weights
    with pytest.raises(ModelFileError, match="other weights"):
        mc.CausalModel.load(tmp_path / "forged.mcm")
    m.privacy = None  # saved as what it now is: a non-private model
    assert mc.CausalModel.load(m.save(tmp_path / "plain.mcm")).privacy is None


def test_a_private_fit_checks_its_settings_before_planning(chain):
    sim, df = chain
    with pytest.raises(MedCausalError, match="batch_size must be >= 1"):  # was a bare ZeroDivisionError
        mc.CausalModel(sim.graph).fit(df, seed=0, privacy=Privacy(epsilon=2.0, public_bounds=BOUNDS),
                                      max_epochs=1, batch_size=0, verbose=False)


def test_a_private_model_keeps_no_fit_time(dp_model):
    # timing is a side channel DP does not cover: a row-level DP model file used to keep it
    assert dp_model.privacy["privacy_unit"] == "row" and dp_model.fit_info["seconds"] is None
    assert dp_model.fit_info["n_rows"] == N


@pytest.mark.parametrize("n, batch", [(930, 10), (49, 1)])
def test_training_samples_and_accounts_exactly_the_planned_rate_and_steps(n, batch):
    """Opacus rounds int(1 / (1 / 93)) down to 92 steps an epoch and accounted 1/92 (the ledger
    overshot its target: 1.0108 for a target of 1.0), and truncated the expected batch of 49 records
    in batches of 1 to 0 (training diverged) and of 98 in batches of 2 to 1."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=n)
    df = pd.DataFrame({"x": x, "y": 2 * x + rng.normal(size=n)})
    g = mc.CausalGraph({"x": "continuous", "y": "continuous"}, edges=[("x", "y")])
    p = Privacy(epsilon=1.0, delta=1e-3, public_bounds={"x": (-4, 4), "y": (-12, 12)}, force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyWarning)
        m = mc.CausalModel(g, mechanisms="additive").fit(df, max_epochs=2, batch_size=batch, verbose=False,
                                                         privacy=p)
    led, per_epoch = m.privacy, math.ceil(n / batch)
    assert led["steps"] == m.fit_info["steps"] == 2 * per_epoch
    assert led["sample_rate"] == 1 / per_epoch
    sgd = [h for h in led["history"] if h[1] != 1.0]  # the DP statistics are the rate-1 entries
    assert sum(h[2] for h in sgd) == 2 * per_epoch and all(h[1] == 1 / per_epoch for h in sgd)
    assert led["epsilon"] <= 1.0 + 1e-9
    assert all(torch.isfinite(q).all() for q in m.mechanisms.parameters())


def test_the_dp_optimizer_averages_by_the_planned_expected_batch():
    # Opacus's int(98 * (1 / 49)) = 1: the update of 98 records in batches of 2 was doubled
    class Sq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, batch):
            return (self.w * batch["x"]).pow(2).sum(-1)

    m = Sq()
    plan = engine.PrivatePlan(privacy=Privacy(noise_multiplier=1.0, grad_sample_mode="vmap"), codecs={}, data=None,
                              seed=0, delta=1e-5, n_rows=98, n_records=98, record_of_row=np.arange(98),
                              unit_label="row", batch_size=2, sample_rate=1 / 49, steps_per_epoch=49, steps=49,
                              noise_multiplier=0.0, stats_noise_multiplier=None)
    session = plan.attach(m, torch.optim.SGD(m.parameters(), lr=1.0), {"x": torch.ones(98, 1)})
    try:
        assert session.optimizer.expected_batch_size == pytest.approx(2.0)
        assert len(session.loader) == 49
    finally:
        session.close()
