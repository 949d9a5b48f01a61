"""Per-record gradients under DP, for every registered mechanism.

Opacus computes per-sample gradients with layer hooks; a parameter used outside a hooked
layer's forward (zuko's unconditional spline parameters), a backward pass it does not
hook, or a layer whose hook is wrong would silently give wrong gradients. These tests check,
for every mechanism in ``registry.available()`` (new ones are covered when registered):

- the ``vmap`` engine's per-record gradients equal gradients computed one record at a time
  (relative error < 1e-4), under one seed for stochastic losses;
- one private optimizer step with zero noise moves every parameter by
  ``-sum_i clip_C(g_i) / B`` (relative error < 1e-3; every loss term reaches the private
  optimizer), with the per-record gradient mode that ``auto`` picks for that mechanism.

Skipped, with the reason, only for mechanisms that ``fit(privacy=...)`` refuses by their own
declaration: ``dp_compatible = False`` (with ``dp_incompatible_reason``), or a ``finalize`` that
reads the data without a private version (``finalize_private``). Such a mechanism is covered
here as soon as it declares a private finalize.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medcausal.mechanisms import registry
from medcausal.privacy import Privacy, PrivacyError
from medcausal.privacy import engine
from medcausal.privacy.engine import PrivatePlan, VmapGrads, choose_mode, probe, validate_module
from medcausal.privacy.stats import private_finalizer

_spec = importlib.util.spec_from_file_location(
    "_contract", Path(__file__).resolve().parents[1] / "mechanisms" / "test_contract.py")
_contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_contract)
SMALL, VARIABLES = _contract.SMALL, _contract.VARIABLES
N = 6
RTOL = 1e-4
STEP_RTOL = 1e-3


def _not_private(cls) -> str | None:
    """Why ``fit(privacy=...)`` refuses this mechanism class, from its own declarations, or None."""
    if getattr(cls, "dp_compatible", True) is False:
        return f"declares itself non-private: {getattr(cls, 'dp_incompatible_reason', '')}"
    try:
        private_finalizer(cls)
    except PrivacyError as e:
        return f"refused under DP: {e}"
    return None


def _cases():
    for name in registry.available():
        cls = registry.get(name)
        why = _not_private(cls)
        for kind in cls.supports:
            for var in VARIABLES.get(kind, [])[:2]:
                for parent_dim in (0, 3):
                    marks = [pytest.mark.skip(reason=f"{name} {why}")] if why else []
                    yield pytest.param(name, var, parent_dim, marks=marks,
                                       id=f"{name}-{kind}{getattr(var, 'dim', '')}-pa{parent_dim}")


class One(nn.Module):
    """One mechanism as a per-row-loss module, the shape the training loop sees."""

    def __init__(self, mech):
        super().__init__()
        self.mech = mech

    def forward(self, batch):
        return self.mech.loss(batch["v"], batch["pa"])


def _setup(name, var, parent_dim, seed=0):
    torch.manual_seed(seed)
    mech = registry.get(name)(var, parent_dim, **SMALL.get(name, {}))
    g = torch.Generator().manual_seed(seed + 1)
    pa = torch.randn(N, parent_dim, generator=g)
    with torch.no_grad():
        v = mech.sample(pa, generator=g)
    mech.train()
    return One(mech), {"v": v, "pa": pa}


def _single_row_grads(module, batch, seed):
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    rows = []
    for i in range(N):
        torch.manual_seed(seed)
        loss = module({k: v[i:i + 1] for k, v in batch.items()}).sum()
        gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, gs)])
    return [torch.stack([r[j] for r in rows]) for j in range(len(named))], named


def _batch_forward_grads(module, batch, seed):
    torch.manual_seed(seed)
    return engine.reference_grads(module, batch)


def _assert_close(got, ref, name, rtol=RTOL):
    scale = ref.norm()
    err = float((got - ref).norm() / scale) if scale > 0 else float(got.norm())
    assert err < rtol, f"{name}: relative error {err:.2e} >= {rtol}"


@pytest.mark.parametrize("name,var,parent_dim", list(_cases()))
def test_vmap_per_record_gradients_match_one_at_a_time(name, var, parent_dim, monkeypatch):
    module, batch = _setup(name, var, parent_dim)
    refs, named = _single_row_grads(module, batch, seed=11)
    torch.manual_seed(11)
    grads, losses = VmapGrads(module, randomness="same")(batch)
    assert losses.shape == (N,)
    for (pname, _), g, r in zip(named, grads, refs):
        assert g.shape == r.shape
        _assert_close(g, r, pname)


def make_plan(n_records, batch_size, max_grad_norm, noise, record_of_row=None, mode="auto"):
    record_of_row = np.arange(n_records) if record_of_row is None else np.asarray(record_of_row)
    return PrivatePlan(privacy=Privacy(noise_multiplier=1.0, max_grad_norm=max_grad_norm, grad_sample_mode=mode),
                       codecs={}, data=None, seed=0, delta=1e-5, n_rows=len(record_of_row),
                       n_records=n_records, record_of_row=record_of_row, unit_label="row",
                       batch_size=batch_size, sample_rate=batch_size / n_records,
                       steps_per_epoch=n_records // batch_size, steps=1, noise_multiplier=noise,
                       stats_noise_multiplier=None)


@pytest.mark.parametrize("name,var,parent_dim", list(_cases()))
def test_private_step_applies_every_clipped_gradient(name, var, parent_dim, monkeypatch):
    monkeypatch.setattr(engine, "VMAP_RANDOMNESS", "same")
    module, batch = _setup(name, var, parent_dim)
    mode = choose_mode(module, batch, Privacy(noise_multiplier=1.0), grouped=False)  # what the session picks
    # reference gradients drawing the same noise as the session's step: one row at a time for vmap,
    # per-row gradients of one batch forward for Opacus's hooks / ghost clipping
    refs = (_single_row_grads(module, batch, seed=5)[0] if mode == "vmap"
            else _batch_forward_grads(module, batch, seed=5))
    # the clipping norm: the median per-record gradient norm, so some records are clipped
    norms = torch.stack([r.reshape(N, -1).norm(dim=1) for r in refs], 1).norm(dim=1)
    clip = float(norms.median())
    plan = make_plan(N, N, clip, noise=0.0)
    before = [p.detach().clone() for p in module.parameters() if p.requires_grad]
    # a large step, so that the float32 rounding of (parameter + update) - parameter is far below
    # the tolerance even for parameters whose update is tiny beside their value
    lr = 1e3
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
    session = plan.attach(module, opt, batch)
    assert session.mode == mode
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    torch.manual_seed(5)
    try:
        assert session.step(torch.arange(N))
    finally:
        session.close()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factor < 1).any(), "the test must exercise clipping"
    for (pname, p), b, r in zip(named, before, refs):
        expected = -lr * torch.einsum("i,i...->...", factor, r) / N
        # 1e-3: Opacus's ghost norms of convolutions carry ~1e-4 float32 error into the clipping
        # factors; a loss term missing from the private step gives errors of order 1.
        _assert_close(p.detach() - b, expected, f"{pname} (mode {session.mode})", rtol=STEP_RTOL)


# -- the detectors behind "auto" ---------------------------------------------------------

def test_hooks_refused_for_zuko_vector_flows_and_auto_falls_back_to_vmap():
    from medcausal.graph import Continuous

    module, batch = _setup("flow", Continuous(dim=2), 0)  # zuko MAF, unconditional
    ok, why = probe(module, batch, "hooks")
    assert not ok and ("phi" in why or "MaskedLinear" in why), why  # zuko's layers: no exact hooks
    assert choose_mode(module, batch, Privacy(epsilon=1.0), grouped=False) == "vmap"
    scalar, batch = _setup("flow", Continuous(), 3)  # one plain MLP of the parents: ghost clipping
    assert choose_mode(scalar, batch, Privacy(epsilon=1.0), grouped=False) == "ghost"
    with pytest.raises(PrivacyError, match="does not give exact per-record gradients"):
        choose_mode(module, batch, Privacy(epsilon=1.0, grad_sample_mode="hooks"), grouped=False)


class _Sneaky(nn.Module):
    """Uses a layer's weight outside that layer's forward: hooks see only part of the gradient."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, batch):
        x = batch["x"]
        return (self.lin(x).squeeze(-1) + (x @ self.lin.weight.t()).squeeze(-1) ** 2)


