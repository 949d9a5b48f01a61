"""Where the brain demo's counterfactual error comes from: the change missed, the change invented.

Reads the models ``medcausal demo`` saved (``model.mcm``: hvae, ``model_cvae.mcm``: cvae),
re-renders the demo's held-out patients (``BrainMRI(...).sample(n_test, seed=1)``, the demo's
sizes) and, per model and query, reports the true-counterfactual MAE beside:

- ``true parents``: the image mechanism's counterfactual given the *true* counterfactual
  parents (the patient's own abducted noise): the error left once the attribute mechanisms
  are taken out of it;
- ``unchanged``: the patient's factual scan as the answer;
- :func:`medcausal.metrics.images.change_decomposition` of the model's counterfactual: on the
  pixels the truth changes by more than ``--threshold``, the change missed (``captured`` is the
  share of it the model gets); elsewhere, the change the model invents (``spurious``).

    medcausal demo --out demo_output
    python benchmarks/brain_change_decomposition.py --models demo_output
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import medcausal as mc
from medcausal.demo import DEMO_SETTINGS, IMAGE, QUERIES, _image_parents
from medcausal.io import atomic_write
from medcausal.metrics import images as im

RESULTS = Path(__file__).parent / "results"
MODELS = {"hvae": "model.mcm", "cvae": "model_cvae.mcm"}


def decompose(model, sim, test, threshold: float) -> list[dict]:
    """One row per query: the errors described in the module docstring."""
    mech = model.mechanism(IMAGE)
    x = test.arrays[IMAGE]
    with torch.no_grad():
        noise = mech.abduct(torch.as_tensor(x), _image_parents(model, test))
    rows = []
    for query, do in QUERIES.items():
        true = sim.counterfactual(test, do=do)
        cf = model.counterfactual(test, do=do, seed=0)
        with torch.no_grad():
            given_true = mech.sample(_image_parents(model, true), noise=noise).numpy()
        xt = true.arrays[IMAGE]
        rows.append({"query": query, "cf_mae": float(np.abs(cf.arrays[IMAGE] - xt).mean()),
                     "true_parents_mae": float(np.abs(given_true - xt).mean()),
                     "unchanged_mae": float(np.abs(x - xt).mean()),
                     **im.change_decomposition(x, cf.arrays[IMAGE], xt, threshold=threshold)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="the output folder of `medcausal demo`")
    ap.add_argument("--quick", action="store_true", help="the models of `medcausal demo --quick`")
    ap.add_argument("--threshold", type=float, default=0.05, help="a pixel 'changes' beyond this (intensity)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--stem", default="brain_change_decomposition")
    args = ap.parse_args(argv)
    command = "python benchmarks/brain_change_decomposition.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    paths = {name: args.models / f for name, f in MODELS.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise SystemExit(f"brain_change_decomposition: no saved model {missing[0]} (run `medcausal demo --out "
                         f"{args.models}` first)")
    started = time.time()
    s = DEMO_SETTINGS["quick" if args.quick else "full"]
    sim = mc.synthetic.BrainMRI(shape=(s["size"], s["size"]), progress=False)
    test = sim.sample(s["n_test"], seed=1)
    rows = [{"model": name, **row} for name, path in paths.items()
            for row in decompose(mc.CausalModel.load(path), sim, test, args.threshold)]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / args.stem
    meta = {"command": command, "seconds": round(time.time() - started, 1), "threshold": args.threshold,
            "n_test": s["n_test"], "size": s["size"], "medcausal": mc.__version__}
    with atomic_write(stem.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["# Brain demo: where the counterfactual error comes from", "", f"Command: `{command}`  ",
             f"{meta['seconds']} s; {s['n_test']} held-out patients of {s['size']}x{s['size']} (the demo's); a pixel "
             f"'changes' when the truth moves it by more than {args.threshold}. `cf_mae`: the model's true-"
             "counterfactual MAE; `true_parents_mae`: its image mechanism given the true counterfactual parents; "
             "`unchanged_mae`: the factual scan as the answer. `missed`/`captured`: on the changed pixels; "
             "`spurious`: the change the model invents elsewhere (`true_elsewhere`: the truth's).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    with atomic_write(stem.with_suffix(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
