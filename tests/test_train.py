import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from medcausal.crl.ivae import IVAE
from medcausal.errors import MedCausalError
from medcausal.graph import Continuous
from medcausal.mechanisms.base import StandaloneLoss
from medcausal.mechanisms.flow import FlowMechanism
from medcausal.train import TrainConfig, train, train_rounds


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


def test_rounds_share_the_steps_and_number_epochs_across_runs():
    m, seen = Mean(), []
    config = TrainConfig(max_epochs=100, max_steps=7, batch_size=10, val_fraction=0.0, verbose=False)
    result, runs = train_rounds(m, {"x": torch.ones(1000, 1)}, config, 3,
                                after_round=lambda r: seen.append((r, m.mu.item())))
    # 7 steps over 3 runs: 3 + 2 + 2 (a share each, not the first run taking all)
    assert runs == 3 and result.steps == 7 and [r for r, _ in seen] == [0, 1, 2]
    assert [h["round"] for h in result.history] == [0, 1, 2]
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert seen[-1][1] == m.mu.item() != 0.0  # after_round sees the weights each run ended with


def test_rounds_keep_the_best_validation_loss_of_any_run():
    torch.manual_seed(0)
    config = TrainConfig(max_epochs=6, lr=0.05, batch_size=20, verbose=False)
    result, runs = train_rounds(Mean(), {"x": torch.randn(200, 1) + 3.0}, config, 2)
    assert runs == 2 and len(result.history) == 6
    best = min(range(6), key=lambda e: result.history[e]["val_loss"])
    assert result.best_epoch == best
    assert result.best_val_loss == pytest.approx(result.history[best]["val_loss"])


@pytest.mark.parametrize("rounds", [0, 7, 2.0, True])
def test_bad_rounds_are_refused(rounds):
    with pytest.raises(MedCausalError, match="rounds must be an integer between 1 and max_epochs \\(6\\)"):
        train_rounds(Mean(), {"x": torch.ones(10, 1)}, TrainConfig(max_epochs=6, verbose=False), rounds)


def test_divergence_is_reported():
    class Boom(Mean):
        def forward(self, batch):
            return batch["x"].squeeze(-1) * float("nan") + self.mu
    with pytest.raises(MedCausalError, match="diverged"):
        train(Boom(), {"x": torch.ones(100, 1)}, TrainConfig(verbose=False))


def test_given_val_rows_are_the_validation_set_and_never_train():
    # rows 0-79 hold 0, rows 80-99 hold 10: trained on the first only, mu goes to 0, and each epoch's
    # validation loss is the squared error on the last rows, (10 - mu)^2 (a random split would mix them)
    x = torch.cat([torch.zeros(80, 1), torch.full((20, 1), 10.0)])
    m = Mean()
    result = train(m, {"x": x}, TrainConfig(max_epochs=60, lr=0.1, batch_size=16, patience=100,
                                            val_rows=range(80, 100), verbose=False))
    assert abs(m.mu.item()) < 1e-3
    assert result.history[-1]["val_loss"] == pytest.approx((10.0 - m.mu.item()) ** 2, rel=1e-5)


@pytest.mark.parametrize("rows, message", [((0, 100), "must index the 100 rows"), ((3, 3), "more than once"),
                                           (range(100), "none are left to train on")])
def test_bad_val_rows_are_refused(rows, message):
    with pytest.raises(MedCausalError, match=message):
        train(Mean(), {"x": torch.zeros(100, 1)}, TrainConfig(max_epochs=1, val_rows=rows, verbose=False))


