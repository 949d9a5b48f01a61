"""benchmarks/diffusion_latent_bound.py: re-answers the protocol's queries with saved models."""

import argparse
import json
import math

import pytest
import torch

import medcausal as mc


@pytest.mark.slow  # 22 s
def test_bounds_are_compared_on_the_same_saved_models(tmp_path, load_benchmark, saved_chain_fits):
    bench, script = load_benchmark("tabular_scm"), load_benchmark("diffusion_latent_bound")
    models, sim, (train, qs, factual, truth) = saved_chain_fits
    script.main(["--models", str(models), "--scms", "chain", "--variants", "additive",
                 "--bounds", "none", "5", "0.5", "--boxes", "on", "off", "--out", str(tmp_path)])
    row, = json.loads((tmp_path / "diffusion_latent_bound.json").read_text())["rows"]
    loaded = mc.CausalModel.load(bench.model_path(models, "chain", "additive", "diffusion", 0))
    # the default bound's column is what tabular_scm.py reports for that model
    assert loaded.mechanism("x2").latent_bound == 5.0
    assert row["diffusion_bound_5"] == pytest.approx(script.cf_mse_x100(loaded, sim, qs, factual, truth), rel=1e-6)
    # a bound every unit's latent exceeds changes the answers; "none" is the unclamped encoding
    assert row["diffusion_bound_0.5"] != pytest.approx(row["diffusion_no_bound"], rel=1e-3)
    script.with_guards(loaded, None)
    assert loaded.mechanism("x3").latent_bound is None
    assert row["diffusion_no_bound"] == pytest.approx(script.cf_mse_x100(loaded, sim, qs, factual, truth), rel=1e-6)
    script.with_guards(loaded, 5.0, box=False)
    assert not loaded.mechanism("x3").training_box
    assert row["diffusion_bound_5_no_box"] == pytest.approx(script.cf_mse_x100(loaded, sim, qs, factual, truth),
                                                            rel=1e-6)
    # a model saved without the box gets the one fit records: finalize on every training row
    box = {n: (loaded.mechanism(n).box_lo.clone(), loaded.mechanism(n).box_hi.clone()) for n in ("x2", "x3")}
    assert all(torch.isfinite(lo).all() for lo, _ in box.values())
    for n in box:
        loaded.mechanism(n).box_lo.fill_(-math.inf)
        loaded.mechanism(n).box_hi.fill_(math.inf)
    refit_rows = train.iloc[:500]  # the rows the model was fitted on
    script.record_box(loaded, refit_rows)
    for n, (lo, hi) in box.items():
        torch.testing.assert_close(loaded.mechanism(n).box_lo, lo)
        torch.testing.assert_close(loaded.mechanism(n).box_hi, hi)
    md = (tmp_path / "diffusion_latent_bound.md").read_text()
    assert "1.2 x flow" in md and "diffusion_bound_5" in md


def test_a_missing_model_protocol_or_bad_bound_is_named(tmp_path, load_benchmark):
    bench, script = load_benchmark("tabular_scm"), load_benchmark("diffusion_latent_bound")
    args = ["--models", str(tmp_path), "--scms", "chain", "--variants", "additive", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="protocol.json"):
        script.main(args)
    bench.save_protocol(tmp_path, 5000, 200, 5)
    with pytest.raises(SystemExit, match="chain_additive_flow_seed0.pt"):
        script.main(args)
    for bad in ("0", "-1", "nan", "inf", "five"):
        with pytest.raises(argparse.ArgumentTypeError, match="latent bound"):
            script._bound(bad)
