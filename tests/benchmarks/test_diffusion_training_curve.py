"""The diffusion training-curve benchmark at toy size: its bookkeeping, and that a diffusion
model's counterfactuals at the end of fit() are those of its last epoch (no best-epoch restore)."""

import json

import pytest


def test_toy_run(tmp_path, load_benchmark):
    mod = load_benchmark("diffusion_training_curve")
    result = mod.main(["--scm", "chain", "--variant", "additive", "--every", "1", "--n-train", "300",
                       "--n-units", "20", "--max-epochs", "3", "--out", str(tmp_path)])
    assert [p["epoch"] for p in result["points"]] == [0, 1, 2] and result["epochs"] == 3
    # the weights kept are the last epoch's: the same counterfactuals
    assert result["final_cf_mse_x100"] == pytest.approx(result["points"][-1]["cf_mse_x100"], rel=1e-6)
    best = result["best_val_epoch_per_mechanism"]
    for name, epoch in best.items():
        vals = [p["val_parts"][name] for p in result["points"]]
        assert vals[epoch] == min(vals)
    stem = tmp_path / "diffusion_training_curve_chain_additive"
    assert json.loads(stem.with_suffix(".json").read_text())["epochs"] == 3
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
