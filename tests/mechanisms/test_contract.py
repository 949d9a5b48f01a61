"""The contract every registered mechanism must pass (as zuko does for its flows).

A new mechanism is covered by registering it; give it small settings in SMALL if its
defaults are slow.
"""

import io

import pytest
import torch

from medcausal.errors import MedCausalError
from medcausal.graph import Binary, Categorical, Continuous, Expression, Image
from medcausal.mechanisms import registry
from medcausal.mechanisms.additive import AdditiveMechanism
from medcausal.mechanisms.base import RowNoise
from medcausal.mechanisms.flow import FlowMechanism

SMALL = {"flow": {"transforms": 1, "hidden": [16, 16]},
         "additive": {"hidden": [16, 16], "n_quantiles": 64},
         "categorical": {"hidden": [16]},
         "image-diffusion": {"channels": [8, 16], "norm_num_groups": 4, "cond_hidden": 16, "steps": 10}}
VARIABLES = {"continuous": [Continuous(), Continuous(dim=2)], "binary": [Binary()],
             "categorical": [Categorical(("a", "b", "c"))], "image": [Image((1, 16, 16))],
             "expression": [Expression(20)]}
N = 32


def _cases():
    for name in registry.available():
        cls = registry.get(name)
        for kind in cls.supports:
            for var in VARIABLES.get(kind, []):
                for parent_dim in (0, 3):
                    yield pytest.param(name, var, parent_dim, id=f"{name}-{kind}{getattr(var, 'dim', '')}-pa{parent_dim}")


def _make(name, var, parent_dim, seed=0):
    torch.manual_seed(seed)
    return registry.get(name)(var, parent_dim, **SMALL.get(name, {}))


