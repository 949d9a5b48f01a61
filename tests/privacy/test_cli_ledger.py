"""Accounting helpers, the ledger text, and the ``info`` / ``audit`` commands."""

import argparse
import json
import math
import warnings
from pathlib import Path

import pytest

import medcausal as mc
from medcausal.privacy import Privacy, PrivacyError, format_ledger, ledger
from medcausal.privacy.cli import add_commands


def test_calibrated_noise_meets_the_target_and_matches_opacus():
    from opacus.accountants.utils import get_noise_multiplier

    sigma = ledger.calibrate_noise(target_epsilon=2.0, delta=1e-5, sample_rate=0.02, steps=500)
    eps = ledger.epsilon_of([(sigma, 0.02, 500)], 1e-5)
    assert 1.99 <= eps <= 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.02, steps=500,
                                   accountant="rdp", epsilon_tolerance=0.01)
    # Opacus stops within 0.01 of the target; our grid of RDP orders is coarser: within 3%
    assert sigma == pytest.approx(ref, rel=0.03)


def test_more_noise_less_epsilon_and_composition_adds_up():
    e = [ledger.epsilon_of([(s, 0.05, 200)], 1e-5) for s in (0.8, 1.0, 1.5, 3.0)]
    assert e == sorted(e, reverse=True)
    one = ledger.epsilon_of([(20.0, 1.0, 1)], 1e-5)
    two = ledger.epsilon_of([(20.0, 1.0, 2)], 1e-5)
    assert one < two < 2 * one  # RDP composition is sub-additive


def test_gaussian_mechanism_epsilon_is_within_the_classical_bound():
    # the classical analytic bound: sigma >= sqrt(2 ln(1.25/delta)) / eps for eps < 1
    delta, eps = 1e-5, 0.5
    sigma = math.sqrt(2 * math.log(1.25 / delta)) / eps
    assert ledger.epsilon_of([(sigma, 1.0, 1)], delta) <= eps


def test_group_privacy_rule():
    g = ledger.group_privacy(0.5, 1e-6, 4)
    assert g["epsilon"] == 2.0 and g["delta"] == pytest.approx(4 * math.exp(1.5) * 1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sim = mc.synthetic.scm("chain")
    train, held = sim.sample(300, seed=0), sim.sample(200, seed=1)
    root = tmp_path_factory.mktemp("runs")
    plain = mc.CausalModel(sim.graph).fit(train, max_epochs=2, verbose=False)
    plain.save(root / "plain" / "model.mcm")
    dp = mc.CausalModel(sim.graph).fit(train, max_epochs=2, batch_size=100, verbose=False, privacy=Privacy(
        noise_multiplier=1.0, delta=1e-4, standardize="bounds",
        public_bounds={"x1": (-5, 5), "x2": (-2, 15), "x3": (-15, 15)}))
    dp.save(root / "dp" / "model.mcm")
    train.to_csv(root / "members.csv", index=False)
    held.to_csv(root / "non_members.csv", index=False)
    return root, dp


def _run(argv):
    p = argparse.ArgumentParser(prog="medcausal")
    sub = p.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_info_prints_the_ledger_or_says_not_private(runs, capsys):
    root, dp = runs
    assert _run(["info", str(root / "plain")]) == 0
    out = capsys.readouterr().out
    assert "NOT differentially private" in out and "opacus" in out and "torch" in out
    assert _run(["info", str(root / "dp")]) == 0
    out = capsys.readouterr().out
    for word in ("accountant", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "n_records",
                 f"{dp.privacy['epsilon']:.4g}", "trained with"):
        assert word in out
    with pytest.raises(mc.MedCausalError, match="does not exist"):
        _run(["info", str(root / "nope")])


def test_audit_command_reports_auc_and_writes_json(runs, capsys):
    root, dp = runs
    out_json = root / "audit.json"
    assert _run(["audit", str(root / "dp"), "--members", str(root / "members.csv"), "--non-members",
                 str(root / "non_members.csv"), "--n-synthetic", "300", "--out", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "AUC" in out and "loss" in out and "dcr" in out and "DP bound" in out
    result = json.loads(out_json.read_text())
    assert set(result["attacks"]) == {"loss", "dcr"} and result["epsilon"] == dp.privacy["epsilon"]
    for a in result["attacks"].values():
        assert 0 <= a["auc_ci"][0] <= a["auc"] <= a["auc_ci"][1] <= 1


def test_format_ledger_shows_group_privacy():
    led = {"epsilon": 1.0, "delta": 1e-6, "privacy_unit": "row", "accountant": "rdp",
           "group_privacy": {"unit": "donor", "group_size": 3, "epsilon": 3.0, "delta": 2e-5}}
    assert "per donor: (3, 2e-05)" in format_ledger(led)


def test_unreachable_budget_is_a_clear_error():
    with pytest.raises(PrivacyError, match="cannot be reached"):
        ledger.calibrate_noise(target_epsilon=1e-4, delta=1e-5, sample_rate=1.0, steps=10**6)


def test_fit_command_trains_under_a_privacy_profile(tmp_path, capsys):
    """`medcausal fit RECIPE --privacy PROFILE --privacy PUBLIC` trains under DP and says so."""
    from medcausal.cli import main

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    assert main(["fit", str(root / "cohorts" / "triangle.toml"), "--out", str(out), "--max-epochs", "1",
                 "--quiet", "--privacy", str(root / "privacy" / "eps8.toml"),
                 "--privacy", str(root / "cohorts" / "triangle.public.toml")]) == 0
    printed = capsys.readouterr().out
    ledger = mc.CausalModel.load(out / "model.mcm").privacy
    assert ledger is not None and ledger["epsilon"] <= 8.0 + 1e-6 and ledger["n_records"] == 5000
    assert "-DP per" in printed
    assert main(["sample", str(out), "-n", "5", "--out", str(tmp_path / "s.csv")]) == 0
    assert f"({ledger['epsilon']:.3g}," in capsys.readouterr().out


def test_prv_calibration_searches_below_the_rdp_noise_only(monkeypatch):
    """PRV at the generic bracket's low end (noise 0.05) allocated ~10 GiB at eps 8, q 0.02, 500 steps."""
    real = ledger.epsilon_of
    seen = []

    def spy(history, delta, accountant="rdp"):
        if accountant == "prv" and history:
            seen.append(min(h[0] for h in history))
        return real(history, delta, accountant)

    monkeypatch.setattr(ledger, "epsilon_of", spy)
    rdp = ledger.calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.02, steps=500)
    prv = ledger.calibrate_noise(target_epsilon=8.0, delta=1e-5, sample_rate=0.02, steps=500, accountant="prv")
    assert min(seen) >= rdp / 2 - 1e-12
    assert prv <= rdp and real([(prv, 0.02, 500)], 1e-5, "prv") <= 8.0
    assert real([(prv * 0.99, 0.02, 500)], 1e-5, "prv") > 8.0  # the smallest that meets the target, to 1%
