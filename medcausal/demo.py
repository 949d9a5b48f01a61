"""``medcausal demo``: fit a cohort whose counterfactuals are known, and show how close we get.

The tabular demo uses the non-additive ``triangle`` SCM (``medcausal.synthetic.scm``):
it fits ``flow`` (the default) and the ``additive`` baseline, asks both for the
counterfactual of held-out units under ``do(x1 = q)`` at three quantiles of x1, and
writes the counterfactuals, a figure (true vs predicted) and a short report.

>>> from medcausal.demo import run_demo
>>> import tempfile
>>> report = run_demo(tempfile.mkdtemp(), quick=True, verbose=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_write, write_table


def run_demo(out: str | Path = "demo_output", quick: bool = False, verbose: bool | None = None) -> Path:
    """Run the demo into ``out``; returns the path of the markdown report."""
    from . import synthetic
    from .metrics import counterfactual_mse
    from .model import CausalModel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sim = synthetic.scm("triangle", additive=False)
    n_train, n_test, epochs = (1000, 100, 20) if quick else (5000, 500, 200)
    train = sim.sample(n_train, seed=0)
    test = sim.sample(n_test, seed=1)
    quantiles = train["x1"].quantile([0.1, 0.5, 0.9]).to_numpy()

    rows, frames = [], []
    for mech in ("flow", "additive"):
        model = CausalModel(sim.graph, mechanisms=mech).fit(train, seed=0, max_epochs=epochs, verbose=verbose)
        model.save(out / f"model_{mech}.mcm")
        for q in quantiles:
            do = {"x1": float(q)}
            pred = model.counterfactual(test, do=do)
            true = sim.counterfactual(test, do=do)
            err = counterfactual_mse(true, pred, sim.graph, do)
            rows.append({"mechanism": mech, "do": f"x1={q:.3f}", "cf_mse_x100": 100 * float(err),
                         "fit_seconds": model.fit_info["seconds"]})
            frames.append(pred.assign(mechanism=mech, do_x1=q, **{f"true_{c}": true[c] for c in ("x2", "x3")}))
    table = pd.DataFrame(rows)
    write_table(pd.concat(frames), out / "counterfactuals.csv")
    _figure(pd.concat(frames), out / "counterfactuals.png")
    summary = {"scm": "triangle (non-additive)", "n_train": n_train, "n_test": n_test,
               "results": rows}
    with atomic_write(out / "report.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1))
    lines = ["# medcausal demo: counterfactuals against ground truth", "",
             f"SCM: non-additive triangle (x1 -> x2 -> x3, x1 -> x3); {n_train} training units, "
             f"{n_test} held-out units whose true counterfactuals are known.", "",
             "CF MSE x100 over the descendants of x1 (lower is better):", "",
             table.to_markdown(index=False, floatfmt=".3f") if _has_tabulate() else table.to_string(index=False),
             "", "The flow abducts each unit's noise exactly; the additive model cannot when the noise",
             "enters non-additively, which is why its error stays high.", "",
             "Files: `counterfactuals.csv`, `counterfactuals.png`, `model_flow.mcm`, `model_additive.mcm`."]
    report = out / "report.md"
    with atomic_write(report) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return report


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


def _figure(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, var in zip(axes, ("x2", "x3")):
        for mech, marker in (("flow", "o"), ("additive", "x")):
            f = frame[frame["mechanism"] == mech]
            ax.scatter(f[f"true_{var}"], f[var], s=8, marker=marker, alpha=0.5, label=mech)
        lo, hi = np.percentile(frame[f"true_{var}"], [0.5, 99.5])
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"true counterfactual {var}")
        ax.set_ylabel(f"predicted {var}")
        ax.set_title(f"{var} under do(x1)")
        ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
