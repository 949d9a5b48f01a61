"""FCR vs the CPA-style additive latent-shift baseline on the perturb-seq simulator, in one run.

Protocol (fixed; the same for both models):
- ``medcausal.synthetic.PerturbSeq()`` with its defaults (1000 genes, 3 cell types x 2 donors,
  8 single perturbations + 8 pair combinations, doses 0.5 / 1.0), structural seed 0
  (``--sim-seed N`` draws another simulator: its programs, effects and gene loadings; the
  results then go to ``perturbseq_sim{N}.*``);
- held out of training: the first two combinations of the simulator (never seen in any
  context), and one (cell type, perturbation) pair: the last cell type with the first single
  perturbation that is not a member of a held-out combination;
- training cells: ``sim.sample(10000, seed=0)`` over every other condition; both models get
  the same settings (``FCRModel(name).fit(max_epochs=250, batch_size=256, lr=3e-3,
  patience=50, seed=0)``, 10% validation split inside the shared training loop, the best
  weights kept; ``--fit-seed N`` trains with another seed), each with its mechanism's default
  hyperparameters and ``fit``'s default ``rounds`` (3 for fcr, each run ended by its linear
  refinement of the code; 1 for latent-shift; ``--rounds`` overrides fcr's);
- queries: control cells of each cell type (``sim.sample(n_eval, seed=1)``) are sent to
  every held-out combination (in every cell type) and to the held-out pair, at dose 1.0, with
  ``predict_counterfactual``;
- population metrics (``medcausal.metrics.singlecell.evaluate_condition``) against an
  independent true sample of the target condition (``seed=2``, same cell type, dose 1.0):
  R² of per-gene means and variances on all genes and on the top-20 DEGs (scanpy
  ``rank_genes_groups``, t-test, true cells vs the control cells, per cell type), LFC R²,
  E-distance and MMD on 30 PCs; per-cell counterfactual error against the simulator's true
  counterfactual counts of the very cells queried;
- representation metrics on ``representation_cells(sim, n_repr)``: ``sim.sample(n_repr, seed=3)``
  over every condition except the held-out combinations (the held-out pair's cells, about
  2% of them, are included): MCC
  (``medcausal.metrics.representation.mcc``, Pearson, strong and weak/affine, Spearman) of
  each learned block against the true factor block, NMI (k-means, k = number of labels) of
  each block with the context label (cell type x donor) and the treatment label; and, as a
  diagnostic of *why* an MCC is low, the within-condition R² of each true block from each
  learned block (``within_group_r2``): a block can match the factors' condition means
  without carrying the cells' own variation; and the MCC a perfect linear unmixing of the whole
  code could reach (``mcc(..., variant="weak", split=0.3)`` of each true block from all learned
  blocks): whether a low block MCC is information the code lacks or information it mixes; beside
  it, the same readout by a small MLP (information the code holds nonlinearly) and the linear
  readout of the simulator's gene programs (whether the code is closer to the programs than to
  the factors that drive them).

``--library-size L`` changes only the simulator's sequencing depth (default 2000 counts per
cell; results to ``perturbseq[_sim{N}]_lib{L}.*``): a diagnostic of how far the data's own
noise limits the representation metrics, not a change of the protocol.

    python benchmarks/perturbseq.py            # the full run
    python benchmarks/perturbseq.py --quick    # a small smoke run (minutes)
    python benchmarks/perturbseq.py --sim-seed 1   # the same protocol on another simulator
    python benchmarks/perturbseq.py --library-size 10000 --models fcr   # deeper sequencing (diagnostic)
    python benchmarks/perturbseq.py --models fcr --n-train 30000 --stem perturbseq_ntrain30000   # more cells
    python benchmarks/perturbseq.py --threads 1 --n-train 100000 --stem perturbseq_ntrain100000   # both models, ~90 min
    python benchmarks/perturbseq.py --models fcr --fit-seed 1 --stem perturbseq_fitseed1   # another training seed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
TARGETS = {"r2_mean_deg": 0.8, "r2_mean_all": 0.95, "mcc_interaction": 0.8, "nmi_context": 0.85,
           "nmi_context_treatment": 0.1}


def _held_out(sim):
    combos = list(sim.combinations[:2])
    members = {m for c in combos for m in c.split("+")}
    single = next(p for p in sim.perturbations if p not in members)
    return combos, (sim.cell_types[-1], single)


def representation_cells(sim, n: int):
    """The cells the representation metrics are computed on (also the supervised ceiling's)."""
    combos, _ = _held_out(sim)
    return sim.sample(n, seed=3, conditions=[c for c in sim.conditions if c not in combos])


def _evaluate_queries(sim, model, controls, targets, seed):
    import anndata as ad

    from medcausal.metrics.singlecell import evaluate_condition, top_degs

    rows = []
    for cond, ct in targets:
        src = controls[(controls.obs["cell_type"] == ct).to_numpy()]
        pop = sim.sample(6 * src.n_obs, seed=seed, conditions=[cond])
        pop = pop[((pop.obs["cell_type"] == ct) & (pop.obs["dose"] == 1.0)).to_numpy()]
        both = ad.concat([src, pop], index_unique="-")
        degs = top_degs(both, "perturbation", "control", n_genes=20)[("all", cond)]
        true_cf = sim.counterfactual(src, do={"perturbation": cond, "dose": 1.0})
        if model == "true-counterfactual":  # reference: the simulator's own answer (a ceiling)
            pred_counts = true_cf.layers["counts"]
        elif model == "no-change":  # reference: the control cells themselves, unchanged
            pred_counts = src.layers["counts"]
        else:
            pred_counts = model.predict_counterfactual(src, perturbation=cond, dose=1.0, seed=0).layers["counts"]
        m = evaluate_condition(pop.layers["counts"], pred_counts, src.layers["counts"], degs=degs,
                               true_cf_counts=true_cf.layers["counts"], factual_counts=src.layers["counts"])
        rows.append({"condition": cond, "cell_type": ct, "n_query": int(src.n_obs), "n_true": int(pop.n_obs),
                     **{k: float(v) for k, v in m.items()}})
    return rows


def result_stem(quick: bool, sim_seed: int, library_size: float | None = None) -> str:
    """The results' file stem: ``perturbseq[_quick][_sim<N>][_lib<L>]`` (no ``_sim`` for simulator
    seed 0; ``_lib<L>`` whenever a library size is given, written in full)."""
    lib = "" if library_size is None else f"_lib{int(library_size) if float(library_size).is_integer() else library_size}"
    return ("perturbseq_quick" if quick else "perturbseq") + (f"_sim{sim_seed}" if sim_seed else "") + lib


def simulator(n_genes: int, sim_seed: int, library_size: float | None = None):
    """The benchmark's ``PerturbSeq`` (its default library size unless one is given)."""
    from medcausal.synthetic.perturbseq import PerturbSeq

    return PerturbSeq(n_genes=n_genes, seed=sim_seed, **({} if library_size is None else {"library_size": library_size}))


def ceiling_stem(sim_seed: int, library_size: float | None = None) -> str:
    """The stem of ``perturbseq_ceiling.py``'s files for the same simulator."""
    return result_stem(False, sim_seed, library_size).replace("perturbseq", "perturbseq_ceiling", 1)


def _summaries(queries, combos) -> tuple[dict, dict]:
    combo_rows = [q for q in queries if q["condition"] in combos]
    summary = {k: float(np.mean([q[k] for q in combo_rows])) for k in combo_rows[0]
               if isinstance(combo_rows[0][k], float)}
    return summary, [q for q in queries if q["condition"] not in combos][0]


def _latents(model, cells) -> dict:
    if model == "true-factors":
        return {b: cells.obsm[f"z_{b}"] for b in ("context", "treatment", "interaction")}
    return model.get_latent_representation(cells)


def _whole_code(model, cells) -> np.ndarray:
    """All learned blocks side by side, ``[cells, sum of block sizes]``."""
    return np.concatenate(list(_latents(model, cells).values()), axis=1)


def _truth(cells) -> dict:
    return {b: cells.obsm[f"z_{b}"] for b in ("context", "treatment", "interaction")}


def _representation(sim, model, cells):
    from medcausal.metrics.representation import mcc
    from medcausal.metrics.singlecell import nmi

    lat = _latents(model, cells)
    context = (cells.obs["cell_type"].astype(str) + ":" + cells.obs["donor"].astype(str)).to_numpy()
    treatment = cells.obs["perturbation"].astype(str).to_numpy()
    truth = _truth(cells)
    out = {}
    for block, z in lat.items():
        row = {"nmi_context": nmi(z, context), "nmi_treatment": nmi(z, treatment)}
        for name, f in truth.items():
            row[f"mcc_{name}"] = mcc(f, z).score
        matched = truth.get(block, truth["interaction"])
        row["mcc_weak_matched"] = mcc(matched, z, variant="weak").score
        row["mcc_spearman_matched"] = mcc(matched, z, method="spearman").score
        out[block] = {k: float(v) for k, v in row.items()}
    return out


def _linear_readout(model, cells) -> dict:
    """What a perfect linear unmixing of the whole code could score: each true block predicted
    from all learned blocks by an affine map fitted on 70% of the cells, scored by Pearson r on
    the other 30% (``mcc(..., variant="weak", split=0.3)``). A bound for the (strong) MCC of a
    block, which reads the factors from that block alone, as they are. ``programs`` is all the
    simulator's gene programs ``h`` (all the factors pushed through the program graph's ``tanh``
    edges), to compare with the three factor blocks together: a code that reads the programs
    better than the factors holds the factors nonlinearly."""
    from medcausal.metrics.representation import mcc

    code = _whole_code(model, cells)
    targets = {**_truth(cells), "programs": cells.obsm["programs"]}
    return {name: float(mcc(f, code, variant="weak", split=0.3, seed=0).score) for name, f in targets.items()}


def _mlp_readout(model, cells) -> dict:
    """An estimate of what a nonlinear unmixing of the whole code could score: each true factor predicted
    from all learned blocks by an MLP (scikit-learn, two hidden layers of 64, early stopping),
    trained on a random 70% of the cells (seed 0), Pearson r on the other 30%, averaged over each
    block's factors."""
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    code = _whole_code(model, cells)
    order = np.random.default_rng(0).permutation(len(code))
    cut = int(round(0.7 * len(code)))
    train, test = order[:cut], order[cut:]
    scale = StandardScaler().fit(code[train])
    out = {}
    for name, f in _truth(cells).items():
        rs = []
        for j in range(f.shape[1]):
            reg = MLPRegressor(hidden_layer_sizes=(64, 64), alpha=1e-3, max_iter=2000, early_stopping=True,
                               random_state=0).fit(scale.transform(code[train]), f[train, j])
            rs.append(np.corrcoef(reg.predict(scale.transform(code[test])), f[test, j])[0, 1])
        out[name] = float(np.mean(rs))
    return out


def _within_condition(model, cells) -> dict:
    """Where the true factors' variation *within* a condition (context x treatment x dose) lives.

    ``{learned block or "all blocks": {true block: within-condition R²}}``
    (``medcausal.metrics.representation.within_group_r2``). A block that codes only the
    condition scores 0 here, however high its MCC.
    """
    from medcausal.metrics.representation import within_group_r2

    lat = _latents(model, cells)
    if len(lat) > 1:
        lat["all blocks"] = np.concatenate(list(lat.values()), axis=1)
    obs = cells.obs
    condition = (obs["cell_type"].astype(str) + ":" + obs["donor"].astype(str) + ":"
                 + obs["perturbation"].astype(str) + ":" + obs["dose"].astype(str)).to_numpy()
    return {block: {name: within_group_r2(f, z, condition).score for name, f in _truth(cells).items()}
            for block, z in lat.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["fcr", "latent-shift"])
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--sim-seed", type=int, default=0,
                    help="structural seed of the PerturbSeq simulator (default 0)")
    ap.add_argument("--fcr-hparams", type=json.loads, default={},
                    help='hyperparameters of the fcr model, as JSON (e.g. \'{"lambda_cls_interaction": 0}\')')
    ap.add_argument("--rounds", type=int, default=None,
                    help="fcr: training runs, each ended by the linear refinement (FCRModel.fit(rounds=...); "
                         "default: the library's, 3)")
    ap.add_argument("--fit-seed", type=int, default=0,
                    help="the models' training seed (FCRModel.fit(seed=...)); another seed measures how much "
                         "the results move with the training's own randomness (needs a --stem)")
    ap.add_argument("--library-size", type=float, default=None,
                    help="the simulator's mean library size (default: PerturbSeq's, 2000 counts per cell); "
                         "a diagnostic of how sequencing depth limits the representation metrics")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--stem", default=None,
                    help="result file name (default perturbseq[_sim<N>][_lib<L>]); required by the options "
                         "that change the protocol (--n-train, --epochs, --fcr-hparams, --rounds, --fit-seed), whose "
                         "runs would otherwise replace the protocol's own files")
    args = ap.parse_args(argv)
    changed = [flag for flag, on in (("--n-train", args.n_train), ("--epochs", args.epochs),
                                     ("--fcr-hparams", args.fcr_hparams), ("--rounds", args.rounds is not None),
                                     ("--fit-seed", args.fit_seed != 0)) if on]
    if changed and args.stem is None:
        ap.error(f"{', '.join(changed)} change the protocol: give a --stem, or the run would replace "
                 "the protocol's own result files")
    torch.set_num_threads(args.threads)

    import medcausal
    from medcausal.adapters.singlecell import FCRModel, setup_anndata
    from medcausal.io import atomic_write

    t_start = time.perf_counter()
    sizes = ({"n_genes": 200, "n_train": 1500, "n_eval": 600, "n_repr": 600, "epochs": 8, "patience": 5}
             if args.quick else
             {"n_genes": 1000, "n_train": 10000, "n_eval": 1500, "n_repr": 3000, "epochs": 250, "patience": 50})
    if args.n_train:
        sizes["n_train"] = args.n_train
    if args.epochs:
        sizes["epochs"] = args.epochs
    sim = simulator(sizes["n_genes"], args.sim_seed, args.library_size)
    combos, pair = _held_out(sim)
    train = sim.sample(sizes["n_train"], seed=0, conditions=[c for c in sim.conditions if c not in combos],
                       exclude=[pair])
    setup_anndata(train, perturbation_key="perturbation", control="control",
                  covariate_keys=["cell_type", "donor"], dose_key="dose")
    controls = sim.sample(sizes["n_eval"], seed=1, conditions=["control"])
    repr_cells = representation_cells(sim, sizes["n_repr"])
    targets = [(c, ct) for c in combos for ct in sim.cell_types] + [(pair[1], pair[0])]
    load_start = os.getloadavg()
    report = {"command": " ".join(["python benchmarks/perturbseq.py", shlex.join(argv or [])]).strip(),
              "sizes": sizes, "held_out_combinations": combos, "held_out_pair": list(pair),
              "simulator": repr(sim), "medcausal_version": medcausal.__version__,
              "torch": torch.__version__, "threads": args.threads, "fcr_hparams": args.fcr_hparams,
              "fcr_rounds": args.rounds, "fit_seed": args.fit_seed,
              "ceiling": ceiling_stem(args.sim_seed, args.library_size),
              "ceiling_args": "".join([f" --sim-seed {args.sim_seed}" if args.sim_seed else "",
                                       "" if args.library_size is None else f" --library-size {args.library_size!r}"]),
              "python": platform.python_version(), "models": {}}
    for name in args.models:
        t0 = time.perf_counter()
        hparams = args.fcr_hparams if name == "fcr" else {}
        model = FCRModel(name, **hparams).fit(train, max_epochs=sizes["epochs"], batch_size=256, lr=3e-3,
                                              patience=sizes["patience"], seed=args.fit_seed, verbose=None,
                                              rounds=args.rounds if name == "fcr" else None)
        fit_s = time.perf_counter() - t0
        queries = _evaluate_queries(sim, model, controls, targets, seed=2)
        rep = _representation(sim, model, repr_cells)
        within = _within_condition(model, repr_cells)
        readout = _linear_readout(model, repr_cells)
        mlp_readout = _mlp_readout(model, repr_cells)
        summary, pair_row = _summaries(queries, combos)
        report["models"][name] = {"fit_seconds": round(fit_s, 1), "fit": model.fit_info,
                                  "held_out_combinations_mean": summary, "held_out_pair": pair_row,
                                  "queries": queries, "representation": rep, "within_condition_r2": within,
                                  "linear_readout_r": readout, "mlp_readout_r": mlp_readout}
        print(f"[{name}] fit {fit_s:.0f} s; held-out combos: " + ", ".join(
            f"{k}={v:.3f}" for k, v in summary.items() if k.startswith(("r2_mean", "cf_rmse"))), flush=True)
    # references, same queries and metrics: the simulator's true counterfactual of the queried cells
    # (the best any model can do against an independent finite sample) and the unchanged controls
    report["references"] = {}
    for ref in ("true-counterfactual", "no-change"):
        queries = _evaluate_queries(sim, ref, controls, targets, seed=2)
        summary, pair_row = _summaries(queries, combos)
        report["references"][ref] = {"held_out_combinations_mean": summary, "held_out_pair": pair_row,
                                     "queries": queries}
    report["references"]["true-factors"] = {"representation": _representation(sim, "true-factors", repr_cells),
                                            "within_condition_r2": _within_condition("true-factors", repr_cells)}
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["load_average"] = {"start_1_5_15min": [round(x, 2) for x in load_start],
                              "end_1_5_15min": [round(x, 2) for x in os.getloadavg()],
                              "cpu_count": os.cpu_count()}
    report["targets"] = _targets(report)
    stem = args.stem or result_stem(args.quick, args.sim_seed, args.library_size)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out / f"{stem}.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    with atomic_write(args.out / f"{stem}.md") as tmp:
        Path(tmp).write_text(_markdown(report))
    print(_markdown(report))
    return report


