"""Counterfactual image metrics on cases whose answers are known analytically."""

import numpy as np
import pandas as pd
import pytest

import medcausal as mc
from medcausal.errors import DataError
from medcausal.metrics import images as im

RNG = np.random.default_rng(0)


def test_composition_of_a_sound_and_a_drifting_model():
    x = RNG.random((5, 1, 8, 8))
    assert im.composition(lambda a: a, x, steps=10).l1 == [0.0] * 10
    drift = im.composition(lambda a: a + 0.125, x, steps=10)  # exact in binary floating point
    assert drift.l1 == [0.125 * k for k in range(1, 11)]
    assert drift.at(10) == 1.25 and drift.ratio(10) == 10.0
    # A model that converges to a fixed point after one step: composition 10 == composition 1.
    proj = im.composition(lambda a: np.clip(a, 0.25, 0.75), x, steps=10)
    assert proj.at(10) == pytest.approx(proj.at(1)) and proj.at(1) > 0


def test_composition_reads_cohorts_by_image_name():
    table = pd.DataFrame({"age": [1.0, 2.0]})
    c = mc.Cohort(table, {"mri": np.zeros((2, 1, 4, 4))})

    def shift(cohort):
        return mc.Cohort(cohort.table, {"mri": cohort.arrays["mri"] + 0.5})
    assert im.composition(shift, c, steps=2, image="mri").l1 == [0.5, 1.0]
    with pytest.raises(DataError, match="'scan'"):
        im.composition(shift, c, steps=1, image="scan")


def test_reversibility_exact_and_lossy():
    x = RNG.random((4, 1, 8, 8))
    assert im.reversibility(lambda a: 2 * a, lambda a: a / 2, x, cycles=3).l1 == pytest.approx([0, 0, 0], abs=1e-15)
    lossy = im.reversibility(lambda a: a + 1.0, lambda a: a - 0.75, x, cycles=3)
    assert lossy.l1 == pytest.approx([0.25, 0.5, 0.75])
    assert len(lossy.per_image) == 4


def test_soundness_rejects_shape_changes():
    with pytest.raises(DataError, match="shape"):
        im.composition(lambda a: a[:, :, :4], np.zeros((2, 1, 8, 8)), steps=1)
    with pytest.raises(DataError, match="steps"):
        im.composition(lambda a: a, np.zeros((2, 1, 8, 8)), steps=0)


