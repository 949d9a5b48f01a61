"""How much of each true latent factor of the perturb-seq simulator do the data reveal?

A reference for the representation targets of ``benchmarks/perturbseq.py`` (MCC of a
learned block against the true factors): a *supervised* regression of each true factor
block on what a model sees of a cell, its counts (50 PCs of log-normalized counts) and its
condition one-hots (cell type, donor, perturbation), scored by 3-fold cross-validated
Pearson correlation per factor. A reference for the MCC a block can reach, not a strict bound:
these regressors see only 50 PCs of the counts, and an MLP reading a learned code has beaten
them (``results/perturbseq_interaction_mcc.md``). The condition alone shows how much of each
factor is the condition's mean.

Same simulator and representation cells as the perturb-seq benchmark
(``perturbseq.representation_cells(PerturbSeq(n_genes=1000, seed=0), 3000)``).

    python benchmarks/perturbseq_ceiling.py
    python benchmarks/perturbseq_ceiling.py --sim-seed 1 --library-size 10000   # another simulator, deeper
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.neural_network import MLPRegressor

from medcausal.io import atomic_write

sys.path.insert(0, str(Path(__file__).parent))
from perturbseq import ceiling_stem, representation_cells, simulator  # noqa: E402  (the benchmark's own cells)

RESULTS = Path(__file__).parent / "results"
BLOCKS = ("z_context", "z_treatment", "z_interaction")


def _cv_corr(model, features: np.ndarray, target: np.ndarray) -> list[float]:
    pred = cross_val_predict(model, features, target, cv=KFold(3, shuffle=True, random_state=0))
    return [float(np.corrcoef(pred[:, j], target[:, j])[0, 1]) for j in range(target.shape[1])]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-cells", type=int, default=3000)
    ap.add_argument("--sim-seed", type=int, default=0, help="as in perturbseq.py")
    ap.add_argument("--library-size", type=float, default=None, help="as in perturbseq.py")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.time()
    sim = simulator(1000, args.sim_seed, args.library_size)
    adata = representation_cells(sim, args.n_cells)
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    counts = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts, dtype=float)
    logn = np.log1p(counts / counts.sum(1, keepdims=True).clip(min=1) * 1e4)
    pcs = PCA(50, random_state=0).fit_transform(logn - logn.mean(0))
    cond = pd.get_dummies(adata.obs[["cell_type", "donor", "perturbation"]].astype(str)).to_numpy(float)
    ridge = RidgeCV(alphas=np.logspace(-2, 3, 12))
    mlp = MLPRegressor(hidden_layer_sizes=(128, 128), max_iter=300, early_stopping=True, random_state=0)
    rows = []
    for block in BLOCKS:
        truth = np.asarray(adata.obsm[block], dtype=float)
        for features, regressor, corr in (
                ("condition", "ridge", _cv_corr(ridge, cond, truth)),
                ("counts + condition", "ridge", _cv_corr(ridge, np.hstack([pcs, cond]), truth)),
                ("counts + condition", "mlp", _cv_corr(mlp, np.hstack([pcs, cond]), truth))):
            rows.append({"block": block, "features": features, "regressor": regressor,
                         "mean_r": float(np.mean(corr)), "r_per_factor": [round(c, 3) for c in corr]})
            print(f"{block:14s} {features:19s} {regressor:5s} mean r {rows[-1]['mean_r']:.3f} "
                  f"{rows[-1]['r_per_factor']}", flush=True)
    command = "python benchmarks/perturbseq_ceiling.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = {"meta": {"command": command.strip(), "seconds": round(time.time() - t0, 1),
                       "n_cells": args.n_cells, "simulator": repr(sim)}, "rows": rows}
    stem = ceiling_stem(args.sim_seed, args.library_size)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out / f"{stem}.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
    lines = ["# Perturb-seq: how much of each true factor the data reveal (supervised reference)", "",
             f"Command: `{report['meta']['command']}`  ",
             f"{args.n_cells} cells of `representation_cells({sim!r}, n)` (the perturb-seq "
             f"benchmark's representation cells); {report['meta']['seconds']} s.", "",
             "3-fold cross-validated Pearson r between each true factor and its supervised prediction from "
             "the features; `mean_r` averages the factors of the block. A reference for an unsupervised "
             "block's MCC against the same factors, not a strict bound (the regressors see 50 PCs of the "
             "counts).", "",
             "| block | features | regressor | mean r | r per factor |", "|---|---|---|---|---|"]
    lines += [f"| {r['block']} | {r['features']} | {r['regressor']} | {r['mean_r']:.3f} | {r['r_per_factor']} |"
              for r in rows]
    with atomic_write(args.out / f"{stem}.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