def _targets(report) -> list[dict]:
    models = report["models"]
    rows = []
    if "fcr" not in models:
        return rows
    f = models["fcr"]
    base = models.get("latent-shift")
    for key, label in (("r2_mean_deg", "R² mean, top-20 DEGs, held-out combos"),
                       ("r2_mean_all", "R² mean, all genes, held-out combos")):
        v = f["held_out_combinations_mean"][key]
        rows.append({"target": f"FCR {label} >= {TARGETS[key]}", "value": round(v, 3), "met": v >= TARGETS[key]})
        if base is not None:
            b = base["held_out_combinations_mean"][key]
            rows.append({"target": f"FCR {label} > baseline", "value": f"{v:.3f} vs {b:.3f}", "met": v > b})
    rep = f["representation"]
    v = rep["interaction"]["mcc_interaction"]
    rows.append({"target": "MCC(z_tx, true interaction factors) >= 0.8 (Pearson, strong)", "value": round(v, 3),
                 "met": v >= TARGETS["mcc_interaction"]})
    v = rep["context"]["nmi_context"]
    rows.append({"target": "NMI(z_x, context) >= 0.85", "value": round(v, 3), "met": v >= TARGETS["nmi_context"]})
    v = rep["context"]["nmi_treatment"]
    rows.append({"target": "NMI(z_x, treatment) <= 0.1", "value": round(v, 3),
                 "met": v <= TARGETS["nmi_context_treatment"]})
    return rows