def test_effectiveness_known_values():
    assert im.effectiveness([1.0, 2.0, 4.0], [1.0, 3.0, 1.0])["mae"] == pytest.approx(4 / 3)
    b = im.effectiveness([0.2, 0.7, 0.6, 0.1], [0, 1, 0, 1], kind="binary")
    # pairs (pos, neg): (0.7>0.2), (0.7>0.6), (0.1<0.2), (0.1<0.6) -> AUC 2/4; accuracy 2/4
    assert b == {"accuracy": 0.5, "auc": 0.5}
    assert np.isnan(im.effectiveness([0.9, 0.8], [1, 1], kind="binary")["auc"])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    assert im.effectiveness(probs, [0, 2, 0], kind="categorical")["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(DataError):
        im.effectiveness([1.0], [1.0, 2.0])


def test_effectiveness_reads_a_label_column_as_labels_and_checks_targets_against_probabilities():
    # [n, 1] is a column of labels (it was argmax'ed to all zeros: accuracy 1/3 for a perfect match)
    assert im.effectiveness(np.array([[2], [1], [0]]), [2, 1, 0], kind="categorical") == {"accuracy": 1.0}
    assert im.effectiveness(np.eye(3)[[2, 1, 0]], np.array([[2], [1], [0]]), kind="categorical") == {"accuracy": 1.0}
    assert im.effectiveness(np.eye(3)[[2, 1, 0]], np.eye(3)[[2, 1, 1]], kind="categorical")["accuracy"] == \
        pytest.approx(2 / 3)
    assert im.effectiveness(["a", "b", "c"], ["a", "c", "c"], kind="categorical")["accuracy"] == pytest.approx(2 / 3)
    # probabilities give class positions: targets that are not positions 0..k-1 cannot be scored (were: 0)
    for target in (["a", "b"], [1, 2], [0, 0.5]):
        with pytest.raises(DataError, match="class indices 0..1"):
            im.effectiveness(np.eye(2), target, kind="categorical")
    with pytest.raises(DataError, match="must be numeric"):
        im.effectiveness([["x", "y"], ["z", "w"]], [0, 1], kind="categorical")


def test_soundness_curves_keep_their_baseline_when_the_model_edits_its_input_in_place():
    shift = lambda a: np.add(a, 0.25, out=a)  # noqa: E731
    assert im.composition(shift, np.zeros((2, 1, 4, 4)), steps=3).l1 == pytest.approx([0.25, 0.5, 0.75])
    up, down = (lambda a: np.add(a, 1.0, out=a)), (lambda a: np.add(a, 0.5, out=a))
    assert im.reversibility(up, down, np.zeros((2, 1, 4, 4)), cycles=2).l1 == pytest.approx([1.5, 3.0])


def test_true_counterfactual_error_mae_and_ssim():
    from skimage.metrics import structural_similarity

    t = RNG.random((3, 1, 16, 16))
    same = im.true_counterfactual_error(t, t)
    assert same["mae"] == 0.0 and same["ssim"] == pytest.approx(1.0)
    shifted = im.true_counterfactual_error(t + 0.1, t, data_range=1.0)
    assert shifted["mae"] == pytest.approx(0.1) and shifted["mae_sd"] == pytest.approx(0.0, abs=1e-12)
    p = RNG.random((3, 1, 16, 16))
    got = im.true_counterfactual_error(p, t, data_range=1.0)["ssim"]
    want = np.mean([structural_similarity(t[i, 0], p[i, 0], data_range=1.0, win_size=7) for i in range(3)])
    assert got == pytest.approx(want) and got < 0.2
    with pytest.raises(DataError, match="shape"):
        im.true_counterfactual_error(t[:2], t)


def test_oracle_effectiveness_uses_the_measure_function():
    imgs = np.zeros((3, 1, 4, 4))
    imgs[:, 0, :2] = np.array([1.0, 2.0, 3.0])[:, None, None]  # top half brightness

    def measure(x):
        return {"top": x[:, 0, :2].mean((1, 2)), "bottom": x[:, 0, 2:].mean((1, 2))}
    out = im.oracle_effectiveness(measure, imgs, {"top": [1.0, 2.5, 3.0]})
    assert out == {"top": {"mae": pytest.approx(0.5 / 3)}}
    with pytest.raises(DataError, match="'left'"):
        im.oracle_effectiveness(measure, imgs, {"left": [0, 0, 0]})


def test_frechet_distance_matches_the_gaussian_formula():
    # N(0, I_d) vs N(m, s^2 I_d): FD = |m|^2 + d (1 - s)^2.
    d, n = 4, 40000
    rng = np.random.default_rng(1)
    a = rng.normal(size=(n, d))
    m, s = np.array([1.0, 0.0, -0.5, 0.0]), 2.0
    b = m + s * rng.normal(size=(n, d))
    want = (m ** 2).sum() + d * (1 - s) ** 2
    assert im.frechet_distance(a, b) == pytest.approx(want, rel=0.03)
    assert im.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(DataError):
        im.frechet_distance(a, b[:, :3])


def test_frechet_distance_warns_when_its_covariances_are_rank_deficient():
    # two samples of one 32-d standard normal, 32 rows each: FD 0 in truth, about 19 estimated
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(32, 32)), rng.normal(size=(32, 32))
    with pytest.warns(UserWarning, match="32 rows for 32 features"):
        assert im.frechet_distance(a, b) > 5.0


