"""FCR and latent-shift count mechanisms: likelihood, abduction, structure, and that they learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from medcausal.errors import DataError, MedCausalError
from medcausal.graph import Continuous, Expression
from medcausal.mechanisms import registry
from medcausal.mechanisms.base import grad_reverse
from medcausal.mechanisms.fcr import FCRMechanism, LatentShiftMechanism, _group_permutation, _ParentLoss, nb_log_prob
from scipy.special import ndtr

from medcausal.synthetic.perturbseq import nb_cdf, nb_sf

PARENTS = {"cell_type": 3, "perturbation": 4}
SMALL = {"hidden": [32], "decoder_hidden": [32]}


def _parents(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ct = torch.randint(0, 3, (n,), generator=g)
    t = (torch.rand(n, 4, generator=g) < 0.3).float()
    return torch.cat([F.one_hot(ct, 3).float(), t], dim=1)


def test_registered_and_default_for_expression():
    assert registry.get("fcr") is FCRMechanism and registry.get("latent-shift") is LatentShiftMechanism
    assert registry.default_for("expression") == "fcr"
    assert FCRMechanism.abduction == "amortized" and FCRMechanism.reconstruction_tolerance == 0.0


def test_nb_log_prob_matches_scipy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 60, 500).astype(float)
    mu, theta = np.exp(rng.uniform(-3, 5, 500)), np.exp(rng.uniform(-1, 3, 500))
    ours = nb_log_prob(torch.tensor(y), torch.tensor(mu), torch.tensor(theta)).numpy()
    np.testing.assert_allclose(ours, stats.nbinom.logpmf(y, theta, theta / (theta + mu)), rtol=1e-5, atol=1e-6)


def test_group_permutation_stays_within_groups():
    torch.manual_seed(0)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[torch.randint(0, 2, (200,))]
    perm = _group_permutation(keys, 200, "cpu")
    assert sorted(perm.tolist()) == list(range(200))
    assert torch.equal(keys[perm], keys)
    assert (perm != torch.arange(200)).float().mean() > 0.9  # rows really move
    assert sorted(_group_permutation(None, 10, "cpu").tolist()) == list(range(10))


def test_group_permutation_never_mixes_distinct_treatments():
    # Dose-scaled multi-hot rows that a weighted sum maps to one number (1 * w1 == 0.5 * w4 for
    # w_i = sqrt(i)): each must stay its own group.
    torch.manual_seed(0)
    rows = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0.5], [1.0, 0, 1.0, 0], [0, 0, 0, 0]])
    keys = rows[torch.randint(0, 4, (400,))]
    for _ in range(5):
        assert torch.equal(keys[_group_permutation(keys, 400, "cpu")], keys)


def test_grad_reverse_and_parent_loss():
    x = torch.randn(5, 3, requires_grad=True)
    grad_reverse(x, 0.5).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, -x.detach())
    head = _ParentLoss(2, [("ct", slice(0, 3), True), ("dose", slice(3, 4), False)], (8,))
    z, pa = torch.randn(6, 2), torch.cat([F.one_hot(torch.arange(6) % 3, 3).float(), torch.randn(6, 1)], 1)
    out = head.net(z)
    expect = F.cross_entropy(out[:, :3], torch.arange(6) % 3, reduction="none") + (out[:, 3] - pa[:, 3]) ** 2
    torch.testing.assert_close(head(z, pa), expect)


@pytest.mark.parametrize("cls", [FCRMechanism, LatentShiftMechanism])
def test_abduction_is_a_pit_inside_the_count_interval(cls):
    torch.manual_seed(0)
    m = cls(Expression(25), PARENTS, treatment="perturbation", categorical=["cell_type"], **SMALL)
    pa = _parents()
    y = m.sample(pa, generator=torch.Generator().manual_seed(1))
    noise = m.abduct(y, pa, generator=torch.Generator().manual_seed(2))
    k = m.n_latent + 1
    assert noise.dtype == torch.float64 and noise.shape == (64, k + 25)
    z = noise[:, k:].numpy()
    mean = m.expected(pa, noise).double().numpy()
    theta = np.broadcast_to(m.log_theta.detach().exp().double().numpy(), z.shape)
    yy = y.double().numpy()
    lower = nb_cdf(yy - 1, mean, theta) < 0.5  # check each score where float64 resolves it
    u, s = ndtr(z), ndtr(-z)
    assert (nb_cdf(yy - 1, mean, theta) < u)[lower].all() and (u <= nb_cdf(yy, mean, theta))[lower].all()
    assert (nb_sf(yy, mean, theta) < s)[~lower].all() and (s <= nb_sf(yy - 1, mean, theta))[~lower].all()
    assert torch.equal(m.sample(pa, noise=noise), y)
    lib = torch.log(y.sum(1).clamp_min(1.0))
    loc, scale = m._lib_params(pa)
    torch.testing.assert_close(noise[:, m.n_latent].float(), (lib - loc) / scale, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [FCRMechanism, LatentShiftMechanism])
def test_abduction_draws_from_the_whole_count_interval(cls):
    # the draw used the middle 98% of each count's slice: the edges, where a small change of the
    # mean moves the count, were never drawn, so small effects mostly vanished from counterfactuals
    torch.manual_seed(0)
    m = cls(Expression(25), PARENTS, treatment="perturbation", categorical=["cell_type"], **SMALL)
    pa = _parents(400)
    y = m.sample(pa, generator=torch.Generator().manual_seed(1))
    noise = m.abduct(y, pa, generator=torch.Generator().manual_seed(2))
    z = noise[:, m.n_latent + 1:].numpy()
    mean = m.expected(pa, noise).double().numpy()
    theta = np.broadcast_to(m.log_theta.detach().exp().double().numpy(), z.shape)
    yy = y.double().numpy()
    lo, hi = nb_cdf(yy - 1, mean, theta), nb_cdf(yy, mean, theta)
    ok = (lo < 0.5) & (hi - lo > 1e-3)  # slices float64 resolves well
    v = (ndtr(z)[ok] - lo[ok]) / (hi - lo)[ok]  # where in its slice each draw fell: uniform
    edge = ((v < 0.01) | (v > 0.99)).mean()
    assert abs(edge - 0.02) < 4 * np.sqrt(0.02 * 0.98 / v.size)  # 4 sd around 2%, here ~0.3%
    assert torch.equal(m.sample(pa, noise=noise), y)


def test_a_score_at_the_edge_of_a_tiny_slice_still_gives_the_count_back():
    from medcausal.synthetic.perturbseq import nb_normal_score, nb_quantile_normal

    from medcausal.synthetic.perturbseq import nb_quantile

    y = np.array([0.0, 1.0, 3.0, 40.0, 400.0])  # F(399) = 1 - 7e-210: the upper half resolves it
    for v in (0.0, 1e-300, 0.5, 1.0):
        z = nb_normal_score(y, 2.0, 5.0, np.full(y.shape, v))
        assert nb_quantile_normal(z, 2.0, 5.0).tolist() == y.tolist()
    rng = np.random.default_rng(0)  # random means and dispersions, draws at the slice edges
    mu, th = np.exp(rng.uniform(-4, 7, 20000)), np.exp(rng.uniform(-2, 14, 20000))
    y = nb_quantile(rng.uniform(size=20000), mu, th)
    for v in (0.0, 1e-12, 1.0 - 1e-12, 1.0):
        assert (nb_quantile_normal(nb_normal_score(y, mu, th, np.full(y.shape, v)), mu, th) == y).all()


def test_abduction_resolves_counts_far_in_the_tails():
    """Counts a model finds absurdly large (F(y - 1) = 1 in float64) still come back exactly."""
    torch.manual_seed(0)
    m = FCRMechanism(Expression(25), PARENTS, **SMALL)
    pa = _parents(8)
    y = m.sample(pa, generator=torch.Generator().manual_seed(1))
    y[:, 3] = torch.tensor([500.0, 2000.0, 0.0, 1.0, 9000.0, 3.0, 750.0, 0.0])
    noise = m.abduct(y, pa, generator=torch.Generator().manual_seed(2))
    assert torch.equal(m.sample(pa, noise=noise), y)


def test_counterfactual_keeps_the_context_block():
    """A new treatment changes z_t and z_tx along their priors; z_x stays where it was."""
    torch.manual_seed(0)
    m = FCRMechanism(Expression(25), PARENTS, **SMALL)
    pa = _parents()
    y = m.sample(pa, generator=torch.Generator().manual_seed(1))
    noise = m.abduct(y, pa).float()
    new = pa.clone()
    new[:, 3:] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    kx, kt, _ = m.sizes
    mu0, lv0 = m._prior(pa)
    mu1, lv1 = m._prior(new)
    z0 = mu0 + (0.5 * lv0).exp() * noise[:, :m.n_latent]
    z1 = mu1 + (0.5 * lv1).exp() * noise[:, :m.n_latent]
    torch.testing.assert_close(z0[:, :kx], z1[:, :kx])
    assert not torch.allclose(z0[:, kx:], z1[:, kx:])
    post = m._posterior(y, pa)["mu"]
    torch.testing.assert_close(z0, post, rtol=1e-4, atol=1e-5)  # abduction inverts the prior standardization


def test_additive_priors_are_additive_over_perturbations():
    torch.manual_seed(0)
    m = FCRMechanism(Expression(10), PARENTS, **SMALL)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)  # log-variances stay inside their clamp
    ctx = torch.tensor([0.0, 1.0, 0.0])

    def prior(t):
        mu, lv = m._prior(torch.cat([ctx, torch.tensor(t)])[None])
        return torch.cat([mu, lv], 1)[:, m.sizes[0]:]  # the treatment and interaction blocks

    base, a, b = prior([0.0] * 4), prior([1.0, 0, 0, 0]), prior([0, 1.0, 0, 0])
    both = prior([1.0, 1.0, 0, 0])
    torch.testing.assert_close(both - base, (a - base) + (b - base), rtol=1e-5, atol=1e-5)
    half = prior([0.5, 0, 0, 0])  # dose scales the effect linearly
    torch.testing.assert_close(half - base, 0.5 * (a - base), rtol=1e-5, atol=1e-5)
    m = FCRMechanism(Expression(10), PARENTS, additive_treatment=False, **SMALL)  # unstructured MLP priors
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)  # log-variances stay inside their clamp
    base, a, b, both = prior([0.0] * 4), prior([1.0, 0, 0, 0]), prior([0, 1.0, 0, 0]), prior([1.0, 1.0, 0, 0])
    assert not torch.allclose(both - base, (a - base) + (b - base), atol=1e-3)


def test_latent_shift_is_additive_in_latent_space():
    torch.manual_seed(0)
    m = LatentShiftMechanism(Expression(10), PARENTS, n_latent=5, **SMALL)
    z, pa = torch.randn(8, 5), _parents(8)
    shift = m._decoder_input(z, pa) - z
    torch.testing.assert_close(shift, m.embed_t(pa[:, 3:]) + m.embed_x(pa[:, :3]))


def test_bad_settings_name_the_culprit():
    with pytest.raises(MedCausalError, match="'drug'"):
        FCRMechanism(Expression(10), PARENTS, treatment="drug")
    with pytest.raises(MedCausalError, match="Expression"):
        FCRMechanism(Continuous(), PARENTS)
    with pytest.raises(MedCausalError, match="n_context"):
        FCRMechanism(Expression(10), PARENTS, n_context=0)
    m = FCRMechanism(Expression(10), {"a": 1, "b": 2})  # no parent named "perturbation": covariates only
    assert m.treatment_names == [] and m.covariate_names == ["a", "b"]


def test_initialization_from_data():
    m = FCRMechanism(Expression(6), PARENTS, **SMALL)
    y = torch.tensor([[10.0, 0, 0, 0, 0, 0], [0, 30.0, 0, 0, 0, 10.0]])
    m.initialize(y)
    assert m.lib_loc.item() == pytest.approx(np.log([10.0, 40.0]).mean(), rel=1e-6)
    assert bool(m.initialized)
    prop = m._decoder_last().bias.detach().exp()
    torch.testing.assert_close(prop, torch.tensor([0.5, 0.375, 0, 0, 0, 0.125]) + 1e-6, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["fcr", pytest.param("latent-shift", marks=pytest.mark.slow)])
def test_learns_a_treatment_effect(name):
    """Trained briefly on simulated cells, the counterfactual of control cells under a seen
    perturbation tracks the true counterfactual far better than 'no change' does."""
    from medcausal.adapters.singlecell import FCRModel, setup_anndata
    from medcausal.metrics.singlecell import log_normalize, r2_mean
    from medcausal.synthetic.perturbseq import PerturbSeq

    sim = PerturbSeq(n_genes=30, n_cell_types=2, n_donors=1, n_perturbations=2, combinations=0,
                     dose_levels=(1.0,), control_fraction=0.34, seed=0)
    train = sim.sample(1500, seed=0)
    setup_anndata(train, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    model = FCRModel(name, **SMALL).fit(train, max_epochs=40, batch_size=128, lr=3e-3, seed=0, verbose=False)
    ctrl = sim.sample(300, seed=1, conditions=["control"])
    truth = log_normalize(sim.counterfactual(ctrl, do={"perturbation": "P1"}).layers["counts"])
    pred = log_normalize(model.predict_counterfactual(ctrl, perturbation="P1").layers["counts"])
    factual = log_normalize(ctrl.layers["counts"])
    lfc_true, lfc_pred = truth.mean(0) - factual.mean(0), pred.mean(0) - factual.mean(0)
    assert np.corrcoef(lfc_true, lfc_pred)[0, 1] > 0.9  # measured 0.96 (both models)
    assert r2_mean(truth, factual) < 0.95 < 0.98 < r2_mean(truth, pred)  # 'no change' 0.93; models 0.99


def test_interaction_prior_main_effect_plus_low_rank_interaction():
    """With ``treatment_main_effect`` the interaction prior's treatment effect is
    ``Σ_p t_p (u_p + W_p h(x))``: with the context embedding ``h`` zeroed, a treatment still
    moves ``z_tx`` (its main effect ``u_p``), by the same amount in every context; without it,
    the same zeroing leaves no treatment effect at all."""
    torch.manual_seed(0)
    ctxs = torch.eye(3)
    t = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])

    def effects(m):
        out = []
        for c in ctxs:
            mu, lv = m._prior(torch.cat([c.expand(2, 3), t], 1))
            both = torch.cat([mu[:, -m.sizes[2]:], lv[:, -m.sizes[2]:]], 1)
            out.append(both[1] - both[0])
        return torch.stack(out)

    m = FCRMechanism(Expression(10), PARENTS, treatment_main_effect=True, **SMALL)
    assert m.prior_tx_effect.in_features == 4 * (m.rank + 1)
    with torch.no_grad():
        m.prior_tx_effect.weight.normal_(0.0, 0.3)
        m.ctx_embed.weight.zero_()
    eff = effects(m)
    assert eff.abs().max() > 1e-3  # the main effect u_p
    torch.testing.assert_close(eff, eff[:1].expand_as(eff))  # ... the same in every context
    m = FCRMechanism(Expression(10), PARENTS, treatment_main_effect=False, **SMALL)
    assert m.prior_tx_effect.in_features == 4 * m.rank
    with torch.no_grad():
        m.ctx_embed.weight.zero_()
    torch.testing.assert_close(effects(m), torch.zeros(3, 2 * m.sizes[2]))


def test_interaction_block_has_its_own_causal_structure_weight():
    """``lambda_cls_interaction`` weighs the ``z_tx -> t`` regularizer alone: the regularizer
    changes by exactly ``Δλ · loss(z_tx -> t)`` when only that weight changes."""
    torch.manual_seed(0)
    m = FCRMechanism(Expression(10), PARENTS, **SMALL)
    z, pa = torch.randn(32, m.n_latent), _parents(32)
    post = {"mu": z, "logvar": torch.zeros_like(z)}

    def reg(weight):
        m.lambda_cls_tx = weight
        torch.manual_seed(1)  # the same permutations in the discriminators
        return m._regularizers(z, post, pa).detach()

    expected = 3.0 * m.cls_tx(m._blocks(z)[2], pa).detach()
    torch.testing.assert_close(reg(4.0) - reg(1.0), expected, rtol=1e-4, atol=1e-4)
    assert FCRMechanism(Expression(10), PARENTS).lambda_cls_tx == 1.0 < FCRMechanism(Expression(10), PARENTS).lambda_cls



def test_interaction_block_is_no_noiseless_copy_of_the_treatment():
    """Against the simulator's true interaction factors (each keeps within-condition
    spread): at the default ``lambda_cls_interaction`` every learned ``z_tx`` coordinate
    keeps some too, while at the full causal-structure weight (10, as for ``z_x``/``z_t``)
    one coordinate becomes a noiseless code of the condition (measured: largest
    between-condition variance fraction 0.964 at the default, 0.999 at 10)."""
    import pandas as pd

    from medcausal.adapters.singlecell import FCRModel, setup_anndata
    from medcausal.synthetic.perturbseq import PerturbSeq

    sim = PerturbSeq(n_genes=60, n_cell_types=2, n_donors=1, n_perturbations=3, combinations=0,
                     dose_levels=(1.0,), seed=0)
    train = sim.sample(2000, seed=0)
    setup_anndata(train, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    cells = sim.sample(600, seed=1)
    key = (cells.obs["cell_type"].astype(str) + "|" + cells.obs["perturbation"].astype(str)).to_numpy()

    def between(z):  # per coordinate: the share of its variance explained by the condition
        return (pd.DataFrame(z).groupby(key).transform("mean").to_numpy().var(0) / z.var(0)).max()

    assert between(cells.obsm["z_interaction"]) < 0.95
    frac = {}
    for weight in (1.0, 10.0):  # what training does with each weight: no linear refinement after it
        model = FCRModel("fcr", lambda_cls_interaction=weight, refine_steps=0, **SMALL).fit(
            train, max_epochs=40, batch_size=128, lr=3e-3, seed=0, verbose=False)
        frac[weight] = between(model.get_latent_representation(cells)["interaction"])
    assert frac[1.0] < 0.98 < 0.99 < frac[10.0]


@pytest.fixture(scope="module")
def small_fit():
    """A short fit on a small simulator, without the linear refinement, and its cells."""
    from medcausal.adapters.singlecell import FCRModel, setup_anndata
    from medcausal.synthetic.perturbseq import PerturbSeq

    sim = PerturbSeq(n_genes=60, n_cell_types=2, n_donors=1, n_perturbations=3, combinations=0,
                     dose_levels=(1.0,), seed=0)
    train = sim.sample(1500, seed=0)
    setup_anndata(train, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    model = FCRModel("fcr", refine_steps=0, **SMALL).fit(train, max_epochs=20, batch_size=128, lr=3e-3, seed=0,
                                                         verbose=False)
    return model, train, sim.sample(600, seed=1)


def _counts_and_parents(model, adata):
    from medcausal.adapters.singlecell import _encode_obs

    return torch.from_numpy(adata.layers["counts"].toarray()), torch.from_numpy(_encode_obs(adata.obs, model.setup))


def test_refinement_moves_interaction_variation_into_the_interaction_block(small_fit):
    """The exact linear step on the ELBO (refine_latent_map): reconstruction is unchanged, the
    prior term improves, and against the simulator's true factors the interaction block holds
    more of the interaction factors (measured: strong MCC 0.361 -> 0.420, objective 3.50 ->
    1.36 nats per cell)."""
    import copy

    from medcausal.metrics.representation import mcc

    model, train, cells = small_fit
    counts, pa = _counts_and_parents(model, train)
    m = model.module
    before_mcc = mcc(cells.obsm["z_interaction"], model.get_latent_representation(cells)["interaction"]).score
    with torch.no_grad():
        log_lib = torch.log(counts.sum(-1))
        recon = m._mean(m._decoder_input(m._code(m._posterior(counts, pa))[0], pa), log_lib)
    refined = copy.deepcopy(model)
    info = refined.module.refine_latent_map([counts], pa, steps=2000)
    assert info["kept"] and info["objective_after"] < info["objective_before"] - 1.0
    assert not torch.allclose(refined.module.latent_map, torch.eye(m.n_latent), atol=0.1)
    r = refined.module
    with torch.no_grad():
        again = r._mean(r._decoder_input(r._code(r._posterior(counts, pa))[0], pa), log_lib)
    torch.testing.assert_close(again, recon, rtol=1e-3, atol=1e-3)  # the decoder reads B^-1 z
    after_mcc = mcc(cells.obsm["z_interaction"], refined.get_latent_representation(cells)["interaction"]).score
    assert after_mcc > before_mcc + 0.03
    # the null counterfactual still gives the observed counts back, through the new map and priors
    noise = r.abduct(counts[:50], pa[:50])
    torch.testing.assert_close(r.sample(pa[:50], noise=noise), counts[:50])


def test_refinement_is_saved_and_older_files_load_as_identity(small_fit, tmp_path):
    import copy

    from medcausal.adapters.singlecell import FCRModel

    model, train, cells = small_fit
    counts, pa = _counts_and_parents(model, train)
    refined = copy.deepcopy(model)
    refined.module.refine_latent_map([counts], pa, steps=300)
    back = FCRModel.load(refined.save(tmp_path / "m.pt"))
    torch.testing.assert_close(back.module.latent_map, refined.module.latent_map)
    state = {k: v for k, v in model.module.state_dict().items() if not k.startswith("latent_map")}
    fresh = FCRMechanism(Expression(60), model.module.parent_dims, treatment="perturbation", **SMALL)
    fresh.latent_map.mul_(2.0)
    fresh.load_state_dict(state)  # a model file written before the refinement existed
    torch.testing.assert_close(fresh.latent_map, torch.eye(fresh.n_latent))


def test_fit_refines_by_default_and_says_so():
    from medcausal.adapters.singlecell import FCRModel, setup_anndata
    from medcausal.synthetic.perturbseq import PerturbSeq

    train = PerturbSeq(n_genes=30, n_cell_types=2, n_donors=1, n_perturbations=2, combinations=0,
                       dose_levels=(1.0,), seed=0).sample(300, seed=0)
    setup_anndata(train, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    model = FCRModel("fcr", **SMALL).fit(train, max_epochs=4, seed=0, verbose=False)  # 3 rounds by default
    assert model.fit_info["rounds"] == 3 and [h["round"] for h in model.history] == [0, 0, 1, 2]
    info = model.fit_info["refine"][0]
    assert info["groups"] == 6 and info["kept"] and info["objective_after"] < info["objective_before"]
    assert len(model.fit_info["refine"]) == 3
    model = FCRModel("fcr", **SMALL).fit(train, max_epochs=2, seed=0, verbose=False)  # at most max_epochs
    assert model.fit_info["rounds"] == 2 and len(model.fit_info["refine"]) == 2
    assert FCRModel("latent-shift", **SMALL).fit(train, max_epochs=2, seed=0, verbose=False).fit_info["rounds"] == 1
    with pytest.raises(MedCausalError, match="rounds must be an integer between 1 and max_epochs"):
        FCRModel("fcr", **SMALL).fit(train, max_epochs=2, rounds=3, verbose=False)
    assert "refine" not in FCRModel("fcr", refine_steps=0, **SMALL).fit(train, max_epochs=2, seed=0,
                                                                       verbose=False).fit_info
    with pytest.raises(MedCausalError, match="refine_steps must be >= 0"):
        FCRMechanism(Expression(10), PARENTS, refine_steps=-1)


def test_rounds_follow_the_refinement_and_the_step_budget():
    from medcausal.adapters.singlecell import FCRModel, setup_anndata
    from medcausal.synthetic.perturbseq import PerturbSeq

    train = PerturbSeq(n_genes=30, n_cell_types=2, n_donors=1, n_perturbations=2, combinations=0,
                       dose_levels=(1.0,), seed=0).sample(300, seed=0)
    setup_anndata(train, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    # without the refinement, rounds would only restart the optimizer: one plain run
    assert FCRModel("fcr", refine_steps=0, **SMALL).fit(train, max_epochs=3, verbose=False).fit_info["rounds"] == 1
    # a step budget is shared by the rounds (the first one spent it all)
    model = FCRModel("fcr", **SMALL).fit(train, max_epochs=9, max_steps=6, batch_size=64, verbose=False)
    assert model.fit_info["steps"] == 6 and model.fit_info["rounds"] == 3 == len(model.fit_info["refine"])
    with pytest.raises(MedCausalError, match="max_epochs must be an integer >= 1, got 0"):
        FCRModel("fcr", **SMALL).fit(train, max_epochs=0, verbose=False)  # it blamed rounds


def test_refinement_with_many_distinct_parents_uses_a_random_subset_of_cells():
    m = FCRMechanism(Expression(20), {"age": 1, "perturbation": 2}, treatment="perturbation", **SMALL)
    n = 600
    pa = torch.zeros(n, 3)
    pa[:, 0] = torch.linspace(-1, 1, n)  # a continuous covariate: every cell its own parents row
    pa[:300, 1] = 1.0  # sorted by perturbation: the first cells are all treated
    counts = torch.poisson(torch.full((n, 20), 3.0))
    info = m.refine_latent_map((counts[i:i + 100] for i in range(0, n, 100)), pa, steps=50, max_groups=200)
    assert info["groups"] == info["cells"] == 200  # a subset of cells, each its own group
    assert info["kept"] == (not torch.equal(m.latent_map, torch.eye(m.n_latent)))
    with pytest.raises(DataError, match="the count batches hold 100 cells, the parents 600"):
        m.refine_latent_map([counts[:100]], pa, steps=10)


def test_full_posterior_code_has_the_moments_of_its_cholesky_factor():
    """posterior="full": q(h) = N(mu, L L^T) across blocks; the code z = B h has mean B mu, marginal
    variances diag(B L L^T B^T) and log-determinant log det(L L^T) + 2 log|det B| (what the KL reads),
    and its draws have that covariance."""
    torch.manual_seed(0)
    m = FCRMechanism(Expression(20), PARENTS, treatment="perturbation", posterior="full", **SMALL)
    counts, pa = torch.poisson(torch.full((16, 20), 3.0)), _parents(16)
    post = m._posterior(counts, pa)
    torch.testing.assert_close(post["factor"], torch.diag_embed((0.5 * post["logvar"]).exp()))  # starts diagonal
    with torch.no_grad():
        m.enc_cov.bias.normal_(0.0, 0.3)  # (N(0, 1) entries over 12 dimensions: nearly singular)
        m.latent_map.copy_(torch.eye(m.n_latent) + 0.3 * torch.randn(m.n_latent, m.n_latent))
        post = m._posterior(counts, pa)
        mean, var, logdet = m._code(post)
        b, f = m.latent_map, post["factor"]
        cov = b @ f @ f.transpose(1, 2) @ b.T
        torch.testing.assert_close(mean, post["mu"] @ b.T)
        torch.testing.assert_close(var, torch.diagonal(cov, dim1=1, dim2=2))
        cov64 = b.double() @ f.double() @ f.double().transpose(1, 2) @ b.double().T
        torch.testing.assert_close(logdet.double(), torch.logdet(cov64), rtol=1e-5, atol=1e-4)
        torch.manual_seed(1)
        draws = torch.stack([m._draw_code(post) for _ in range(20000)])
        emp = torch.einsum("sni,snj->nij", draws - mean, draws - mean) / len(draws)
    # 20000 draws: the standard error of a covariance entry is below sqrt(2 / 20000) = 1% of the
    # product of the two standard deviations; 5% leaves room for the largest of 16 x 12 x 12 entries
    sd = var.sqrt()
    assert ((emp - cov).abs() / (sd[:, :, None] * sd[:, None, :])).max() < 0.05


def test_full_posterior_trains_refines_reconstructs_and_round_trips(tmp_path):
    from medcausal.adapters.singlecell import FCRModel, setup_anndata
    from medcausal.synthetic.perturbseq import PerturbSeq

    train = PerturbSeq(n_genes=30, n_cell_types=2, n_donors=1, n_perturbations=2, combinations=0,
                       dose_levels=(1.0,), seed=0).sample(400, seed=0)
    setup_anndata(train, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    model = FCRModel("fcr", posterior="full", **SMALL).fit(train, max_epochs=6, batch_size=64, seed=0, verbose=False)
    assert model.module.enc_cov.weight.abs().sum() > 0  # the off-diagonal factor was trained
    assert all(r["objective_after"] <= r["objective_before"] for r in model.fit_info["refine"])
    counts, pa = _counts_and_parents(model, train)
    m = model.module
    noise = m.abduct(counts.float(), pa.float(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.sample(pa.float(), noise=noise), counts.float())  # the cells come back exactly
    back = FCRModel.load(model.save(tmp_path / "full.pt"))
    assert back.module.enc_cov is not None
    for k, v in model.get_latent_representation(train).items():
        np.testing.assert_array_equal(back.get_latent_representation(train)[k], v)
    with pytest.raises(MedCausalError, match="posterior must be 'diagonal' or 'full', got 'dense'"):
        FCRMechanism(Expression(10), PARENTS, posterior="dense")


def test_full_posterior_refinement_reads_the_full_covariance(monkeypatch):
    """refine_latent_map's second moments are E[h h^T] = mu mu^T + L L^T per group, off-diagonal
    entries included (a diagonal-only factor would leave them out)."""
    import medcausal.mechanisms.fcr as fcr

    torch.manual_seed(0)
    m = FCRMechanism(Expression(20), PARENTS, treatment="perturbation", posterior="full", **SMALL)
    with torch.no_grad():
        m.enc_cov.bias.normal_(0.0, 0.3)
    counts, pa = torch.poisson(torch.full((40, 20), 3.0)), _parents(40)
    seen = {}

    def record(m1, m2, weight, prior, params, start, steps, lr):
        seen.update(m1=m1, m2=m2)
        return start, 0.0, 0.0

    monkeypatch.setattr(fcr, "fit_linear_map", record)
    m.refine_latent_map([counts[:25], counts[25:]], pa, steps=1)
    groups, group = torch.unique(pa, dim=0, return_inverse=True)
    with torch.no_grad():
        post = m._posterior(counts, pa)
    mu, f = post["mu"].double(), post["factor"].double()
    second = mu[:, :, None] * mu[:, None, :] + f @ f.transpose(1, 2)
    for g in range(len(groups)):
        rows = group == g
        torch.testing.assert_close(seen["m1"][g], mu[rows].mean(0))
        torch.testing.assert_close(seen["m2"][g], second[rows].mean(0))
    off = ~torch.eye(m.n_latent, dtype=torch.bool)
    assert (f @ f.transpose(1, 2))[:, off].abs().max() > 0.1  # the off-diagonal part is there to be read


COUNT = {"fcr": FCRMechanism, "latent-shift": LatentShiftMechanism}


def _count(name):
    torch.manual_seed(0)
    return COUNT[name](Expression(12), {"cell_type": 2, "perturbation": 3}, hidden=[16], decoder_hidden=[16]).eval()


@pytest.mark.parametrize("name", list(COUNT))
def test_count_shapes_are_checked(name):
    m = _count(name)
    pa = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]] * 4)
    y = m.sample(pa, generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match=r"parents must be \[n, 5\]"):
        m.sample(torch.zeros(4, 3))
    with pytest.raises(DataError, match=r"parents must be \[n, 5\]"):
        m.abduct(y, torch.zeros(4, 3))
    with pytest.raises(DataError, match=r"counts must be \[4, 12\]"):
        m.abduct(torch.ones(4, 5), pa)
    with pytest.raises(DataError, match=r"counts must be \[4, 12\]"):
        m.abduct(torch.ones(3, 12), pa)
    with pytest.raises(DataError, match=r"noise must be \[4, 25\]"):
        m.sample(pa, noise=torch.randn(4, 3))


@pytest.mark.parametrize("name", list(COUNT))
@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0.5])
def test_count_abduct_rejects_non_counts(name, bad):
    m = _count(name)
    pa = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]] * 2)
    y = torch.ones(2, 12)
    y[1, 3] = bad
    with pytest.raises(DataError, match="non-negative integer"):
        m.abduct(y, pa)


@pytest.mark.parametrize("name", list(COUNT))
def test_count_float64_and_integer_parents(name):
    m = _count(name)
    pa = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]] * 3)
    y = m.sample(pa, generator=torch.Generator().manual_seed(0))
    noise = m.abduct(y, pa, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.sample(pa.double(), noise=noise).float(), y)
    assert torch.equal(m.sample(pa.long(), noise=noise).float(), y)
    assert torch.equal(m.abduct(y.double(), pa.double(), generator=torch.Generator().manual_seed(1)), noise)


def test_fcr_empty_hidden_is_refused():
    with pytest.raises(MedCausalError, match="hidden"):
        FCRMechanism(Expression(12), {"perturbation": 3}, hidden=[])