def _markdown(report) -> str:
    cols = ["r2_mean_all", "r2_mean_deg", "r2_var_all", "r2_var_deg", "lfc_r2_all", "lfc_r2_deg", "e_distance",
            "mmd", "cf_rmse", "cf_delta_pearson"]
    lines = [f"# Perturb-seq benchmark{' (quick)' if 'quick' in report['command'] else ''}", "",
             f"Command: `{report['command']}`  ",
             f"Run complete; {report['seconds']} s on {report['threads']} torch threads; medcausal "
             f"{report['medcausal_version']}, torch {report['torch']}.  ",
             f"Simulator: `{report['simulator']}`; sizes: {report['sizes']}.  ",
             f"Held out: combinations {report['held_out_combinations']} (every cell type) and the pair "
             f"{tuple(report['held_out_pair'])}.  ",
             f"Machine load (1/5/15-min load average, {report['load_average']['cpu_count']} CPUs): "
             f"{report['load_average']['start_1_5_15min']} at the start, "
             f"{report['load_average']['end_1_5_15min']} at the end (the machine was shared).", "",
             "Reference rows (not models): `true-counterfactual` is the simulator's true counterfactual "
             "of the queried cells, scored like a prediction (the ceiling against an independent finite "
             "true sample); `no-change` predicts the control cells unchanged.", "",
             "## Held-out combinations (mean over combinations x cell types)", "",
             "| model | fit_s | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    rows = [(n, m, m["fit_seconds"]) for n, m in report["models"].items()]
    rows += [(f"*{n}*", m, "-") for n, m in report.get("references", {}).items() if "queries" in m]
    for name, m, fit_s in rows:
        s = m["held_out_combinations_mean"]
        lines.append(f"| {name} | {fit_s} | " + " | ".join(f"{s[c]:.3f}" for c in cols) + " |")
    lines += ["", "## Held-out (cell type, perturbation) pair", "", "| model | " + " | ".join(cols) + " |",
              "|---|" + "---|" * len(cols)]
    for name, m, _ in rows:
        s = m["held_out_pair"]
        lines.append(f"| {name} | " + " | ".join(f"{s[c]:.3f}" for c in cols) + " |")
    lines += ["", "## Every query", "", "| model | condition | cell type | " + " | ".join(cols[:2] + cols[-2:]) + " |",
              "|---|---|---|" + "---|" * 4]
    for name, m, _ in rows:
        for q in m["queries"]:
            lines.append(f"| {name} | {q['condition']} | {q['cell_type']} | "
                         + " | ".join(f"{q[c]:.3f}" for c in cols[:2] + cols[-2:]) + " |")
    lines += ["", "## Representations (test cells of the training conditions)", "",
              "How much of each true factor the data reveal at all (a supervised regression on counts "
              f"and condition, a reference for these MCCs): `{report.get('ceiling', 'perturbseq_ceiling')}.md` "
              f"(`python benchmarks/perturbseq_ceiling.py{report.get('ceiling_args', '')}`).", "",
              "| model | block | NMI context | NMI treatment | MCC z_context | MCC z_treatment | MCC z_interaction "
              "| MCC weak (matched) | MCC Spearman (matched) |", "|---|---|---|---|---|---|---|---|---|"]
    reps = [(n, m) for n, m in report["models"].items()]
    reps += [(f"*{n}*", m) for n, m in report.get("references", {}).items() if "representation" in m]
    for name, m in reps:
        for block, r in m["representation"].items():
            lines.append(f"| {name} | {block} | {r['nmi_context']:.3f} | {r['nmi_treatment']:.3f} | "
                         f"{r['mcc_context']:.3f} | {r['mcc_treatment']:.3f} | {r['mcc_interaction']:.3f} | "
                         f"{r['mcc_weak_matched']:.3f} | {r['mcc_spearman_matched']:.3f} |")
    lines += ["", "## Where the true factors' within-condition variation lives", "",
              "Cross-validated R² of each true block's deviation from its condition mean (condition: "
              "cell type x donor x perturbation x dose), predicted linearly from a learned block's "
              "deviations (`medcausal.metrics.representation.within_group_r2`). A block that only "
              "codes the condition scores 0 however high its MCC; `all blocks` is the whole code.", "",
              "| model | learned block | z_context | z_treatment | z_interaction |", "|---|---|---|---|---|"]
    for name, m in reps:
        for block, r in m.get("within_condition_r2", {}).items():
            lines.append(f"| {name} | {block} | {r['context']:.3f} | {r['treatment']:.3f} | "
                         f"{r['interaction']:.3f} |")
    lines += ["", "## How far an unmixing of the whole code could go", "",
              "Each true block predicted from all learned blocks together, fitted on 70% of the "
              "representation cells, Pearson r on the other 30%: `linear` by an affine map (`mcc(..., "
              "variant=\"weak\", split=0.3)`), the MCC a perfect linear unmixing of this code would "
              "reach, a bound for the block MCCs above (up to sampling error); `mlp` by a small MLP per "
              "factor, an estimate of what a nonlinear unmixing could reach. `programs`: the simulator's gene "
              "programs, the factors pushed through the program graph's tanh edges; a code that reads "
              "them (or the MLP) better than it reads the factors linearly holds the factors "
              "nonlinearly.", "", "| model | readout | z_context | z_treatment | z_interaction | programs |",
              "|---|---|---|---|---|---|"]
    for name, m in report["models"].items():
        for kind in ("linear", "mlp"):
            r = m.get(f"{kind}_readout_r")
            if r:
                prog = f"{r['programs']:.3f}" if "programs" in r else "-"
                lines.append(f"| {name} | {kind} | {r['context']:.3f} | {r['treatment']:.3f} | "
                             f"{r['interaction']:.3f} | {prog} |")
    lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['value']} | {t['met']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