def test_probe_catches_silently_wrong_per_sample_gradients():
    module = _Sneaky()
    batch = {"x": torch.randn(8, 3)}
    assert probe(module, batch, "hooks")[0] is False
    assert probe(module, batch, "ghost")[0] is False
    assert choose_mode(module, batch, Privacy(epsilon=1.0), grouped=False) == "vmap"


def test_plain_linear_model_gets_ghost_clipping():
    module = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 1))

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = module

        def forward(self, batch):
            return (self.net(batch["x"]) - batch["y"]).pow(2).squeeze(-1)

    m = Loss()
    batch = {"x": torch.randn(8, 3), "y": torch.randn(8, 1)}
    assert choose_mode(m, batch, Privacy(epsilon=1.0), grouped=False) == "ghost"
    assert choose_mode(m, batch, Privacy(epsilon=1.0), grouped=True) == "hooks"


def test_batchnorm_is_refused_with_opacus_validator_message():
    with pytest.raises(PrivacyError, match="BatchNorm"):
        validate_module(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), "vmap")


def test_attention_needs_no_replacement_in_vmap_mode_only():
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    validate_module(mha, "vmap")
    with pytest.raises(PrivacyError, match="DPMultiheadAttention|replace"):
        validate_module(mha, "hooks")


class _RunningMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("mean", torch.zeros(2))

    def forward(self, batch):
        self.mean.mul_(0.9).add_(0.1 * batch["x"].mean(0))
        return self.lin(batch["x"] - self.mean).squeeze(-1) ** 2


