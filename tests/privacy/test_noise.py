"""The noise DP-SGD adds matches its analytic value.

With zero gradients, one SGD step (lr = 1) moves each parameter by ``-noise / B`` with
``noise ~ N(0, sigma^2 C^2)`` and ``B`` the expected (logical) batch size, so the update
variance is ``sigma^2 C^2 / B^2``. Over M = 20 steps x 2,080 parameters = 41,600 draws the
sample variance has relative standard error sqrt(2 / M) = 0.69%; the test allows 4%
(about 6 standard errors) and a mean within 6 standard errors of 0.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from medcausal.privacy.engine import PrivatePlan
from medcausal.privacy import Privacy

SIGMA, CLIP, N, B, STEPS = 1.3, 0.7, 64, 16, 20


class ZeroGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 10))

    def forward(self, batch):
        return 0.0 * self.net(batch["x"]).sum(-1)


@pytest.mark.parametrize("mode", ["vmap", "hooks", "ghost"])
def test_update_variance_matches_sigma_c_over_b(mode):
    torch.manual_seed(0)
    module = ZeroGrad()
    plan = PrivatePlan(privacy=Privacy(noise_multiplier=SIGMA, max_grad_norm=CLIP, grad_sample_mode=mode),
                       codecs={}, data=None, seed=123, delta=1e-5, n_rows=N, n_records=N,
                       record_of_row=np.arange(N), unit_label="row", batch_size=B, sample_rate=B / N,
                       steps_per_epoch=N // B, steps=STEPS, noise_multiplier=SIGMA, stats_noise_multiplier=None)
    params = list(module.parameters())
    opt = torch.optim.SGD(params, lr=1.0)
    session = plan.attach(module, opt, {"x": torch.randn(N, 40)})
    assert session.mode == mode
    assert session.optimizer.expected_batch_size == B
    updates = []
    try:
        batches = ((r,) for _ in range(STEPS) for (r,) in session.loader)  # epochs of Poisson batches
        for _ in range(STEPS):
            (records,) = next(batches)
            before = torch.cat([p.detach().flatten().clone() for p in params])
            assert session.step(records)
            updates.append(torch.cat([p.detach().flatten() for p in params]) - before)
    finally:
        session.close()
    u = torch.stack(updates).double().flatten()
    expected = (SIGMA * CLIP / B) ** 2
    m = u.numel()
    assert m == STEPS * sum(p.numel() for p in params)
    assert abs(u.var().item() / expected - 1) < 0.04
    assert abs(u.mean().item()) < 6 * math.sqrt(expected / m)
    # the accountant saw every step, at the loader's sample rate
    assert plan.history == [[SIGMA, 1 / (N // B), STEPS]]


def test_dp_generator_keeps_every_bit_of_its_seed():
    """torch's CPU generator keeps 32 bits of a manual_seed: 2**32 candidates that an adversary who
    knows the other records can replay against a released model's noisy statistics (a review
    recovered a record's exact value so). Seeds alike in their low 32 (or 64) bits draw other
    streams; one seed and stream draws one sequence; the draws stay standard normal."""
    from medcausal.privacy.engine import dp_generator

    n = 4096
    draws = [torch.randn(n, generator=dp_generator(seed, 3)) for seed in (5, 5 + 2**32, 5 + 2**100)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert torch.equal(draws[0], torch.randn(n, generator=dp_generator(5, 3)))  # pinned: reproducible
    assert not torch.equal(draws[0], torch.randn(n, generator=dp_generator(5, 4)))  # another stream
    x = torch.cat(draws).double()  # 12,288 N(0, 1) draws: 6 standard errors of the mean and variance
    assert abs(x.mean().item()) < 6 / math.sqrt(len(x))
    assert abs(x.var().item() - 1) < 6 * math.sqrt(2 / len(x))


def test_a_fresh_fit_draws_128_bits_of_noise_seed(monkeypatch):
    """A fit's DP seed is 16 bytes of OS entropy, and all of them reach the noise: two fits (the
    same initial weights) whose entropy differs only in its last byte end with other weights."""
    import os

    import medcausal as mc
    from medcausal.privacy import engine

    sim = mc.synthetic.scm("chain")
    df = sim.sample(400, seed=0)
    bounds = {"x1": (-5, 5), "x2": (-2, 15), "x3": (-15, 15)}
    weights = []
    for last in (1, 2):
        def urandom(k, last=last):  # with k = 16, the seed 2**120 * last: nothing in the low 15 bytes
            return bytes(k - 1) + bytes([last])

        monkeypatch.setattr(engine.os, "urandom", urandom)
        model = mc.CausalModel(sim.graph).fit(df, privacy=Privacy(noise_multiplier=1.0, public_bounds=bounds),
                                              max_epochs=1, verbose=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.mechanisms.parameters()]))
    monkeypatch.setattr(engine.os, "urandom", os.urandom)
    assert engine.SEED_BYTES == 16 and not torch.equal(weights[0], weights[1])