def test_private_training_refuses_val_rows():
    with pytest.raises(MedCausalError, match="private training has no validation set"):
        train(Mean(), {"x": torch.zeros(100, 1)}, TrainConfig(max_epochs=1, val_rows=[0], verbose=False),
              privacy=object())


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
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
""")


def _run(args, tmp_path, text=DDP_SCRIPT):
    script = tmp_path / "fit.py"
    script.write_text(text)
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


class TwoMeans(nn.Module):
    """Two independent parts: ``a`` converges, ``b`` is pushed away from its optimum after epoch 0."""

    def __init__(self, a: nn.Module | None = None):
        super().__init__()
        self.a, self.b = a or Mean(), Mean()

    def parts(self):
        return {"a": self.a, "b": self.b}

    def part_losses(self, batch):
        return {"a": self.a({"x": batch["x"]}), "b": self.b({"x": batch["y"]})}

    def forward(self, batch):
        return sum(self.part_losses(batch).values())


def test_each_part_keeps_its_own_best_epoch():
    # Part b's data mean is 0 and its parameter starts there; a large lr on a noisy target makes
    # it wander, so its best epoch is an early one, while part a (mean 3, starting at 0) needs
    # many epochs. A joint choice of one epoch would give up one of the two.
    torch.manual_seed(0)
    x = torch.randn(400, 1) * 0.1 + 3.0
    y = torch.randn(400, 1) * 5.0
    m = TwoMeans()
    result = train(m, {"x": x, "y": y}, TrainConfig(max_epochs=60, lr=0.1, batch_size=8, patience=60,
                                                    verbose=False))
    hist = result.history
    best_a = min(range(len(hist)), key=lambda e: hist[e]["val_parts"]["a"])
    best_b = min(range(len(hist)), key=lambda e: hist[e]["val_parts"]["b"])
    assert result.best_epochs == {"a": best_a, "b": best_b}
    assert best_a != best_b
    # the restored weights reproduce each part's best validation loss
    assert result.best_val_loss == pytest.approx(hist[best_a]["val_parts"]["a"] + hist[best_b]["val_parts"]["b"])
    assert result.best_val_loss < min(h["val_loss"] for h in hist)
    val_rows = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:40]
    assert ((x[val_rows] - m.a.mu) ** 2).mean().item() == pytest.approx(hist[best_a]["val_parts"]["a"], rel=1e-5)
    assert ((y[val_rows] - m.b.mu) ** 2).mean().item() == pytest.approx(hist[best_b]["val_parts"]["b"], rel=1e-5)


def test_parts_stop_only_when_none_improves():
    torch.manual_seed(0)
    m = TwoMeans()
    result = train(m, {"x": torch.randn(200, 1) + 3.0, "y": torch.randn(200, 1)},
                   TrainConfig(max_epochs=500, lr=0.5, patience=3, verbose=False))
    assert result.stopped_early
    last_improvement = max(result.best_epochs.values())
    assert len(result.history) == last_improvement + 1 + 3


def test_a_module_that_does_not_select_keeps_its_last_weights_and_runs_to_the_end():
    class LastMean(Mean):
        select_by_validation = False

    torch.manual_seed(0)
    x = torch.randn(200, 1)
    m = LastMean()
    result = train(m, {"x": x}, TrainConfig(max_epochs=30, lr=0.5, patience=3, verbose=False))
    assert not result.stopped_early and len(result.history) == 30  # patience=3 alone would stop it
    val_rows = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:20]
    last = result.history[-1]["val_loss"]
    assert ((x[val_rows] - m.mu) ** 2).mean().item() == pytest.approx(last, rel=1e-5)
    assert result.best_val_loss == pytest.approx(last) and result.best_epoch == 29


def test_a_part_left_out_keeps_its_last_weights_and_the_others_decide_stopping():
    class OnlyA(TwoMeans):
        def parts(self):
            return {"a": self.a}

    torch.manual_seed(0)
    x, y = torch.randn(200, 1) + 3.0, torch.randn(200, 1)
    m = OnlyA()
    result = train(m, {"x": x, "y": y}, TrainConfig(max_epochs=500, lr=0.5, patience=3, verbose=False))
    assert result.stopped_early and len(result.history) == result.best_epochs["a"] + 1 + 3
    assert result.best_epochs["b"] == len(result.history) - 1
    val_rows = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:20]
    assert ((y[val_rows] - m.b.mu) ** 2).mean().item() == pytest.approx(result.history[-1]["val_parts"]["b"],
                                                                        rel=1e-5)


def test_after_optimizer_step_hooks_run_once_per_step():
    class Counting(Mean):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def after_optimizer_step(self):
            self.calls += 1

    m = Counting()
    result = train(m, {"x": torch.ones(100, 1)}, TrainConfig(max_steps=7, batch_size=10, verbose=False))
    assert result.steps == 7 and m.calls == 7


def test_parts_and_part_losses_must_agree():
    class NoParts(Mean):
        def part_losses(self, batch):
            return {"a": self(batch)}

    with pytest.raises(MedCausalError, match="both parts\\(\\) and part_losses\\(\\)"):
        train(NoParts(), {"x": torch.ones(40, 1)}, TrainConfig(max_epochs=1, verbose=False))

    class Misnamed(TwoMeans):
        def parts(self):
            return {"a": self.a, "c": self.b}

    with pytest.raises(MedCausalError, match=r"\['c'\].*part_losses"):
        train(Misnamed(), {"x": torch.ones(40, 1), "y": torch.ones(40, 1)}, TrainConfig(max_epochs=1, verbose=False))


def test_without_a_validation_split_the_training_loss_decides_for_every_part():
    torch.manual_seed(0)
    m = TwoMeans()
    result = train(m, {"x": torch.randn(200, 1) + 3.0, "y": torch.randn(200, 1)},
                   TrainConfig(max_epochs=30, lr=0.5, patience=3, val_fraction=0.0, verbose=False))
    best = min(range(len(result.history)), key=lambda e: result.history[e]["train_loss"])
    assert result.best_epochs == {"a": best, "b": best}
    assert result.best_val_loss == pytest.approx(result.history[best]["train_loss"])


class Cliff(nn.Module):
    """Squared error to data near 4.9, and a cliff just past the minimum (w > 5). Records the
    weight each forward sees, and counts updates in a buffer (state the guard must restore)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.seen: list[float] = []
        self.seen_updates: list[int] = []

    def forward(self, batch):
        self.seen.append(self.w.item())
        self.seen_updates.append(int(self.updates))
        return (batch["x"].squeeze(-1) - self.w).pow(2) + 1e6 * torch.relu(self.w - 5).pow(2)

    def after_optimizer_step(self):
        self.updates += 1