def _data(mech, parent_dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    parents = torch.randn(N, parent_dim, generator=g)
    value = mech.sample(parents, generator=g).detach()
    return value, parents


@pytest.mark.parametrize("name,var,parent_dim", list(_cases()))
class TestMechanismContract:
    def test_declares_itself(self, name, var, parent_dim):
        cls = registry.get(name)
        assert cls.abduction in ("exact", "deterministic-approximate", "amortized", "sampled")
        assert cls.supports and cls.name == name

    def test_shapes(self, name, var, parent_dim):
        m = _make(name, var, parent_dim)
        value, parents = _data(m, parent_dim)
        expected = {"continuous": (N, getattr(var, "dim", 1)), "image": (N, *getattr(var, "shape", ())),
                    "expression": (N, getattr(var, "n_genes", 0))}.get(var.kind, (N, 1))
        assert value.shape == expected
        assert m.loss(value, parents).shape == (N,)  # per-row loss
        noise = m.abduct(value, parents, generator=torch.Generator().manual_seed(0))
        assert noise.shape == m.noise_like(N).shape
        if m.has_log_prob:
            lp = m.log_prob(value, parents)
            assert lp.shape == (N,) and torch.isfinite(lp).all()

    def test_gradients_reach_every_parameter(self, name, var, parent_dim):
        m = _make(name, var, parent_dim)
        value, parents = _data(m, parent_dim)
        m.loss(value, parents).mean().backward()
        for pname, p in m.named_parameters():
            assert p.grad is not None, f"no gradient reaches {pname}"
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {pname}"
            assert p.grad.abs().sum() > 0, f"zero gradient in {pname}"

    def test_eval_equals_train(self, name, var, parent_dim):
        m = _make(name, var, parent_dim)
        value, parents = _data(m, parent_dim)
        m.train()
        torch.manual_seed(0)  # stochastic losses (ELBOs) draw the same samples in both modes
        a = m.loss(value, parents)
        m.eval()
        torch.manual_seed(0)
        b = m.loss(value, parents)
        torch.testing.assert_close(a, b)

    def test_save_load_round_trip(self, name, var, parent_dim):
        m = _make(name, var, parent_dim, seed=0)
        value, parents = _data(m, parent_dim)
        m.finalize(value, parents)
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        buf.seek(0)
        other = _make(name, var, parent_dim, seed=123)
        other.load_state_dict(torch.load(buf, weights_only=True))
        torch.manual_seed(0)
        a = m.loss(value, parents)
        torch.manual_seed(0)
        torch.testing.assert_close(a, other.loss(value, parents))
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        torch.testing.assert_close(m.sample(parents, generator=g1), other.sample(parents, generator=g2))

    def test_takes_float64_inputs(self, name, var, parent_dim):
        # the weights' dtype is float32: float64 values and parents are converted, not refused
        m = _make(name, var, parent_dim)
        value, parents = _data(m, parent_dim)
        g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
        with torch.no_grad():
            noise = m.abduct(value, parents, generator=g(0))
            noise64 = m.abduct(value.double(), parents.double(), generator=g(0))
            torch.testing.assert_close(noise64.to(noise.dtype), noise, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m.sample(parents.double(), generator=g(1)).to(value.dtype),
                                       m.sample(parents, generator=g(1)), atol=1e-5, rtol=1e-5)
            assert torch.isfinite(m.loss(value.double(), parents.double())).all()

    def test_query_settings_are_saved_hyperparameters(self, name, var, parent_dim):
        # a model file rebuilds the mechanism from its hyperparameters, query settings included
        m = _make(name, var, parent_dim)
        for setting in type(m).query_settings:
            assert setting in m.hparams and getattr(m, setting) == m.hparams[setting]

    def test_same_seed_same_sample(self, name, var, parent_dim):
        m = _make(name, var, parent_dim)
        parents = torch.randn(N, parent_dim)
        a = m.sample(parents, generator=torch.Generator().manual_seed(7))
        b = m.sample(parents, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b)

    def test_abduct_then_predict_reproduces(self, name, var, parent_dim):
        m = _make(name, var, parent_dim)
        value, parents = _data(m, parent_dim)
        with torch.no_grad():
            noise = m.abduct(value, parents, generator=torch.Generator().manual_seed(0))
            again = m.sample(parents, noise=noise)
        err = (again - value).abs().max().item()
        assert err <= m.reconstruction_tolerance, f"reconstruction error {err} > {m.reconstruction_tolerance}"

    def test_abduction_keyed_by_row_is_the_same_for_a_row_alone(self, name, var, parent_dim):
        """CausalModel.counterfactual abducts with a RowNoise: a unit's noise must not depend on the
        other rows of the query, and must still reproduce the value."""
        m = _make(name, var, parent_dim)
        value, parents = _data(m, parent_dim)
        keys = RowNoise.for_rows(range(N), seed=0).keys
        with torch.no_grad():
            whole = m.abduct(value, parents, generator=RowNoise(keys))
            rows = m.abduct(value[5:9], parents[5:9], generator=RowNoise(keys[5:9]))
            again = m.sample(parents, noise=whole)
        torch.testing.assert_close(rows, whole[5:9], atol=1e-5, rtol=1e-5)
        assert (again - value).abs().max().item() <= m.reconstruction_tolerance


@pytest.mark.parametrize("name", ["diffusion", "hvae", "cvae", "image-diffusion"])
def test_weight_averaging_rejects_a_decay_outside_0_1(name):
    from medcausal.errors import MedCausalError
    from medcausal.graph import Continuous, Image
    from medcausal.mechanisms import registry
    variable = Continuous() if name == "diffusion" else Image((1, 16, 16))
    with pytest.raises(MedCausalError, match=f"{name}: ema_decay must be in \\[0, 1\\), got 1.5"):
        registry.get(name)(variable, 1, ema_decay=1.5)


@pytest.mark.parametrize("cls, settings", [
    (FlowMechanism, {"bins": 0}), (FlowMechanism, {"transforms": -1}), (FlowMechanism, {"hidden": [0]}),
    (FlowMechanism, {"hidden": [-3]}), (AdditiveMechanism, {"n_quantiles": 0}),
    (AdditiveMechanism, {"hidden": [0]}),
])
def test_bad_mechanism_settings_are_refused_by_name(cls, settings):
    with pytest.raises(MedCausalError, match=next(iter(settings))):
        cls(Continuous(), parents=1, **settings)
