"""The ``diffusion`` mechanism with and without its location-scale preconditioner.

Protocol of ``benchmarks/tabular_scm.py`` (5000 training rows, seed 0; every variable with
descendants, 5 do-values at its 10-90% quantiles, 200 fresh units each; CF MSE x100 over the
descendants), for ``diffusion`` with ``loc_scale=True`` (the default) and ``loc_scale=False``
on SCMs where the two disagree, next to ``flow``. Fit settings: ``CausalModel.fit`` defaults
(the mechanism's ``fit_defaults``: 600 epochs, patience 100).

    python benchmarks/diffusion_preconditioner.py
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import medcausal as mc
from medcausal.io import atomic_write

sys.path.insert(0, str(Path(__file__).parent))
from tabular_scm import _markdown, queries  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CASES = [("chain", True), ("triangle", False), ("diamond", True), ("vector", False)]
SETTINGS = {"flow": "flow", "diffusion loc_scale=True": {"name": "diffusion", "loc_scale": True},
            "diffusion loc_scale=False": {"name": "diffusion", "loc_scale": False}}


def main():
    warnings.filterwarnings("ignore", category=mc.errors.OutOfSupportWarning)
    load_start, started, rows = [round(x, 2) for x in os.getloadavg()], time.time(), []
    for name, additive in CASES:
        sim = mc.synthetic.scm(name, additive=additive)
        train = sim.sample(5000, seed=0)
        qs = queries(sim, train, 5)
        factual = [sim.sample(200, seed=1000 + i) for i in range(len(qs))]
        truth = [sim.counterfactual(f, do={v: x}) for f, (v, x) in zip(factual, qs)]
        for label, spec in SETTINGS.items():
            model = mc.CausalModel(sim.graph, mechanisms=spec if isinstance(spec, str)
                                   else {v: dict(spec) for v in sim.graph.variables})
            c0 = time.process_time()
            model.fit(train, seed=0, verbose=False)
            fit_cpu = time.process_time() - c0
            preds = [model.counterfactual(f, do={v: x}, seed=0) for f, (v, x) in zip(factual, qs)]
            cf = np.mean([float(mc.metrics.counterfactual_mse(t, p, sim.graph, {v: x}))
                          for t, p, (v, x) in zip(truth, preds, qs)])
            rows.append({"scm": name, "variant": "additive" if additive else "non-additive", "method": label,
                         "cf_mse_x100": 100 * cf, "fit_cpu_s": fit_cpu, "epochs": model.fit_info["epochs"],
                         "best_epoch": model.fit_info["best_epoch"]})
            print(rows[-1], flush=True)
    meta = {"command": "python benchmarks/diffusion_preconditioner.py", "seconds": round(time.time() - started, 1),
            "threads": torch.get_num_threads(), "load_start": load_start,
            "load_end": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    with atomic_write(RESULTS / "diffusion_preconditioner.json") as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# diffusion: location-scale preconditioner on and off", "", f"Command: `{meta['command']}`  ",
             f"{meta['seconds']} s on {meta['threads']} torch thread(s); load {load_start} -> {meta['load_end']}.",
             "", _markdown(pd.DataFrame(rows)), ""]
    with atomic_write(RESULTS / "diffusion_preconditioner.md") as tmp:
        Path(tmp).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
