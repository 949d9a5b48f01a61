"""Does the denoising validation loss track a diffusion model's counterfactuals?

Trains ``CausalModel(graph, mechanisms="diffusion")`` on one DCM benchmark SCM with
``CausalModel.fit``'s defaults and, every ``--every`` epochs, records each mechanism's
validation loss (the loop's per-mechanism ``val_parts``) and the counterfactual MSE x100 of
the current weights (the averaged ones that queries use) on the tabular benchmark's queries
(same protocol as ``benchmarks/tabular_scm.py``: 5000 training rows, 5 values per
intervened variable, 200 units each). The answer decides how the training loop selects a
diffusion mechanism's weights (``select_by_validation``): the epoch of best validation loss,
or the last averaged weights.

Writes ``results/diffusion_training_curve[_<scm>_<variant>].{json,md,png}``.

    python benchmarks/diffusion_training_curve.py --scm triangle --variant non-additive
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
from medcausal.io import atomic_write
from medcausal.metrics import counterfactual_mse

sys.path.insert(0, str(Path(__file__).parent))
from tabular_scm import protocol_data  # noqa: E402  (the tabular benchmark's data and queries)

RESULTS = Path(__file__).parent / "results"


def trace(scm: str, variant: str, every: int, n_train: int = 5000, n_units: int = 200, seed: int = 0,
          max_epochs: int | None = None):
    sim = mc.synthetic.scm(scm, additive=variant == "additive")
    train_df, qs, factual, truth = protocol_data(sim, n_train, n_units)
    model = mc.CausalModel(sim.graph, mechanisms="diffusion")

    def cf_mse() -> float:
        return 100 * float(np.mean([float(counterfactual_mse(t, model.counterfactual(f, do={v: x}, seed=0),
                                                             sim.graph, {v: x}))
                                    for f, t, (v, x) in zip(factual, truth, qs)]))

    points = []

    def on_epoch(record):
        if record["epoch"] % every == 0:
            mechanisms = model.mechanisms
            mechanisms.eval()
            with torch.no_grad():
                values = model._encode(train_df)  # the box fit's finalize would record if it stopped here
                for name in sim.graph.variables:
                    model.mechanism(name).finalize(values[name], model._parents(name, values, len(train_df)))
                err = cf_mse()
            mechanisms.train()
            points.append({"epoch": record["epoch"], "lr": record["lr"], "cf_mse_x100": err,
                           "val_parts": record.get("val_parts", {})})
            print(f"epoch {record['epoch']:4d} CF MSE x100 {err:8.3f} val {record['val_loss']:.4f}", flush=True)

    model.fit(train_df, seed=seed, verbose=False, max_epochs=max_epochs, on_epoch=on_epoch)
    final = cf_mse()
    # What selecting each mechanism's best-validation epoch among the traced epochs would pick
    names = [n for n in sim.graph.topological_order if points and n in points[0]["val_parts"]]
    best = {n: min(points, key=lambda p: p["val_parts"][n])["epoch"] for n in names}
    return {"points": points, "final_cf_mse_x100": final, "epochs": model.fit_info["epochs"],
            "best_val_epoch_per_mechanism": best}


def _figure(result, path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = result["points"]
    epochs = [p["epoch"] for p in pts]
    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    a.plot(epochs, [p["cf_mse_x100"] for p in pts], marker=".")
    a.set_yscale("log")
    a.set(xlabel="epoch", ylabel="CF MSE x100 (log)", title="counterfactual error")
    for name in pts[0]["val_parts"]:
        vals = np.array([p["val_parts"][name] for p in pts])
        b.plot(epochs, vals - vals.min(), label=name)
    b.set(xlabel="epoch", ylabel="val loss - its minimum", title="denoising validation loss")
    b.set_yscale("symlog", linthresh=1e-2)
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scm", default="triangle", choices=[*mc.synthetic.scm_names(), "vector"])
    ap.add_argument("--variant", default="non-additive", choices=["additive", "non-additive"])
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-units", type=int, default=200)
    ap.add_argument("--max-epochs", type=int, default=None, help="default: fit()'s for diffusion")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    result = trace(args.scm, args.variant, args.every, args.n_train, args.n_units, max_epochs=args.max_epochs)
    command = "python benchmarks/diffusion_training_curve.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    result["meta"] = {"command": command.strip(), "seconds": round(time.time() - t0, 1), "threads": args.threads,
                      "torch": torch.__version__, "medcausal": mc.__version__}
    stem = args.out / f"diffusion_training_curve_{args.scm}_{args.variant}"
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(stem.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    _figure(result, stem.with_suffix(".png"), f"diffusion on {args.scm} ({args.variant})")
    pts = result["points"]
    names = list(pts[0]["val_parts"]) if pts else []
    lines = [f"# Diffusion training curve: {args.scm} ({args.variant})", "",
             f"Command: `{result['meta']['command']}`  ",
             f"{result['meta']['seconds']} s on {args.threads} torch thread(s); {result['epochs']} epochs "
             f"({'CausalModel.fit defaults for `diffusion`' if args.max_epochs is None else '--max-epochs'}); figure: `{stem.name}.png`.", "",
             f"CF MSE x100 of the weights kept at the end (last, averaged): **{result['final_cf_mse_x100']:.3f}**. "
             f"Best-validation epoch per mechanism among the traced epochs: {result['best_val_epoch_per_mechanism']} "
             "(what per-mechanism selection by validation loss would keep; the CF MSE at those epochs is in "
             "the table).", "",
             "| epoch | lr | CF MSE x100 | " + " | ".join(f"val {n}" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    lines += [f"| {p['epoch']} | {p['lr']:.2g} | {p['cf_mse_x100']:.3f} | "
              + " | ".join(f"{p['val_parts'][n]:.4f}" for n in names) + " |" for p in pts]
    with atomic_write(stem.with_suffix(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
