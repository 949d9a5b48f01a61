"""benchmarks/diffusion_query_variants_tried.py: other query-time answers, on the same saved models."""

import json

import pytest
import torch

import medcausal as mc
from medcausal.mechanisms.diffusion import DiffusionMechanism


@pytest.mark.slow  # 13 s
def test_variants_answer_with_the_same_saved_models_and_the_default_is_restored(tmp_path, load_benchmark,
                                                                               saved_chain_fits):
    bench, script = load_benchmark("tabular_scm"), load_benchmark("diffusion_query_variants_tried")
    guards = load_benchmark("diffusion_latent_bound")
    models, sim, (train, qs, factual, truth) = saved_chain_fits
    default_query = DiffusionMechanism._query
    script.main(["--models", str(models), "--scms", "chain", "--variants", "additive", "--out", str(tmp_path)])
    assert DiffusionMechanism._query is default_query
    row, = json.loads((tmp_path / "diffusion_query_variants_tried.json").read_text())["rows"]
    loaded = mc.CausalModel.load(bench.model_path(models, "chain", "additive", "diffusion", 0))
    assert row["box"] == pytest.approx(guards.cf_mse_x100(loaded, sim, qs, factual, truth), rel=1e-6)
    assert "nearest+clamp_mu" in (tmp_path / "diffusion_query_variants_tried.md").read_text()


def test_nearest_shows_a_training_row_its_own_conditioning_and_clamp_mu_bounds_the_location(load_benchmark):
    script = load_benchmark("diffusion_query_variants_tried")
    torch.manual_seed(0)
    m = DiffusionMechanism(mc.graph.Continuous(), 1, hidden=[8], init_scale=1.0, loc_scale_hidden=[8])
    pa = torch.randn(50, 1)
    with torch.no_grad():
        m.finalize(torch.zeros(50, 1), pa)
        mu, log_sigma = m._affine(pa)
        m.training_conditioning = torch.cat([mu, log_sigma], -1)
        q_mu, q_log_sigma, cond = script._variant_query("nearest")(m, pa)
        torch.testing.assert_close(cond, m.training_conditioning)
        torch.testing.assert_close(q_mu, mu)
        torch.testing.assert_close(q_log_sigma, log_sigma)
        far = torch.full((3, 1), 50.0)  # far beyond the training rows: the location is extrapolated
        raw_mu = m._affine(far)[0]
        assert ((raw_mu < m.box_lo[0]) | (raw_mu > m.box_hi[0])).all()
        c_mu, _, _ = script._variant_query("box+clamp_mu")(m, far)
        assert ((c_mu >= m.box_lo[0]) & (c_mu <= m.box_hi[0])).all()
