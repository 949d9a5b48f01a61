"""The collapsed-VAE ceiling of the brain benchmark: its estimator on known answers."""

import numpy as np
import pytest

from medcausal.cohort import Cohort
from medcausal.synthetic.brain import BrainMRI


def test_a_patients_own_noise_gives_the_true_counterfactual(load_benchmark):
    # With the patient as its own (only) donor, the paired change is the true change exactly.
    bench = load_benchmark("brain_collapsed_ceiling")
    sim = BrainMRI(shape=(32, 32))
    test = sim.sample(3, seed=1)
    true = sim.counterfactual(test, do={"age": lambda a: a + 20.0})
    change = bench.conditional_mean_change(sim, test, test.table, true.table, k=1)
    assert change.shape == (3, 1, 1, 32, 32) and np.abs(change).max() > 0.05
    np.testing.assert_allclose(test.arrays["mri"] + change[:, 0], true.arrays["mri"], atol=1e-6)
    # k > 1, each patient's donors being the patient repeated: every donor column must hold that
    # patient's own true change (a wrong donor layout, e.g. tiled instead of repeated, mixes patients).
    rows = np.repeat(np.arange(3), 3)
    repeated = Cohort(test.table.iloc[rows].reset_index(drop=True), {"mri": test.arrays["mri"][rows]},
                      id_column="id")
    change3 = bench.conditional_mean_change(sim, repeated, test.table, true.table, k=3)
    for j in range(3):
        np.testing.assert_allclose(test.arrays["mri"] + change3[:, j], true.arrays["mri"], atol=1e-6)
    # Unchanged parents: no change, whoever the donors are.
    donors = sim.sample(6, seed=7)
    assert np.abs(bench.conditional_mean_change(sim, donors, test.table, test.table, k=2)).max() == 0


def test_writes_its_report(tmp_path, load_benchmark):
    report = load_benchmark("brain_collapsed_ceiling").main(
        ["--size", "32", "--n-test", "4", "--k", "1", "2", "--out", str(tmp_path), "--stem", "c"])
    assert [r["query"] for r in report["rows"]] == ["age+20", "disease flip", "sex flip", "scanner next"]
    assert set(report["mean_collapsed_mae"]) == {"1", "2"}
    assert (tmp_path / "c.md").read_text().count("| age+20 |") == 1 and (tmp_path / "c.json").exists()


def test_refuses_a_donor_count_below_one(tmp_path, load_benchmark, capsys):
    with pytest.raises(SystemExit):
        load_benchmark("brain_collapsed_ceiling").main(["--size", "32", "--n-test", "2", "--k", "0",
                                                        "--out", str(tmp_path)])
    assert "--k: every donor count must be >= 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_own_pose_renders_each_donor_at_its_patients_pose(load_benchmark):
    # Donor j belongs to patient j // k: its pose columns become that patient's, everything else
    # (bias field, lesion sites, acquisition noise) stays the donor's.
    bench = load_benchmark("brain_collapsed_ceiling")
    sim = BrainMRI(shape=(32, 32))
    patients, donors = sim.sample(2, seed=1), sim.sample(6, seed=7)
    n_pose = sim.n_pose_params
    pose = sim.noise(patients).arrays["mri_params"][:, :n_pose].astype(np.float64)
    posed = bench.OwnPose(sim.shape, pose, donor_seed=7, k=3)
    own, plain = posed.noise(donors).arrays["mri_params"], sim.noise(donors).arrays["mri_params"]
    np.testing.assert_array_equal(own[:, :n_pose], np.repeat(pose, 3, axis=0).astype(np.float32))
    np.testing.assert_array_equal(own[:, n_pose:], plain[:, n_pose:])
    assert not np.array_equal(own[:, :n_pose], plain[:, :n_pose])
    # the patients themselves (another seed) keep their own draws
    np.testing.assert_array_equal(posed.noise(patients).arrays["mri_params"], sim.noise(patients).arrays["mri_params"])
    # and the pose reaches the rendering: the same donors and parents give other scans
    assert np.abs(posed.render(donors.table) - sim.render(donors.table)).max() > 0.05
