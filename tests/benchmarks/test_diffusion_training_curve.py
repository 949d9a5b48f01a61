"""The diffusion training-curve benchmark at toy size: its bookkeeping, and that fit() keeps
each denoiser's last epoch (no best-epoch restore) and each preconditioner member's best."""

import json


def test_toy_run(tmp_path, load_benchmark):
    mod = load_benchmark("diffusion_training_curve")
    result = mod.main(["--scm", "chain", "--variant", "additive", "--every", "1", "--n-train", "300",
                       "--n-units", "20", "--max-epochs", "3", "--out", str(tmp_path)])
    assert [p["epoch"] for p in result["points"]] == [0, 1, 2] and result["epochs"] == 3
    # the denoisers' weights kept are the last epoch's; the preconditioner members', each its best
    kept = result["best_epochs"]
    assert {k for k in kept if k.endswith("/denoiser")} == {"x1/denoiser", "x2/denoiser", "x3/denoiser"}
    assert all(e == 2 for k, e in kept.items() if k.endswith("/denoiser"))
    assert sum(k.startswith("x2/loc_scale.") for k in kept) == 5 and all(0 <= e <= 2 for e in kept.values())
    best = result["best_val_epoch_per_mechanism"]
    for name, epoch in best.items():
        vals = [p["val_parts"][name] for p in result["points"]]
        assert vals[epoch] == min(vals)
    stem = tmp_path / "diffusion_training_curve_chain_additive"
    assert json.loads(stem.with_suffix(".json").read_text())["epochs"] == 3
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
