"""The supervised-ceiling reference of the perturb-seq benchmark: its scorer on known answers."""

import numpy as np
from sklearn.linear_model import LinearRegression

def test_cross_validated_correlation_on_known_answers(load_benchmark):
    bench = load_benchmark("perturbseq_ceiling")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3))
    # factor 0 is a linear function of the features (r = 1); factor 1 is independent noise (r ~ 0)
    target = np.column_stack([x @ np.array([1.0, -2.0, 0.5]), rng.normal(size=600)])
    r = bench._cv_corr(LinearRegression(), x, target)
    assert r[0] > 0.9999 and abs(r[1]) < 0.15  # 3 sd of a null correlation over 600 rows is ~0.12


def test_writes_its_report(tmp_path, load_benchmark):
    report = load_benchmark("perturbseq_ceiling").main(["--n-cells", "300", "--out", str(tmp_path)])
    assert {r["block"] for r in report["rows"]} == {"z_context", "z_treatment", "z_interaction"}
    assert (tmp_path / "perturbseq_ceiling.md").read_text().count("| z_interaction |") == 3


def test_another_simulator_gets_its_own_files(tmp_path, load_benchmark):
    report = load_benchmark("perturbseq_ceiling").main(["--n-cells", "300", "--sim-seed", "1", "--library-size",
                                                        "5000", "--out", str(tmp_path)])
    assert "library_size=5000," in report["meta"]["simulator"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perturbseq_ceiling_sim1_lib5000.json",
                                                          "perturbseq_ceiling_sim1_lib5000.md"]
