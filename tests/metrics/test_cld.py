"""Counterfactual latent divergence (CLD, Sanchez & Tsaftaris 2022) on cases with known answers.

One-dimensional latents, so every distance and both empirical probabilities are counted
by hand: factual-class reference points at 0, 1, 2, 3 and target-class points at
6, 6.5, 7, 7.2.
"""

import math

import numpy as np
import pytest

from medcausal.errors import DataError
from medcausal.metrics.images import counterfactual_latent_divergence as cld

REF = np.array([[0.0], [1.0], [2.0], [3.0], [6.0], [6.5], [7.0], [7.2]])
CLS = np.array(["a", "a", "a", "a", "b", "b", "b", "b"])


def lse(p, q):
    return math.log(math.exp(p) + math.exp(q))


def test_ideal_counterfactual_scores_log_two():
    # factual 4 (class a), counterfactual 6.5 (class b): d = 2.5.
    # distances to class a: 6.5, 5.5, 4.5, 3.5 -> none <= 2.5; to class b: 0.5, 0, 0.5, 0.7 -> none >= 2.5.
    assert cld([[4.0]], [[6.5]], ["a"], ["b"], REF, CLS) == pytest.approx(math.log(2.0), abs=1e-12)


def test_unchanged_image_is_minimal_but_ineffective():
    # counterfactual = factual = 0: d = 0; class a distances 0, 1, 2, 3 -> P(<= 0) = 1/4;
    # class b distances 6..7.2 -> P(>= 0) = 1.
    assert cld([[0.0]], [[0.0]], ["a"], ["b"], REF, CLS) == pytest.approx(lse(0.25, 1.0), abs=1e-12)


def test_far_jump_is_effective_but_not_minimal():
    # factual 0, counterfactual 6.8: d = 6.8; class a distances 6.8, 5.8, 4.8, 3.8 -> P(<=) = 1;
    # class b distances 0.8, 0.3, 0.2, 0.4 -> P(>=) = 0. The worst minimality: log(1 + e).
    assert cld([[0.0]], [[6.8]], ["a"], ["b"], REF, CLS) == pytest.approx(lse(1.0, 0.0), abs=1e-12)


def test_partial_probabilities_and_per_unit_values():
    # unit 1: factual 2.5, counterfactual 4.5: d = 2;
    #   class a distances 4.5, 3.5, 2.5, 1.5 -> P(<= 2) = 1/4; class b 1.5, 2, 2.5, 2.7 -> P(>= 2) = 3/4.
    # unit 2: the ideal case above -> log 2.
    f, cf = [[2.5], [4.0]], [[4.5], [6.5]]
    values = cld(f, cf, ["a", "a"], ["b", "b"], REF, CLS, per_unit=True)
    np.testing.assert_allclose(values, [lse(0.25, 0.75), math.log(2.0)], atol=1e-12)
    assert cld(f, cf, ["a", "a"], ["b", "b"], REF, CLS) == pytest.approx(values.mean(), abs=1e-12)


def test_bounds_and_euclidean_distance_in_several_dimensions():
    rng = np.random.default_rng(0)
    ref, cls = rng.normal(size=(200, 3)), rng.integers(0, 2, 200)
    f, cf = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    y = rng.integers(0, 2, 50)
    v = cld(f, cf, y, 1 - y, ref, cls, per_unit=True)
    assert v.shape == (50,)
    assert (v >= math.log(2.0) - 1e-12).all() and (v <= 1 + math.log(2.0) + 1e-12).all()
    # the value depends on the features only through Euclidean distances: a rotation changes nothing
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    np.testing.assert_allclose(cld(f @ q, cf @ q, y, 1 - y, ref @ q, cls, per_unit=True), v, atol=1e-12)


def test_encoder_is_applied_to_images():
    # images [n, 1, 2, 2] whose encoder reads the mean intensity: the 1-D case above again.
    img = lambda v: np.full((len(v), 1, 2, 2), 0.0) + np.asarray(v, float)[:, None, None, None]  # noqa: E731
    enc = lambda im: im.reshape(len(im), -1).mean(1, keepdims=True)  # noqa: E731
    got = cld(img([2.5]), img([4.5]), ["a"], ["b"], img(REF[:, 0]), CLS, encoder=enc)
    assert got == pytest.approx(lse(0.25, 0.75), abs=1e-12)


def test_errors_name_the_problem():
    with pytest.raises(DataError, match="no reference rows of class"):
        cld([[0.0]], [[1.0]], ["a"], ["c"], REF, CLS)
    with pytest.raises(DataError, match="counterfactual has 2 rows"):
        cld([[0.0]], [[1.0], [2.0]], ["a"], ["b"], REF, CLS)
    with pytest.raises(DataError, match="reference_class has 3 rows"):
        cld([[0.0]], [[1.0]], ["a"], ["b"], REF, CLS[:3])
    with pytest.raises(DataError, match="feature widths differ"):
        cld([[0.0, 1.0]], [[1.0, 1.0]], ["a"], ["b"], REF, CLS)
    with pytest.raises(DataError, match="non-finite"):
        cld([[np.nan]], [[1.0]], ["a"], ["b"], REF, CLS)
