import numpy as np
import pandas as pd
import pytest
import torch

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


def repeated_visits(n_patients=40, visits=3, seed=0):
    """``visits`` rows per patient (column ``patient``): x ~ N(0,1), y = 2x + N(0,1) on every row."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_patients), visits)
    x = rng.normal(size=len(pid))
    return pd.DataFrame({"patient": pid, "x": x, "y": 2 * x + rng.normal(size=len(pid))})


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


def discs(n, seed=0, radius=None, bright=None, centre=None, noise=None, size=16):
    """Discs on a size x size canvas: parents radius r ~ U(2, 6) and brightness b ~ Bern(0.5);
    exogenous centre ~ U(6, 10)^2 and pixel noise N(0, 0.02^2)."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(2.0, 6.0, n) if radius is None else np.asarray(radius, float)
    b = rng.integers(0, 2, n) if bright is None else np.asarray(bright)
    c = rng.uniform(6.0, size - 6.0, (n, 2)) if centre is None else centre
    eps = rng.normal(0, 0.02, (n, 1, size, size)) if noise is None else noise
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    d = np.sqrt((xx[None] - c[:, 0, None, None]) ** 2 + (yy[None] - c[:, 1, None, None]) ** 2)
    img = (0.5 + 0.4 * b)[:, None, None] / (1 + np.exp(-(r[:, None, None] - d) / 0.4))
    x = (img[:, None] + 0.1 + eps).astype(np.float32)
    pa = np.stack([(r - 4.0) / 1.15, b], 1).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(pa), {"r": r, "b": b, "c": c, "eps": eps}
