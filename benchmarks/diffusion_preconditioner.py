"""The ``diffusion`` mechanism: its preconditioner and the denoiser's conditioning.

Protocol of ``benchmarks/tabular_scm.py`` (5000 training rows, seed 0; every variable with
descendants, 5 do-values at its 10-90% quantiles, 200 fresh units each; CF MSE x100 over the
descendants), for ``diffusion`` in the settings below, next to ``flow``. Fit settings:
``CausalModel.fit`` defaults (the mechanism's ``fit_defaults``).

- ``diffusion`` (the default): location-scale preconditioner, the denoiser conditioned on
  its ``(mu, log sigma)``;
- ``diffusion condition=parents``: the same preconditioner, the denoiser conditioned on the
  parents (as in the DCM paper);
- ``diffusion condition=both``: the same preconditioner, the denoiser conditioned on
  ``(mu, log sigma)`` and the parents;
- ``diffusion loc_scale=False``: no preconditioner, the denoiser conditioned on the parents.

    python benchmarks/diffusion_preconditioner.py
    python benchmarks/diffusion_preconditioner.py --variants flow diffusion --suffix _default
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
from tabular_scm import _markdown, protocol_data  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CASES = [("chain", True), ("triangle", False), ("diamond", True), ("vector", False)]
SETTINGS = ["flow", "diffusion", "diffusion condition=parents", "diffusion condition=both",
            "diffusion loc_scale=False"]


def parse_variant(label: str):
    """``"flow"`` -> ``"flow"``; ``"diffusion k=v ..."`` -> ``{"name": "diffusion", k: v, ...}``
    (values read as JSON where they parse, else as strings; ``False``/``True`` as booleans).

    >>> parse_variant("diffusion condition=both loc_scale=False")
    {'name': 'diffusion', 'condition': 'both', 'loc_scale': False}
    """
    name, *pairs = label.split()
    if not pairs:
        return name
    spec = {"name": name}
    for pair in pairs:
        key, _, value = pair.partition("=")
        value = {"True": "true", "False": "false"}.get(value, value)
        try:
            spec[key] = json.loads(value)
        except json.JSONDecodeError:
            spec[key] = value
    return spec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=SETTINGS,
                   help="'flow', 'diffusion' or 'diffusion key=value ...' (mechanism settings)")
    p.add_argument("--scms", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    p.add_argument("--suffix", default="", help="results file name suffix, for a run of a subset")
    args = p.parse_args(argv)
    command = "python benchmarks/diffusion_preconditioner.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=mc.errors.OutOfSupportWarning)
    load_start, started, rows = [round(x, 2) for x in os.getloadavg()], time.time(), []
    for name, additive in [c for c in CASES if c[0] in args.scms]:
        sim = mc.synthetic.scm(name, additive=additive)
        train, qs, factual, truth = protocol_data(sim)
        for label in args.variants:
            spec = parse_variant(label)
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
    meta = {"command": command.strip(), "seconds": round(time.time() - started, 1),
            "threads": torch.get_num_threads(), "load_start": load_start,
            "load_end": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    with atomic_write(RESULTS / f"diffusion_preconditioner{args.suffix}.json") as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# diffusion: preconditioner and conditioning of the denoiser", "", f"Command: `{meta['command']}`  ",
             f"{meta['seconds']} s on {meta['threads']} torch thread(s); load {load_start} -> {meta['load_end']}.",
             "", _markdown(pd.DataFrame(rows)), ""]
    with atomic_write(RESULTS / f"diffusion_preconditioner{args.suffix}.md") as tmp:
        Path(tmp).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
