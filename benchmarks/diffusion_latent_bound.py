"""The diffusion mechanism's query-time guards on and off, on the same fitted models.

``latent_bound`` (abducted latents are clamped to it) and ``training_box`` (queries clamp the
denoiser's conditioning and the scale to the training rows' box) need no refit, so this script
re-answers the counterfactual queries of ``tabular_scm.py`` with models that run saved
(``--save-models``), once per setting, beside the flow models of the same run. The column of
the defaults (bound 5, box on) is the figure ``tabular_scm.py`` reports for that fit. A model
saved before the box was recorded gets it here from the protocol's training rows, as ``fit``
records it (``finalize`` on every training row, with the saved weights).

    python benchmarks/tabular_scm.py --scms triangle --methods flow diffusion \\
        --fit-seeds 0 1 2 3 4 5 --save-models /tmp/models
    python benchmarks/diffusion_latent_bound.py --models /tmp/models --scms triangle \\
        --fit-seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import medcausal as mc
from medcausal.io import atomic_write
from medcausal.mechanisms.diffusion import DiffusionMechanism

sys.path.insert(0, str(Path(__file__).parent))
from tabular_scm import _markdown, add_run_options, begin_run, mean_cf_mse, model_path, protocol_data  # noqa: E402,E501


def cf_mse_x100(model, sim, qs, factual, truth) -> float:
    """The benchmark's CF MSE x100 of a fitted model (same queries, same ``seed=0``)."""
    return 100 * mean_cf_mse(sim, qs, truth, [model.counterfactual(f, do={v: x}, seed=0)
                                             for f, (v, x) in zip(factual, qs)])


def _diffusions(model) -> dict[str, DiffusionMechanism]:
    return {n: m for n in model.graph.variables if isinstance(m := model.mechanism(n), DiffusionMechanism)}


def with_guards(model, bound: float | None, box: bool = True):
    """Set ``latent_bound`` and ``training_box`` on every diffusion mechanism of ``model`` (in place)."""
    for mech in _diffusions(model).values():
        mech.latent_bound, mech.training_box = bound, box
    return model


def record_box(model, train) -> None:
    """Record the training box of each diffusion mechanism that has none (a model saved before
    ``fit`` recorded it): ``finalize`` on the training rows, as ``fit`` calls it. A DP model's
    box stays unknown, as its fit left it."""
    if model.privacy is not None:
        return
    values = model._encode(train)
    for name, mech in _diffusions(model).items():
        if torch.isinf(mech.box_lo).all():
            mech.finalize(values[name], model._parents(name, values, len(train)))