def test_buffers_updated_from_data_are_refused():
    m = _RunningMean()
    plan = make_plan(8, 8, 1.0, noise=1.0, mode="vmap")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(PrivacyError, match="mean"):
        plan.attach(m, opt, {"x": torch.randn(8, 2)})


# -- records spanning several rows ------------------------------------------------------

class _Quad(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, batch):
        return (self.lin(batch["x"]) - batch["y"]).pow(2).squeeze(-1)


@pytest.mark.parametrize("mode", ["vmap", "hooks"])
def test_unit_records_are_clipped_as_one(mode):
    torch.manual_seed(0)
    m = _Quad()
    x, y = torch.randn(7, 2), torch.randn(7, 1) * 3
    units = np.array([0, 0, 1, 2, 2, 2, 3])
    plan = make_plan(4, 4, max_grad_norm=0.5, noise=0.0, record_of_row=units, mode=mode)
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    refs = engine.reference_grads(m, {"x": x, "y": y})
    session = plan.attach(m, opt, {"x": x, "y": y})
    assert session.mode == mode
    try:
        session.step(torch.tensor([0, 1, 2, 3]))
    finally:
        session.close()
    per_unit = [torch.zeros(4, *r.shape[1:]).index_add_(0, torch.as_tensor(units), r) for r in refs]
    norms = torch.stack([u.reshape(4, -1).norm(dim=1) for u in per_unit], 1).norm(dim=1)
    factor = (0.5 / (norms + 1e-6)).clamp(max=1.0)
    assert (factor < 1).any()
    for p, b, u in zip(m.parameters(), before, per_unit):
        _assert_close(p.detach() - b, -torch.einsum("i,i...->...", factor, u) / 4, f"{mode}")


def test_rows_of_maps_records_to_their_rows():
    plan = make_plan(3, 3, 1.0, 1.0, record_of_row=[2, 0, 2, 1, 0])
    rows, pos = plan.rows_of(torch.tensor([2, 1]))
    assert rows.tolist() == [0, 2, 3] and pos.tolist() == [0, 0, 1]