def _fit_cliff(spike_guard):
    torch.manual_seed(0)
    m = Cliff()
    x = 4.9 + 0.01 * torch.randn(640, 1)
    result = train(m, {"x": x}, TrainConfig(max_epochs=20, lr=0.2, batch_size=64, val_fraction=0.0,
                                            spike_guard=spike_guard, verbose=False))
    return m, result


def test_spike_guard_undoes_the_update_that_went_over_the_cliff():
    m, result = _fit_cliff(50.0)
    # Adam's momentum carries w over the cliff once; the next gradient is ~1e4 times the recent ones
    assert result.rolled_back == 1
    k = next(i for i, w in enumerate(m.seen) if w > 5)  # the forward after the bad update
    assert m.seen[k + 1] == m.seen[k - 1]  # the weight before that update, exactly
    assert m.seen_updates[k + 1] == m.seen_updates[k - 1] == k - 1  # and the module's buffers
    lrs = [h["lr"] for h in result.history]  # 10 steps per epoch: the spike is in epoch k // 10
    assert lrs[:k // 10] == [0.2] * (k // 10) and lrs[k // 10:] == [0.1] * (len(lrs) - k // 10)  # half the step
    assert max(m.seen[k + 1:]) < 5.0  # and never over the cliff again
    assert max(h["train_loss"] for h in result.history[3:]) < 0.01
    assert abs(m.w.item() - 4.9) < 0.01


def test_without_the_spike_guard_the_same_fit_pays_for_the_cliff():
    # the check above can fail: unguarded, the same run goes over and its epoch's loss jumps
    m, result = _fit_cliff(None)
    assert result.rolled_back == 0 and max(m.seen) > 5
    assert max(h["train_loss"] for h in result.history[3:]) > 10


def test_spike_guard_gives_up_on_a_gradient_that_stays_huge():
    class Runaway(Mean):
        def forward(self, batch):
            grow = 10.0 ** (self.steps // 30 * 4)  # after 30 steps every gradient is 1e4 times larger
            self.steps += 1
            return (batch["x"] - self.mu).pow(2).squeeze(-1) * grow

    m = Runaway()
    m.steps = 0
    x = 3.0 + 0.1 * torch.randn(100, 1, generator=torch.Generator().manual_seed(0))  # far from mu = 0
    with pytest.raises(MedCausalError, match="25 gradients in a row over 50x"):
        train(m, {"x": x}, TrainConfig(max_steps=200, batch_size=10, val_fraction=0.0, verbose=False))
    assert m.steps == 30 + 2 * 25 + 1  # 25 skips allowed (each batch also tried at the earlier weights)


@pytest.mark.parametrize("bad", [1.0, 0.5, math.inf, "50", True])
def test_spike_guard_setting_is_checked(bad):
    with pytest.raises(MedCausalError, match="spike_guard"):
        TrainConfig(spike_guard=bad)


def test_spike_guard_skips_outlying_rows_and_warns_without_touching_the_learning_rate():
    # three rows 3000 sd out: every batch holding one is as far out whatever the weights
    x = 2.0 + torch.randn(2000, 1, generator=torch.Generator().manual_seed(0))
    x[[5, 700, 1400]] = 3000.0
    runs = {}
    for guard in (50.0, None):
        config = TrainConfig(max_epochs=60, lr=0.05, batch_size=64, val_fraction=0.0, patience=1000,
                             spike_guard=guard, verbose=False)  # no plateau halvings: the guard's alone
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[guard] = (train(Mean(), {"x": x}, config), [str(w.message) for w in caught])
    guarded, messages = runs[50.0]
    # their batches are as far out at the earlier weights: skipped, no update undone, no lr lost
    assert guarded.skipped_batches > 30 and guarded.rolled_back == 0
    assert any("skipped" in m and "rows far out of line" in m for m in messages)
    assert guarded.history[-1]["lr"] == runs[None][0].history[-1]["lr"] == 0.05
    assert runs[None][0].skipped_batches == 0 and not runs[None][1]


CLIFF_DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from torch import nn
    from medcausal.train import TrainConfig, train

    class Cliff(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, batch):
            return (batch["x"].squeeze(-1) - self.w).pow(2) + 1e6 * torch.relu(self.w - 5).pow(2)

    x = 4.9 + 0.01 * torch.randn(640, 1, generator=torch.Generator().manual_seed(0))
    m = Cliff()
    r = train(m, {"x": x}, TrainConfig(max_epochs=20, lr=0.2, batch_size=64, val_fraction=0.0, verbose=False))
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"w": m.w.detach(), "rolled_back": torch.tensor(r.rolled_back),
                "lr": torch.tensor(r.history[-1]["lr"])}, sys.argv[1] + f"/rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
""")


@pytest.mark.slow  # torchrun, 27 s; the default run keeps the two-rank equivalence test
def test_ddp_ranks_take_the_spike_guard_s_decisions_together(tmp_path):
    # the guard's second look at a batch runs forward and backward again under DDP: every rank
    # must do it at the same step, or the gradient all-reduce would hang or mix steps
    for where, args in (("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
                        ("single", [])):
        (tmp_path / where).mkdir()
        _run(args, tmp_path / where, CLIFF_DDP_SCRIPT)
    r0, r1, one = (torch.load(tmp_path / w / f, weights_only=True)
                   for w, f in (("ddp", "rank0.pt"), ("ddp", "rank1.pt"), ("single", "rank0.pt")))
    assert int(r0["rolled_back"]) == int(r1["rolled_back"]) == int(one["rolled_back"]) == 1
    assert torch.equal(r0["w"], r1["w"]) and float(r0["lr"]) == float(r1["lr"]) == pytest.approx(0.1)
    torch.testing.assert_close(r0["w"], one["w"], atol=1e-4, rtol=1e-4)


def test_spike_guard_slows_only_the_part_that_went_over_the_cliff():
    g = torch.Generator().manual_seed(0)
    data = {"x": 4.9 + 0.01 * torch.randn(640, 1, generator=g), "y": 3.0 + torch.randn(640, 1, generator=g)}
    m = TwoMeans(a=Cliff())
    result = train(m, data, TrainConfig(max_epochs=20, lr=0.2, batch_size=64, val_fraction=0.0, patience=1000,
                                        verbose=False))  # no plateau halvings: the guard's alone
    assert result.rolled_back == 1
    assert result.history[-1]["lr_parts"] == {"a": pytest.approx(0.1), "b": pytest.approx(0.2)}
    assert abs(m.a.w.item() - 4.9) < 0.01 and abs(m.b.mu.item() - data["y"].mean().item()) < 0.1


def test_spike_guard_undoes_an_update_whose_loss_overflows():
    class Overflow(Cliff):  # past the cliff the loss is inf: no gradient to measure at all
        def forward(self, batch):
            self.seen.append(self.w.item())
            return (batch["x"].squeeze(-1) - self.w).pow(2) + torch.expm1(1e6 * torch.relu(self.w - 5))

    def fit(spike_guard):
        torch.manual_seed(0)
        m = Overflow()
        x = 4.9 + 0.01 * torch.randn(640, 1)
        config = TrainConfig(max_epochs=20, lr=0.2, batch_size=64, val_fraction=0.0, spike_guard=spike_guard,
                             verbose=False)
        return m, train(m, {"x": x}, config)

    m, result = fit(50.0)
    assert result.rolled_back >= 1 and max(m.seen) > 5  # it did go over, and came back
    assert abs(m.w.item() - 4.9) < 0.01
    with pytest.raises(MedCausalError, match="loss is inf"):
        fit(None)


@pytest.mark.parametrize("settings, name", [
    ({"lr": 0.0}, "lr"), ({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"patience": 0}, "patience"), ({"patience": -1}, "patience"),
    ({"max_steps": 0}, "max_steps"), ({"max_steps": -3}, "max_steps"),
    ({"grad_clip": -1.0}, "grad_clip"), ({"grad_clip": 0.0}, "grad_clip"),
    ({"max_epochs": 1.5}, "max_epochs"), ({"batch_size": 8.5}, "batch_size"),
    ({"max_epochs": 0}, "max_epochs"), ({"batch_size": 0}, "batch_size"),
    ({"seed": None}, "seed"), ({"val_fraction": float("nan")}, "val_fraction"),
])
def test_settings_that_make_no_sense_are_refused_by_name(settings, name):
    with pytest.raises(MedCausalError, match=name):
        TrainConfig(**settings)


def test_valid_settings_still_accepted():
    cfg = TrainConfig(grad_clip=None, max_steps=1, patience=1, lr=1e-5, seed=-1, weight_decay=0.0)
    assert (cfg.grad_clip, cfg.max_steps, cfg.patience, cfg.lr, cfg.seed) == (None, 1, 1, 1e-5, -1)


def test_negative_grad_clip_never_reverses_the_gradient():
    # Old code: clip_grad_norm_ with a negative max norm flipped every gradient (ascent).
    m = Mean()
    try:
        train(m, {"x": torch.full((40, 1), 3.0)}, TrainConfig(max_epochs=3, grad_clip=-1.0, verbose=False))
    except MedCausalError:
        return
    assert m.mu.item() > 0


@pytest.mark.parametrize("n, fraction", [(20, 0.99), (40, 0.99)])
def test_a_validation_split_that_leaves_no_training_rows_is_refused(n, fraction):
    with pytest.raises(MedCausalError, match="val_fraction"):
        train(Mean(), {"x": torch.ones(n, 1)}, TrainConfig(val_fraction=fraction, max_epochs=2, verbose=False))


def test_tensors_of_different_lengths_are_refused_by_name():
    with pytest.raises(MedCausalError, match="'y'"):
        train(Mean(), {"x": torch.ones(40, 1), "y": torch.ones(30, 1)}, TrainConfig(max_epochs=1, verbose=False))


def test_no_tensors_is_refused():
    with pytest.raises(MedCausalError, match="no tensors"):
        train(Mean(), {}, TrainConfig(max_epochs=1, verbose=False))


def test_non_finite_data_is_named_not_blamed_on_the_learning_rate():
    x = torch.ones(100, 1)
    x[5] = float("nan")
    with pytest.raises(MedCausalError, match="'x'") as err:
        train(Mean(), {"x": x}, TrainConfig(max_epochs=1, verbose=False))
    assert "lr" not in str(err.value)


def test_divergence_names_the_part_whose_loss_is_not_finite():
    class TwoParts(TwoMeans):  # part "b" has an infinite loss
        def part_losses(self, batch):
            losses = super().part_losses(batch)
            return {"a": losses["a"], "b": losses["b"] * float("inf")}

    with pytest.raises(MedCausalError, match="diverged") as err:
        data = {"x": torch.ones(100, 1), "y": torch.ones(100, 1)}
        train(TwoParts(), data, TrainConfig(max_epochs=1, verbose=False))
    assert "'b'" in str(err.value) and "'a'" not in str(err.value)


def test_float64_tensors_train_a_float32_module():
    torch.manual_seed(0)
    mech = FlowMechanism(Continuous(), parents=1, transforms=1, hidden=[8])
    x, pa = torch.randn(30, 1, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)
    result = train(StandaloneLoss(mech), {"x": x, "pa": pa}, TrainConfig(max_epochs=2, verbose=False))
    assert result.steps == 2
    torch.manual_seed(0)
    ref = FlowMechanism(Continuous(), parents=1, transforms=1, hidden=[8])
    train(StandaloneLoss(ref), {"x": x.float(), "pa": pa.float()}, TrainConfig(max_epochs=2, verbose=False))
    for p, q in zip(mech.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_a_part_still_learning_keeps_its_learning_rate_when_the_others_stall():
    """One plateau schedule on the summed validation loss halved every part's rate once a large,
    converged part stopped improving, freezing a small part far from its optimum."""
    x = torch.tensor([[3.0], [-3.0]] * 300)  # part a: at its optimum (mean 0 in both splits): loss 9, flat
    y = torch.full((600, 1), 0.02)            # part b: a tiny loss, Adam moves it ~1e-4 per step toward 0.02
    m = TwoMeans()
    result = train(m, {"x": x, "y": y}, TrainConfig(max_epochs=60, lr=1e-4, batch_size=600, patience=60,
                                                    seed=0, val_rows=tuple(range(120))))
    assert m.b.mu.item() > 0.005  # ~60 steps of ~1e-4 (0.0057); with its rate halved twice: 0.0036
    lrs = result.history[-1]["lr_parts"]
    assert lrs["b"] == 1e-4 and lrs["a"] < 1e-4  # b still improves: its rate stays; a's fell


# Standalone fits (outside CausalModel) seeded torch's global RNG with torch.manual_seed(seed):
# the caller's next draws became the continuation of the fit's own stream. Each helper below
# builds its model (weight initialization draws from the caller's RNG, as any torch module
# does) and returns the fit alone.
def _image_data(n=8, size=8):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, size, size, generator=gen), torch.randn(n, 1, generator=gen)


def _hvae():
    from medcausal.graph import Image
    from medcausal.mechanisms.hvae import HVAEMechanism
    x, pa = _image_data()
    m = HVAEMechanism(Image((1, 8, 8)), parents=1, channels=[4, 8], z_dim=3, latent_levels=2)
    return m, x, pa


def _fit_hvae():
    m, x, pa = _hvae()
    return lambda: m.fit(x, pa, max_steps=2, batch_size=4, verbose=False)


def _finetune_hvae():
    m, x, pa = _hvae()
    nll = lambda img, p: (img.mean((1, 2, 3)) - p[:, 0]) ** 2  # noqa: E731
    return lambda: m.finetune_counterfactual(x, pa, nll, max_steps=2, batch_size=4, verbose=False)


def _fit_image_diffusion():
    from medcausal.graph import Image
    from medcausal.mechanisms.image_diffusion import ImageDiffusionMechanism
    x, pa = _image_data(size=16)
    m = ImageDiffusionMechanism(Image((1, 16, 16)), parents=1, channels=[8, 16], norm_num_groups=4,
                                cond_hidden=8, steps=2)
    return lambda: m.fit(x, pa, max_steps=2, batch_size=4, verbose=False)


def _fit_predictor():
    from medcausal.metrics.predictors import AntiCausalPredictor
    x, pa = _image_data()
    p = AntiCausalPredictor((1, 8, 8), {"a": "continuous"}, channels=[4], features=8)
    return lambda: p.fit(x.numpy(), {"a": pa[:, 0].numpy()}, max_epochs=1, batch_size=4, verbose=False)


def _fit_ivae():
    from medcausal.crl.ivae import nonlinear_ica_data
    x, u, _ = nonlinear_ica_data(n_segments=3, n_per_segment=20, n_sources=2, seed=0)
    return lambda: IVAE(2, hidden=(8,)).fit(x, u, max_epochs=1, verbose=False)


def _fit_fcr():
    from medcausal.adapters import singlecell as scad
    from medcausal.synthetic.perturbseq import PerturbSeq
    cells = PerturbSeq(n_genes=20, n_perturbations=2, seed=0).sample(60, seed=0)
    scad.setup_anndata(cells, perturbation_key="perturbation", control="control", covariate_keys=["cell_type"])
    return lambda: scad.FCRModel(hidden=[8], decoder_hidden=[8]).fit(cells, max_epochs=1, seed=0, verbose=False)


STANDALONE_FITS = {"hvae": _fit_hvae, "hvae-finetune": _finetune_hvae, "image-diffusion": _fit_image_diffusion,
                   "anti-causal-predictor": _fit_predictor, "ivae": _fit_ivae, "fcr": _fit_fcr}


@pytest.mark.parametrize("make_fit", STANDALONE_FITS.values(), ids=STANDALONE_FITS.keys())
def test_standalone_fits_leave_the_callers_global_rng_as_it_was(make_fit):
    fit = make_fit()
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    fit()
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
