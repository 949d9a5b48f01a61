"""Bad-input handling and edge cases of the training loop and the tabular mechanisms."""

import numpy as np
import pandas as pd
import pytest
import torch

import medcausal as mc
from medcausal.errors import MedCausalError
from medcausal.graph import Categorical, Continuous
from medcausal.mechanisms.additive import AdditiveMechanism
from medcausal.mechanisms.base import StandaloneLoss
from medcausal.mechanisms.categorical import CategoricalMechanism
from medcausal.mechanisms.flow import FlowMechanism
from medcausal.train import TrainConfig, train
from test_train import Mean, TwoMeans


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


def test_model_divergence_names_the_variable():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=60), "b": rng.normal(size=60)})
    g = mc.CausalGraph({"a": "continuous", "b": "continuous"}, edges=[("a", "b")])
    with pytest.raises(MedCausalError, match="diverged") as err:
        mc.CausalModel(g, mechanisms={"b": "additive"}).fit(df, lr=1e6, max_epochs=50, batch_size=16,
                                                            verbose=False)
    assert "'b'" in str(err.value)


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


@pytest.mark.parametrize("cls, settings", [
    (FlowMechanism, {"bins": 0}), (FlowMechanism, {"transforms": -1}), (FlowMechanism, {"hidden": [0]}),
    (FlowMechanism, {"hidden": [-3]}), (AdditiveMechanism, {"n_quantiles": 0}),
    (AdditiveMechanism, {"hidden": [0]}),
])
def test_bad_mechanism_settings_are_refused_by_name(cls, settings):
    with pytest.raises(MedCausalError, match=next(iter(settings))):
        cls(Continuous(), parents=1, **settings)


def test_bad_categorical_hidden_is_refused():
    with pytest.raises(MedCausalError, match="hidden"):
        CategoricalMechanism(Categorical(("a", "b")), parents=1, hidden=[0])


def test_bad_mechanism_settings_name_the_variable_in_a_model():
    g = mc.CausalGraph({"a": "continuous", "b": "continuous"}, edges=[("a", "b")])
    df = pd.DataFrame({"a": np.arange(4.0), "b": np.arange(4.0)})
    with pytest.raises(MedCausalError, match="'b'.*bins"):
        mc.CausalModel(g, mechanisms={"b": {"name": "flow", "bins": 0}}).fit(df, max_epochs=1, verbose=False)


@pytest.mark.parametrize("index", [3.0, -1.0])
def test_categorical_value_outside_its_categories_is_refused(index):
    m = CategoricalMechanism(Categorical(("a", "b", "c")), parents=1)
    for verb in (m.log_prob, m.abduct):
        with pytest.raises(MedCausalError, match="categor"):
            verb(torch.tensor([[0.0], [index]]), torch.zeros(2, 1))


def test_additive_fitted_on_one_row_has_a_finite_likelihood():
    m = AdditiveMechanism(Continuous(), parents=1, hidden=[4])
    m.finalize(torch.ones(1, 1), torch.zeros(1, 1))
    assert torch.isfinite(m.bandwidth).all()
    assert torch.isfinite(m.log_prob(torch.ones(1, 1), torch.zeros(1, 1))).all()


def test_a_mechanism_setting_of_the_wrong_type_is_named():
    with pytest.raises(TypeError, match="bins"):
        FlowMechanism(Continuous(), parents=1, bins=2.5)


# ---- session 16 review -------------------------------------------------------------------


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


def test_a_root_category_starts_at_its_base_rate():
    """A parentless binary (prevalence 0.107 in 300 rows) was sampled at 0.455 after a default fit:
    its logits started uniform and the summed-loss schedule cut its rate before it got there."""
    rng = np.random.default_rng(0)
    n = 300
    smoker = (rng.random(n) < 0.10).astype(int)
    age = rng.normal(60, 10, n).round()
    sbp = 120 + 0.5 * (age - 60) + 10 * smoker + rng.normal(0, 5, n)
    df = pd.DataFrame({"smoker": smoker, "age": age, "sbp": sbp})
    graph = mc.CausalGraph({"smoker": "binary", "age": "continuous", "sbp": "continuous"},
                           edges=[("smoker", "sbp"), ("age", "sbp")])
    model = mc.CausalModel(graph).fit(df, seed=0, verbose=False, max_epochs=40)
    sampled = model.sample(20000, seed=1)["smoker"].mean()
    assert abs(sampled - smoker.mean()) < 0.02  # 20000 draws: sd 0.002; the old fit was 0.35 off


def test_the_base_rate_start_is_smoothed_for_a_declared_category_never_seen():
    m = CategoricalMechanism(Categorical(("I", "II", "III", "IV")), {})
    value = torch.tensor([[0.0]] * 60 + [[1.0]] * 35 + [[2.0]] * 5)
    m.start_from_data(value, torch.zeros(100, 0))
    p = m.logits(torch.zeros(1, 0)).exp()[0]
    torch.testing.assert_close(p, torch.tensor([60.5, 35.5, 5.5, 0.5]) / 102.0)
