import numpy as np
import pandas as pd
import pytest

import medcausal as mc


def linear_gaussian(n, seed=0, x=None):
    """x ~ N(0,1); s ~ Bernoulli(0.4); y = 2x + s + u_y, u_y ~ N(0, 0.5^2);
    stage = "high" if y + logistic noise > 1, so P(high | y) = sigmoid(y - 1)."""
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=n) if x is None else np.asarray(x, float)
    s = (rng.random(n) < 0.4).astype(int)
    u = 0.5 * rng.normal(size=n)
    y = 2 * xs + s + u
    stage = np.where(y + rng.logistic(size=n) > 1.0, "high", "low")
    return pd.DataFrame({"x": xs, "s": s, "y": y, "stage": stage}), u


@pytest.fixture(scope="session")
def lg_graph():
    return mc.CausalGraph({"x": "continuous", "s": "binary", "y": "continuous", "stage": "categorical"},
                          edges=[("x", "y"), ("s", "y"), ("y", "stage")])


@pytest.fixture(scope="session")
def lg_data():
    return linear_gaussian(3000, seed=0)


@pytest.fixture(scope="session")
def fitted(lg_graph, lg_data):
    """A small flow model of the linear-Gaussian SCM, fitted once for the session."""
    df, _ = lg_data
    return mc.CausalModel(lg_graph).fit(df, seed=0, max_epochs=60,
                                        verbose=False)
