"""Which unit-queries make up a tabular SCM's CF MSE: a diagnostic beside ``tabular_scm.py``.

Same protocol, data, queries and fits as ``benchmarks/tabular_scm.py`` (its functions are
reused). The benchmark's CF MSE is a mean over queries of a mean over units, so each
(query, unit) pair contributes a share of it; this script reports, per method and fit
seed, the CF MSE x100, the pairs with the largest contributions (the unit's factual and true
and predicted counterfactual values), and the CF MSE x100 without the single largest pair.
It answers "is a gap between two methods spread over the units, or decided by a few?".

    python benchmarks/tabular_scm_units.py --scm triangle --variant non-additive --fit-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import medcausal as mc
from medcausal.io import atomic_write

sys.path.insert(0, str(Path(__file__).parent))
from tabular_scm import _markdown, add_run_options, begin_run, in_training_range, make_method, protocol_data  # noqa: E402,E501


def contributions(sim, qs, factual, truth, preds, train) -> pd.DataFrame:
    """One row per (query, unit): its share of the CF MSE (``contrib_x100``; they sum to the
    benchmark's CF MSE x100), whether the unit lies in the training range, and its values."""
    rows = []
    for (var, value), f, t, p in zip(qs, factual, truth, preds):
        desc = [v for v in sim.graph.topological_order if v in sim.graph.descendants(var)]
        by_var = {v: mc.adapters.tabular.columns_of(v, sim.graph.variables[v]) for v in desc}
        cols = [c for v in desc for c in by_var[v]]
        # counterfactual_mse: mean over descendants of each one's MSE (a vector's columns together)
        per_var = np.stack([((t[c] - p.loc[t.index, c]) ** 2).to_numpy().mean(1) for c in by_var.values()], 1)
        share = per_var.mean(1) / len(t) / len(qs) * 100
        inside = (in_training_range(f, train) & in_training_range(t, train)).to_numpy()
        for i, unit in enumerate(t.index):
            rows.append({"query": f"do({var}={value:.2f})", "unit": str(unit), "contrib_x100": float(share[i]),
                         "in_range": bool(inside[i]),
                         "factual": ", ".join(f"{c}={f.loc[unit, c]:.2f}" for c in f.columns),
                         "true_cf": ", ".join(f"{c}={t.loc[unit, c]:.2f}" for c in cols),
                         "predicted_cf": ", ".join(f"{c}={p.loc[unit, c]:.2f}" for c in cols)})
    return pd.DataFrame(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scm", required=True)
    ap.add_argument("--variant", choices=["additive", "non-additive"], required=True)
    ap.add_argument("--methods", nargs="+", default=["flow", "diffusion"])
    ap.add_argument("--fit-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--top", type=int, default=3, help="largest (query, unit) contributions listed per fit")
    add_run_options(ap)
    args = ap.parse_args(argv)
    command, started = begin_run(args, "tabular_scm_units.py", argv)
    sim = mc.synthetic.scm(args.scm, additive=args.variant == "additive")
    train, qs, factual, truth = protocol_data(sim)
    summary, top = [], []
    for method in args.methods:
        for seed in args.fit_seeds:
            m = make_method(sim, method, seed)
            m.fit(train)
            preds = [m.counterfactual(f, v, x) for f, (v, x) in zip(factual, qs)]
            c = contributions(sim, qs, factual, truth, preds, train).sort_values("contrib_x100", ascending=False)
            total = float(c["contrib_x100"].sum())
            summary.append({"method": method, "fit_seed": seed, "cf_mse_x100": total,
                            "without_largest_x100": total - float(c["contrib_x100"].iloc[0]),
                            "largest_share": float(c["contrib_x100"].iloc[0]) / total,
                            "out_of_range_share": float(c.loc[~c["in_range"], "contrib_x100"].sum()) / total})
            top += [{"method": method, "fit_seed": seed, **r} for r in c.head(args.top).to_dict("records")]
            print(f"{method} seed {seed}: cf_mse x100 {total:.3f}, without the largest unit-query "
                  f"{summary[-1]['without_largest_x100']:.3f}", flush=True)
    s = pd.DataFrame(summary)
    means = s.groupby("method", sort=False)[["cf_mse_x100", "without_largest_x100"]].mean().reset_index()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"tabular_scm_units_{args.scm}_{args.variant}{args.suffix}"
    meta = {"command": command, "seconds": round(time.time() - started, 1), "medcausal": mc.__version__,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    with atomic_write(stem.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "summary": summary, "top": top}, indent=1))
    lines = [f"# Which unit-queries make up the CF MSE: {args.scm}, {args.variant}", "",
             f"Command: `{command}`  ", f"{meta['seconds']} s on {meta['threads']} torch threads; medcausal "
             f"{meta['medcausal']}, torch {meta['torch']}. Protocol, data and fits of `tabular_scm.py` "
             f"({len(qs)} queries x {len(factual[0])} units).", "",
             "`without_largest_x100`: the CF MSE x100 with the single largest (query, unit) contribution "
             "set to 0 (a diagnostic, not a target); `out_of_range_share`: the share of the CF MSE from "
             "units outside the training range.", "", _markdown(s), "", "## Mean over fit seeds", "",
             _markdown(means), "", "## Largest contributions", "",
             _markdown(pd.DataFrame(top)[["method", "fit_seed", "query", "unit", "contrib_x100", "in_range",
                                          "factual", "true_cf", "predicted_cf"]]), ""]
    with atomic_write(stem.with_suffix(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
