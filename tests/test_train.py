import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from medcausal.errors import MedCausalError
from medcausal.train import TrainConfig, train


class Mean(nn.Module):
    def __init__(self):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        return (batch["x"] - self.mu).pow(2).squeeze(-1)


def test_converges_to_the_mean():
    torch.manual_seed(0)
    x = torch.randn(400, 1) + 2.0
    m = Mean()
    result = train(m, {"x": x}, TrainConfig(max_epochs=200, lr=0.05, batch_size=64, val_fraction=0.0,
                                            verbose=False))
    # The minimizer of the squared loss is the sample mean; minibatch noise at the end stays below 0.03.
    assert abs(m.mu.item() - x.mean().item()) < 0.03
    assert result.history and result.steps > 0


def test_early_stopping_restores_best_weights():
    torch.manual_seed(0)
    x = torch.randn(200, 1)
    m = Mean()
    result = train(m, {"x": x}, TrainConfig(max_epochs=500, lr=0.5, patience=3, verbose=False))
    assert result.stopped_early
    best = min(h["val_loss"] for h in result.history)
    assert result.best_val_loss == pytest.approx(best)


def test_max_steps_caps_training():
    m = Mean()
    result = train(m, {"x": torch.ones(1000, 1)}, TrainConfig(max_steps=7, batch_size=10, verbose=False))
    assert result.steps == 7


def test_divergence_is_reported():
    class Boom(Mean):
        def forward(self, batch):
            return batch["x"].squeeze(-1) * float("nan") + self.mu
    with pytest.raises(MedCausalError, match="diverged"):
        train(Boom(), {"x": torch.ones(100, 1)}, TrainConfig(verbose=False))


def test_bad_config():
    with pytest.raises(MedCausalError, match="val_fraction"):
        TrainConfig(val_fraction=1.5)


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import medcausal as mc
    sim = mc.synthetic.scm("triangle")
    model = mc.CausalModel(sim.graph, mechanisms={"x2": {"name": "flow", "transforms": 1, "hidden": [8]}})
    model.fit(sim.sample(400, seed=0), max_epochs=3, batch_size=64, verbose=False)
    rank = int(os.environ.get("RANK", "0"))
    state = dict(model.mechanisms.state_dict())
    state["world_size"] = torch.tensor(model.fit_info["world_size"])
    torch.save(state, sys.argv[1] + f"/rank{rank}.pt")
""")


def _run(args, tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_two_ranks_end_identical_and_match_one_process(tmp_path):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], tmp_path / "ddp")
    _run([], tmp_path / "single")
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    one = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    assert int(r0.pop("world_size")) == int(r1.pop("world_size")) == 2
    assert int(one.pop("world_size")) == 1
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    # Each rank takes half of every minibatch and DDP averages the gradients: the same
    # updates as one process on whole minibatches, up to float32 summation order.
    for k in r0:
        torch.testing.assert_close(r0[k], one[k], atol=1e-4, rtol=1e-3)