def test_change_decomposition_splits_the_true_counterfactual_error():
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 8, 8))
    t = x + np.where(rng.random(x.shape) < 0.3, 0.4, 0.01)   # 30% of the pixels change a lot
    p = x + 0.5 * (t - x) + 0.02 * rng.standard_normal(x.shape)
    d = im.change_decomposition(x, p, t)
    mae = im.true_counterfactual_error(p, t)["mae"]
    assert mae == pytest.approx(d["changed_fraction"] * d["missed"] + (1 - d["changed_fraction"]) * d["error_elsewhere"])
    unchanged = im.change_decomposition(x, x, t)    # the factual scan: misses all, invents nothing
    assert unchanged["captured"] == pytest.approx(0.0) and unchanged["spurious"] == 0.0
    perfect = im.change_decomposition(x, t, t)
    assert perfect["captured"] == 1.0 and perfect["error_elsewhere"] == 0.0
    assert perfect["spurious"] == pytest.approx(0.01) and perfect["true_elsewhere"] == pytest.approx(0.01)
    with pytest.raises(DataError, match="threshold"):
        im.change_decomposition(x, p, t, threshold=-1.0)
    with pytest.raises(DataError, match="shape"):
        im.change_decomposition(x, p[:, :, :4], t)


def test_effectiveness_rejects_nan_empty_and_mismatched_input():
    with pytest.raises(DataError, match="predicted"):
        im.effectiveness([np.nan, 1.0], [1.0, 1.0])
    with pytest.raises(DataError, match="target"):
        im.effectiveness([1.0, 1.0], [np.nan, 1.0])
    with pytest.raises(DataError, match="empty|no rows"):
        im.effectiveness([], [])
    with pytest.raises(DataError, match="predicted"):  # [n, 2] vs [n] used to broadcast
        im.effectiveness([[1.0, 2.0], [3.0, 4.0]], [1.0, 3.0])
    with pytest.raises(DataError, match="target"):  # accuracy 0.5 on labels {1, 2} before
        im.effectiveness([0.1, 0.9, 0.2, 0.8], [1, 2, 1, 2], kind="binary")
    with pytest.raises(DataError, match="predicted"):
        im.effectiveness([[0.1, 0.9], [0.8, 0.2]], [1, 0], kind="binary")
    with pytest.raises(DataError, match="predicted"):
        im.effectiveness(1.0, 1.0)
    # known answers still hold; a one-hot categorical target is read as labels
    assert im.effectiveness([[1.0], [3.0]], [1.0, 2.0]) == {"mae": 0.5}
    assert im.effectiveness([[0.1, 0.9], [0.8, 0.2]], [[0, 1], [0, 1]], kind="categorical") == {"accuracy": 0.5}


def test_true_counterfactual_error_on_tiny_and_empty_images():
    x = np.arange(8.0).reshape(2, 1, 2, 2)
    with pytest.raises(DataError, match="3x3|3 x 3"):  # ZeroDivisionError from skimage before
        im.true_counterfactual_error(x, x)
    with pytest.raises(DataError, match="no images|empty"):
        im.true_counterfactual_error(np.zeros((0, 1, 8, 8)), np.zeros((0, 1, 8, 8)))
    with pytest.raises(DataError, match="no images|empty"):  # nan before
        im.mean_absolute_error(np.zeros((0, 1, 8, 8)), np.zeros((0, 1, 8, 8)))
    with pytest.raises(DataError, match="numeric"):
        im.mean_absolute_error([["a"]], [["b"]])


def test_frechet_distance_rejects_non_finite_features():
    rng = np.random.default_rng(0)
    a = np.r_[rng.random((5, 2)), [[np.nan, 1.0]]]
    with pytest.raises(DataError, match="non-finite"):  # nan before
        im.frechet_distance(a, rng.random((5, 2)))
