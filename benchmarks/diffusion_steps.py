"""DCM (``diffusion``) accuracy vs time at several DDIM step counts, next to ``flow``.

Protocol (that of ``benchmarks/tabular_scm.py``): 5000 training rows (``seed=0``); for every
variable with descendants, 5 intervention values at its 10/30/50/70/90% training quantiles,
200 fresh factual units each (``seed=1000 + i``); CF MSE x100 = ``counterfactual_mse`` over
the descendants of the intervened variable, averaged over all (variable, value) queries.
Every method is ``CausalModel(graph, mechanisms=<name>)`` fitted by ``CausalModel.fit`` once
per training seed, with ``--max-epochs``/``--patience`` (default: fit()'s 200/20) overridden by
the mechanism's declared ``fit_defaults`` (diffusion: 300/100) unless ``--same-fit``; the
other fit() arguments keep their defaults. ``diffusion`` is fitted once and queried at each step count (steps are a
query-time setting); the row ``diffusion-explicit`` is the same model at its default steps
with plain explicit DDIM inversion (``inversion_iters=0``), as in the DCM paper.

Reported per row: CF MSE x100, seconds per 1000 counterfactuals (all queries timed
together), fit wall and CPU seconds (CPU seconds of this process: on a shared machine they
are closer to the quiet-machine wall time than the wall time is), and ``recon`` = max over
variables and 1000 training rows of ``|decode(encode(x)) - x|`` in standardized units.

The validation loss uses common random numbers (a fixed seed every epoch; ``medcausal.train``).

    python benchmarks/diffusion_steps.py                    # full run (~25 min on 2 loaded cores)
    python benchmarks/diffusion_steps.py --quick            # smoke run (~1 min)
    python benchmarks/diffusion_steps.py --seeds 0 1 2             # the reported run
    python benchmarks/diffusion_steps.py --scms chain:additive diamond:non-additive --suffix _more
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
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
from medcausal.mechanisms import registry
from medcausal.mechanisms.diffusion import DiffusionMechanism
from medcausal.metrics import counterfactual_mse

sys.path.insert(0, str(Path(__file__).parent))
from tabular_scm import protocol_data  # noqa: E402  (the tabular benchmark's data and queries)

RESULTS = Path(__file__).parent / "results"
DEFAULT_SCMS = ("triangle:non-additive", "y:non-additive", "vector:non-additive")


def _cf_score(model, factual, truth, qs, graph):
    t0 = time.perf_counter()
    preds = [model.counterfactual(f, do={v: x}, seed=0) for f, (v, x) in zip(factual, qs)]
    seconds = time.perf_counter() - t0
    mse = np.mean([float(counterfactual_mse(t, p, graph, {v: x})) for t, p, (v, x) in zip(truth, preds, qs)])
    return 100 * float(mse), seconds / sum(len(f) for f in factual) * 1000


def _reconstruction(model, data) -> float:
    values = model._encode(data)
    worst = 0.0
    with torch.no_grad():
        for name in model.graph.topological_order:
            mech = model.mechanism(name)
            pa = model._parents(name, values, len(data))
            back = mech.sample(pa, noise=mech.abduct(values[name], pa))
            worst = max(worst, (back - values[name]).abs().max().item())
    return worst


def fit_settings(mechanism: str, args) -> dict:
    """fit() settings of a method: the CLI's, or the mechanism's declared ``fit_defaults``."""
    kw = {"max_epochs": args.max_epochs, "patience": args.patience}
    if not args.same_fit:
        kw.update(getattr(registry.get(mechanism), "fit_defaults", {}))
    return kw


def _fit(sim, mechanism, train, seed, args):
    model = mc.CausalModel(sim.graph, mechanisms=mechanism)
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(train, seed=seed, verbose=False, **fit_settings(mechanism, args))
    return model, time.perf_counter() - t0, time.process_time() - c0


def run_scm(spec, args, log):
    name, variant = spec.split(":")
    sim = mc.synthetic.scm(name, additive=variant == "additive")
    train, qs, factual, truth = protocol_data(sim, args.n_train, args.n_units, args.n_values)
    rows = []
    base = {"scm": name, "variant": variant}
    for seed in args.seeds:
        for method in args.reference:
            model, wall, cpu = _fit(sim, method, train, seed, args)
            mse, per1000 = _cf_score(model, factual, truth, qs, sim.graph)
            rows.append({**base, "seed": seed, "method": method, "steps": None, "cf_mse_x100": mse,
                         "s_per_1000_cf": per1000, "fit_s": wall, "fit_cpu_s": cpu,
                         "epochs": model.fit_info["epochs"], "recon": None})
            log(rows[-1])
        model, wall, cpu = _fit(sim, "diffusion", train, seed, args)
        mechs = [m for m in model.mechanisms.values() if isinstance(m, DiffusionMechanism)]
        default_steps = mechs[0].steps
        recon_rows = train.iloc[:1000]
        for steps in args.steps:
            for m in mechs:
                m.set_steps(steps)
            mse, per1000 = _cf_score(model, factual, truth, qs, sim.graph)
            rows.append({**base, "seed": seed, "method": "diffusion", "steps": steps, "cf_mse_x100": mse,
                         "s_per_1000_cf": per1000, "fit_s": wall, "fit_cpu_s": cpu,
                         "epochs": model.fit_info["epochs"], "recon": _reconstruction(model, recon_rows)})
            log(rows[-1])
        for m in mechs:
            m.set_steps(default_steps)
            m.inversion_iters = 0
        mse, per1000 = _cf_score(model, factual, truth, qs, sim.graph)
        rows.append({**base, "seed": seed, "method": "diffusion-explicit", "steps": default_steps,
                     "cf_mse_x100": mse, "s_per_1000_cf": per1000, "fit_s": wall, "fit_cpu_s": cpu,
                     "epochs": model.fit_info["epochs"], "recon": _reconstruction(model, recon_rows)})
        log(rows[-1])
    return rows


def summarize(rows, default_steps):
    df = pd.DataFrame(rows)
    df["steps"] = df["steps"].astype("Int64")
    keys = ["scm", "variant", "method", "steps"]
    agg = (df.groupby(keys, sort=False, dropna=False)
             .agg(cf_mse_x100=("cf_mse_x100", "mean"), cf_mse_sd=("cf_mse_x100", "std"),
                  seeds=("seed", "count"), s_per_1000_cf=("s_per_1000_cf", "mean"),
                  fit_s=("fit_s", "mean"), fit_cpu_s=("fit_cpu_s", "mean"), recon=("recon", "max"))
             .reset_index())
    verdicts = []
    for (scm, variant), g in agg.groupby(["scm", "variant"], sort=False):
        d = g[(g.method == "diffusion") & (g.steps == default_steps)]
        if d.empty:
            continue
        d = d.iloc[0]
        others = g[~g.method.str.startswith("diffusion")].set_index("method")
        if scm != "vector" and "flow" in others.index:
            f = others.loc["flow", "cf_mse_x100"]
            verdicts.append({"scm": scm, "variant": variant, "target": "diffusion CF MSE <= 1.2 x flow",
                             "value": f"{d.cf_mse_x100:.3f} vs {1.2 * f:.3f}",
                             "met": bool(d.cf_mse_x100 <= 1.2 * f)})
        if scm == "vector" and len(others):
            best = others["cf_mse_x100"].min()
            verdicts.append({"scm": scm, "variant": variant, "target": "diffusion best CF MSE (vs " +
                             ", ".join(others.index) + ")", "value": f"{d.cf_mse_x100:.3f} vs {best:.3f}",
                             "met": bool(d.cf_mse_x100 < best)})
        verdicts.append({"scm": scm, "variant": variant, "target": "diffusion fit < 180 s (CPU s)",
                         "value": f"{d.fit_s:.1f} s wall, {d.fit_cpu_s:.1f} s CPU",
                         "met": bool(d.fit_cpu_s < 180)})
    return agg, verdicts


def _markdown(df: pd.DataFrame) -> str:
    def fmt(v):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            return ""
        if isinstance(v, float):
            return f"{v:.2e}" if 0 < abs(v) < 1e-2 else f"{v:.3f}"
        return str(v)
    cols = list(df.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(out)


def write(rows, args, command, complete, started):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (("diffusion_steps_quick" if args.quick else "diffusion_steps") + args.suffix)
    default_steps = inspect.signature(DiffusionMechanism).parameters["steps"].default
    agg, verdicts = summarize(rows, default_steps) if rows else (pd.DataFrame(), [])
    meta = {"command": command, "complete": complete, "seconds": round(time.time() - started, 1),
            "python": platform.python_version(), "torch": torch.__version__, "medcausal": mc.__version__,
            "threads": torch.get_num_threads(), "default_steps": default_steps,
            "protocol": {"n_train": args.n_train, "n_units": args.n_units, "n_values": args.n_values,
                         "seeds": args.seeds, "fit": {m: fit_settings(m, args) for m in
                                                      [*args.reference, "diffusion"]}}}
    with atomic_write(stem.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows, "targets": verdicts}, indent=1,
                                        default=str))
    lines = [f"# DCM accuracy vs DDIM steps{' (quick)' if args.quick else ''}", "",
             f"Command: `{command}`  ",
             f"Run {'complete' if complete else 'INCOMPLETE (partial results)'}; {meta['seconds']} s on "
             f"{meta['threads']} torch threads; medcausal {meta['medcausal']}, torch {meta['torch']}. "
             "fit settings: " + "; ".join(f"{m} {k}" for m, k in meta["protocol"]["fit"].items()) +
             f" (other fit() arguments at their defaults); training seeds {args.seeds}"
             f". "
             f"Timings were taken on a shared machine: wall seconds are inflated by other load; "
             f"fit_cpu_s is this process's CPU time.", ""]
    if len(agg):
        lines += ["Mean over seeds (cf_mse_sd: sd over seeds). `diffusion-explicit`: plain explicit DDIM "
                  "inversion (no fixed-point refinement), at the default steps.", "", _markdown(agg), ""]
    if verdicts:
        lines += ["## Targets (issue 3)", "", _markdown(pd.DataFrame(verdicts)), ""]
    with atomic_write(stem.with_suffix(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scms", nargs="+", default=list(DEFAULT_SCMS), help="name:variant, e.g. chain:additive")
    p.add_argument("--steps", nargs="+", type=int, default=[10, 25, 50, 100])
    p.add_argument("--reference", nargs="+", default=["flow", "additive"], help="mechanisms to compare with")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--same-fit", action="store_true",
                   help="fit every method with --max-epochs/--patience, ignoring mechanisms' fit_defaults")
    p.add_argument("--quick", action="store_true", help="1000 rows, 2 values, 50 units, 5 epochs: a smoke run")
    p.add_argument("--suffix", default="", help="appended to the results' file names")
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-units", type=int, default=200)
    p.add_argument("--n-values", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_units, args.n_values, args.max_epochs, args.same_fit = 1000, 50, 2, 5, True
        args.steps = [s for s in args.steps if s <= 25] or [10]
    for spec in args.scms:
        name, _, variant = spec.partition(":")
        if variant not in ("additive", "non-additive"):
            p.error(f"--scms {spec!r}: write name:additive or name:non-additive")
        mc.synthetic.scm(name)  # unknown names fail here, before any fitting
    command = "python benchmarks/diffusion_steps.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    warnings.filterwarnings("ignore", category=mc.errors.OutOfSupportWarning)
    started = time.time()
    rows = []

    def log(r):
        recon = "" if r["recon"] is None else f"  recon {r['recon']:.1e}"
        print(f"{r['scm']:9s} {r['variant']:12s} seed {r['seed']} {r['method']:18s} steps {str(r['steps']):4s} "
              f"cf_mse x100 {r['cf_mse_x100']:8.3f}  cf/1000 {r['s_per_1000_cf']:6.2f}s  fit {r['fit_s']:6.1f}s "
              f"(cpu {r['fit_cpu_s']:6.1f}s, {r['epochs']} ep){recon}", flush=True)

    for spec in args.scms:
        rows += run_scm(spec, args, log)
        write(rows, args, command.strip(), complete=False, started=started)
    write(rows, args, command.strip(), complete=True, started=started)


if __name__ == "__main__":
    main()