def _bound(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a latent bound is a finite number > 0 or 'none', got {text!r}")
    return value


def saved_protocol(folder: Path) -> dict:
    """The protocol settings ``tabular_scm.py --save-models`` wrote beside its models."""
    path = Path(folder) / "protocol.json"
    if not path.exists():
        raise SystemExit(f"diffusion_latent_bound: {path} not found: pass the folder of tabular_scm.py "
                         f"--save-models (its models answer the protocol it records there)")
    return json.loads(path.read_text())


def add_saved_fit_options(ap: argparse.ArgumentParser) -> None:
    """The options naming the saved fits to re-answer (read by :func:`saved_fits`)."""
    ap.add_argument("--models", type=Path, required=True, help="the folder of tabular_scm.py --save-models")
    ap.add_argument("--scms", nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", default=["additive", "non-additive"])
    ap.add_argument("--fit-seeds", type=int, nargs="+", default=[0])


def saved_fits(args):
    """Each saved fit of ``args`` (see :func:`add_saved_fit_options`), as ``(sim, train, queries,
    row, diffusion)``: the protocol's training rows and ``(qs, factual, truth)``, ``row`` the scm,
    variant, fit seed and the flow model's CF MSE x100, ``diffusion`` the diffusion model with its
    training box (:func:`record_box`). Every model file is checked before any work."""
    protocol = saved_protocol(args.models)
    wanted = [model_path(args.models, name, variant, method, seed) for name in args.scms
              for variant in args.variants for seed in args.fit_seeds for method in ("flow", "diffusion")]
    missing = [p for p in wanted if not p.exists()]
    if missing:
        raise SystemExit(f"no saved model {missing[0]} (run tabular_scm.py with --save-models {args.models} first)")
    for name in args.scms:
        for variant in args.variants:
            sim = mc.synthetic.scm(name, additive=variant == "additive")
            train, *queries = protocol_data(sim, **protocol)
            queries = tuple(queries)
            for seed in args.fit_seeds:
                paths = {m: model_path(args.models, name, variant, m, seed) for m in ("flow", "diffusion")}
                row = {"scm": name, "variant": variant, "fit_seed": seed,
                       "flow": cf_mse_x100(mc.CausalModel.load(paths["flow"]), sim, *queries)}
                diffusion = mc.CausalModel.load(paths["diffusion"])
                record_box(diffusion, train)
                yield sim, train, queries, row, diffusion


def print_row(row: dict) -> None:
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def write_results(args, stem_name: str, command: str, started: float, rows: list, cols: list,
                  title: str, description: str, extra: tuple = ()) -> pd.DataFrame:
    """Write ``<stem_name><suffix>.json`` (meta and rows) and ``.md`` (the rows, their means over fit
    seeds, then ``extra`` lines) under ``args.out``; returns the means."""
    df = pd.DataFrame(rows)
    means = df.groupby(["scm", "variant"], sort=False)[cols].mean().reset_index()
    means.insert(2, "n_seeds", df.groupby(["scm", "variant"], sort=False).size().to_numpy())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{stem_name}{args.suffix}"
    meta = {"command": command, "seconds": round(time.time() - started, 1), "medcausal": mc.__version__,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    with atomic_write(stem.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# {title}", "", f"Command: `{command}`  ",
             f"{meta['seconds']} s on {meta['threads']} torch threads; medcausal {meta['medcausal']}, torch "
             f"{meta['torch']}. CF MSE x100 of `tabular_scm.py`'s protocol; {description}", "",
             _markdown(df), "", "## Mean over fit seeds", "", _markdown(means), "", *extra]
    with atomic_write(stem.with_suffix(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines))
    return means


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_saved_fit_options(ap)
    ap.add_argument("--bounds", type=_bound, nargs="+", default=[None, 6.0, 5.0, 4.0, 3.0],
                    help="latent bounds to compare ('none': off)")
    ap.add_argument("--boxes", nargs="+", choices=["on", "off"], default=["on"],
                    help="training_box settings to compare (each with every bound)")
    add_run_options(ap)
    args = ap.parse_args(argv)
    command, started = begin_run(args, "diffusion_latent_bound.py", argv)
    settings = [(b, box == "on") for box in args.boxes for b in args.bounds]
    label = lambda b, box: ("diffusion_no_bound" if b is None else f"diffusion_bound_{b:g}") + (  # noqa: E731
        "" if box else "_no_box")
    rows = []
    for sim, _, queries, row, diffusion in saved_fits(args):
        for b, box in settings:
            row[label(b, box)] = cf_mse_x100(with_guards(diffusion, b, box), sim, *queries)
        rows.append(row)
        print_row(row)
    cols = ["flow"] + [label(b, box) for b, box in settings]
    means = pd.DataFrame(rows).groupby(["scm", "variant"], sort=False)[cols].mean().reset_index()
    # the vector SCM's target is "best of all columns", judged in tabular_scm.py
    verdicts = means.loc[means["scm"] != "vector", ["scm", "variant"]].copy()
    scalar = means.loc[verdicts.index]
    for b, box in settings:
        verdicts[f"{label(b, box)} <= 1.2 x flow"] = (scalar[label(b, box)] <= 1.2 * scalar["flow"]).map(
            {True: "met", False: "missed"})
    extra = () if verdicts.empty else (  # only the vector SCM: its target is judged in tabular_scm.py
        "## The 1.2 x flow target of issue 3, per setting (on the means)", "", _markdown(verdicts), "")
    write_results(args, "diffusion_latent_bound", command, started, rows, cols,
                  "Diffusion: the query-time guards (latent bound, training box) on and off",
                  "every diffusion column answers with the same fitted model (both guards are query-time "
                  "settings), `flow` with the flow model of the same run and seed. `diffusion_bound_B`: latents "
                  "clamped to +-B, the training box on; `_no_box`: off. The defaults: bound 5, box on.", extra)


if __name__ == "__main__":
    main()
