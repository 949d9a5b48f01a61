"""benchmarks/diffusion_query_guards.py: re-answers the protocol's queries with saved models."""

import json

import pytest

import medcausal as mc


def test_bounds_are_compared_on_the_same_saved_models(tmp_path, load_benchmark):
    bench, script = load_benchmark("tabular_scm"), load_benchmark("diffusion_query_guards")
    sim = mc.synthetic.scm("chain", additive=True)
    train, qs, factual, truth = bench.protocol_data(sim)
    for method in ("flow", "diffusion"):  # barely trained: the script only needs saved models
        model = mc.CausalModel(sim.graph, mechanisms=method)
        model.fit(train, seed=0, max_steps=5, verbose=False)
        model.save(bench.model_path(tmp_path / "models", "chain", "additive", method, 0))
    script.main(["--models", str(tmp_path / "models"), "--scms", "chain", "--variants", "additive",
                 "--settings", "none/none", "5/0.1", "0.5/none", "none/0.001", "--out", str(tmp_path)])
    row, = json.loads((tmp_path / "diffusion_query_guards.json").read_text())["rows"]
    loaded = mc.CausalModel.load(bench.model_path(tmp_path / "models", "chain", "additive", "diffusion", 0))
    # the default setting's column is what the fitted model answers (fit recorded the same box)
    assert (loaded.mechanism("x2").latent_bound, loaded.mechanism("x2").range_margin) == (5.0, 0.1)
    assert row["diffusion_5/0.1"] == pytest.approx(script.cf_mse_x100(loaded, sim, qs, factual, truth), rel=1e-6)
    # guards every unit meets change the answers; none/none is the unguarded model
    assert row["diffusion_0.5/none"] != pytest.approx(row["diffusion_none/none"], rel=1e-3)
    script.with_guards(loaded, None, None)
    assert row["diffusion_none/none"] == pytest.approx(script.cf_mse_x100(loaded, sim, qs, factual, truth), rel=1e-6)
    md = (tmp_path / "diffusion_query_guards.md").read_text()
    assert "1.2 x flow" in md and "diffusion_5/0.1" in md


def test_a_missing_model_is_named(tmp_path, load_benchmark):
    script = load_benchmark("diffusion_query_guards")
    with pytest.raises(SystemExit, match="chain_additive_flow_seed0.pt"):
        script.main(["--models", str(tmp_path), "--scms", "chain", "--variants", "additive", "--out", str(tmp_path)])
