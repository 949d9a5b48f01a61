"""The tabular benchmark's target verdicts (no model is trained: rows are given)."""

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("tabular_scm")


def _row(scm, variant, method, mse, fit=10.0):
    return {"scm": scm, "variant": variant, "method": method, "cf_mse_x100": mse, "fit_s": fit, "fit_cpu_s": fit,
            "s_per_1000_cf": 0.1, "cpu_s_per_1000_cf": 0.1}


def test_vector_best_column_is_judged_only_against_columns_that_ran(bench):
    alone = bench.check_targets([_row("vector", "non-additive", "diffusion", 7.0)])
    assert not [v for v in alone if "best" in v["target"]]  # nothing to compare with: no verdict
    both = bench.check_targets([_row("vector", "non-additive", "diffusion", 7.0),
                                _row("vector", "non-additive", "flow", 6.0)])
    (best,) = [v for v in both if "best" in v["target"]]
    assert best["met"] is False and "flow" in best["target"]


def test_diffusion_within_1_2x_flow_on_scalar_scms(bench):
    rows = [_row("triangle", "non-additive", "diffusion", 2.48), _row("triangle", "non-additive", "flow", 1.90),
            _row("chain", "additive", "diffusion", 0.25), _row("chain", "additive", "flow", 0.84)]
    verdicts = {(v["scm"], v["target"]): v["met"] for v in bench.check_targets(rows)}
    assert verdicts[("triangle", "diffusion CF MSE <= 1.2 x flow")] is False  # 2.48 > 2.28
    assert verdicts[("chain", "diffusion CF MSE <= 1.2 x flow")] is True


def test_several_fit_seeds_are_judged_on_their_means(bench):
    rows = []
    for seed, (d, f) in enumerate([(2.0, 2.0), (3.0, 2.0), (1.0, 2.0)]):  # diffusion mean 2.0 <= 1.2 x 2.0
        rows += [{**_row("y", "additive", "diffusion", d), "fit_seed": seed},
                 {**_row("y", "additive", "flow", f), "fit_seed": seed}]
    means = bench.seed_means(__import__("pandas").DataFrame(rows)).set_index("method")
    assert means.loc["diffusion", "cf_mse_x100"] == pytest.approx(2.0)
    assert means.loc["diffusion", "cf_mse_x100_sd"] == pytest.approx(1.0)
    assert means.loc["diffusion", "n_seeds"] == 3
    (v,) = [v for v in bench.check_targets(rows) if v["target"] == "diffusion CF MSE <= 1.2 x flow"]
    assert v["met"] is True  # seed 1 alone (3.0 vs 2.4) would miss


def test_in_training_range_flags_rows_outside_any_training_column(bench):
    import pandas as pd
    train = pd.DataFrame({"x1": [-1.0, 0.0, 2.0], "x3[0]": [0.0, 1.0, 5.0]})
    rows = pd.DataFrame({"x1": [-1.0, 2.5, 0.0, 0.5], "x3[0]": [5.0, 1.0, -0.1, 3.0], "extra": [9.0] * 4})
    assert bench.in_training_range(rows, train).tolist() == [True, False, False, True]
