"""iVAE vs plain VAE on the nonlinear-ICA data of Khemakhem et al. (AISTATS 2020).

Sources are conditionally independent given a segment label ``u`` (in each
segment every source is Gaussian with its own standard deviation drawn from
U(0.5, 3)); they are mixed by a random invertible leaky-ReLU MLP whose square
weight matrices have unit-norm columns and a condition number below the 25th
percentile of such random matrices (:func:`medcausal.crl.nonlinear_ica_data`).
Both models share every setting (architecture, observation noise, training
budget, refinement); the VAE differs only by its prior ``N(0, I)``.

Scores: Spearman MCC (the target), Pearson MCC, the weak (affine) MCC, and
the full :func:`medcausal.metrics.representation.report` on the posterior
means of all rows. Target: iVAE Spearman MCC >= 0.9 (mean over seeds) and at
least 0.1 above the VAE.

    python benchmarks/crl_identifiability.py            # full run, 2 worker processes
    python benchmarks/crl_identifiability.py --quick    # smoke test, seconds
    OMP_NUM_THREADS=1 python benchmarks/crl_identifiability.py --workers 1 --settings L2-slope0.2
                                                        # one setting, single-threaded

Writes ``benchmarks/results/crl_identifiability{,_quick}.{json,md}``; with
``--settings`` the chosen names are appended to the file stem.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker process

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Two mixing strengths: the leaky-ReLU slope sets how far each layer folds the data
# (slope 1 would be linear mixing).
SETTINGS = [
    {"name": "L2-slope0.5", "n_segments": 40, "n_per_segment": 250, "n_sources": 5, "n_layers": 2, "slope": 0.5},
    {"name": "L2-slope0.2", "n_segments": 40, "n_per_segment": 250, "n_sources": 5, "n_layers": 2, "slope": 0.2},
]
QUICK_SETTINGS = [
    {"name": "quick-L2-slope0.5", "n_segments": 6, "n_per_segment": 100, "n_sources": 3, "n_layers": 2,
     "slope": 0.5},
]
MODEL = {"hidden": (64, 64), "decoder_var": 1e-3, "posterior": "full"}  # defaults, spelled out
FIT = {"max_epochs": 180, "rounds": 3, "refine_steps": 1000, "batch_size": 256, "lr": 3e-3, "patience": 30}
QUICK_FIT = {"max_epochs": 6, "rounds": 2, "refine_steps": 50, "batch_size": 128, "lr": 3e-3, "patience": 30}
TARGET_MCC, TARGET_MARGIN = 0.9, 0.1
DEV_NOTES = (
    "Plain ELBO training alone (one 150-epoch run, no linear refinement) left the sources linearly mixed: "
    "Spearman MCC 0.865, 0.598, 0.572 on L2-slope0.2 data seeds 0-2 (weak, affine MCC 0.91, 0.93, 0.84), "
    "and 0.653 on L2-slope0.5 seed 1 (100 epochs) where one exact linear refinement step raised it to 0.978 "
    "and the ELBO from -5.49 to -5.07 nats per row. Without the refinement, single runs with a mean-field "
    "posterior, a learned observation variance or the paper's encoder q(z|x,u) stalled between 0.6 and 0.86 "
    "on 2-layer leaky-ReLU data of this kind. "
    "Deeper mixing (3 leaky-ReLU layers, slope 0.5) stayed near 0.65 in a single 150-epoch run; "
    "it is not part of this benchmark."
)


def run_one(job: dict) -> dict:
    """Fit one model on one data set; return its scores (runs in a worker process)."""
    import torch

    torch.set_num_threads(1)
    from medcausal.crl import IVAE, VAE, nonlinear_ica_data
    from medcausal.metrics.representation import mcc, report

    s = job["setting"]
    x, u, z = nonlinear_ica_data(s["n_segments"], s["n_per_segment"], s["n_sources"], n_layers=s["n_layers"],
                                 slope=s["slope"], seed=job["seed"])
    cls = IVAE if job["model"] == "iVAE" else VAE
    t0 = time.perf_counter()
    model = cls(s["n_sources"], **job["model_kwargs"]).fit(x, u, seed=job["seed"], verbose=False,
                                                            **job["fit_kwargs"])
    fit_seconds = time.perf_counter() - t0
    codes = model.encode(x, u)
    rep = report(z, codes, seed=job["seed"])
    return {
        "setting": s["name"], "model": job["model"], "seed": job["seed"],
        "mcc_spearman": mcc(z, codes, method="spearman").score,
        "mcc_pearson": mcc(z, codes).score,
        "mcc_weak": mcc(z, codes, variant="weak").score,
        "mcc_spearman_out_of_sample": mcc(z, codes, method="spearman", split=0.3, seed=job["seed"]).score,
        "report": {r.metric: float(r.score) for r in rep.itertuples()},
        "fit_seconds": round(fit_seconds, 2),
        "epochs": model.fit_info["epochs"],
        "best_val_neg_elbo": model.fit_info["best_val_loss"],
        "refine": model.fit_info["refine"],
    }


def summarize(runs: list[dict], settings: list[dict]) -> list[dict]:
    rows = []
    for s in settings:
        for name in ("iVAE", "VAE"):
            rs = [r for r in runs if r["setting"] == s["name"] and r["model"] == name]
            mccs = np.array([r["mcc_spearman"] for r in rs])
            metrics = sorted(rs[0]["report"])
            rows.append({
                "setting": s["name"], "model": name, "seeds": [r["seed"] for r in rs],
                "mcc_spearman_mean": float(mccs.mean()), "mcc_spearman_std": float(mccs.std(ddof=1))
                if len(mccs) > 1 else 0.0,
                "mcc_spearman_min": float(mccs.min()), "mcc_spearman_max": float(mccs.max()),
                "mcc_spearman_per_seed": [round(float(v), 4) for v in mccs],
                "mcc_pearson_mean": float(np.mean([r["mcc_pearson"] for r in rs])),
                "mcc_weak_mean": float(np.mean([r["mcc_weak"] for r in rs])),
                "mcc_spearman_oos_mean": float(np.mean([r["mcc_spearman_out_of_sample"] for r in rs])),
                "report_mean": {m: float(np.mean([r["report"][m] for r in rs])) for m in metrics},
                "report_std": {m: float(np.std([r["report"][m] for r in rs], ddof=1)) if len(rs) > 1 else 0.0
                               for m in metrics},
                "fit_seconds_mean": float(np.mean([r["fit_seconds"] for r in rs])),
            })
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        iv = next(r for r in rows if r["setting"] == setting and r["model"] == "iVAE")
        va = next(r for r in rows if r["setting"] == setting and r["model"] == "VAE")
        gap = iv["mcc_spearman_mean"] - va["mcc_spearman_mean"]
        out.append({"setting": setting, "ivae_mean": iv["mcc_spearman_mean"], "vae_mean": va["mcc_spearman_mean"],
                    "gap": gap, "mcc_target_met": iv["mcc_spearman_mean"] >= TARGET_MCC,
                    "margin_target_met": gap >= TARGET_MARGIN})
    return out


def markdown(payload: dict) -> str:
    rows, meta = payload["summary"], payload["meta"]
    lines = [
        "# iVAE vs plain VAE: nonlinear ICA (Khemakhem et al., AISTATS 2020)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Total wall time: {meta['wall_seconds']:.0f} s with {meta['workers']} worker process(es), one torch "
        f"thread each ({meta['machine']}). {meta['timing_note']}"
        + (f" Load average (1/5/15 min) at start {meta['load_average_1_5_15min']['start']}, at end "
           f"{meta['load_average_1_5_15min']['end']}." if "load_average_1_5_15min" in meta else ""),
        "",
        "Data (`medcausal.crl.nonlinear_ica_data`): per segment, each source is Gaussian with its own standard "
        "deviation ~ U(0.5, 3) (mean 0); mixing = `n_layers` random square matrices (unit-norm columns, "
        "condition number below the 25th percentile of such matrices) with a leaky ReLU of the given slope "
        f"between them. Data seed = model seed = {', '.join(str(v) for v in rows[0]['seeds'])}.",
        "",
        "| setting | segments x points | sources | layers | leaky slope |",
        "|---|---|---|---|---|",
    ]
    for s in payload["settings"]:
        lines.append(f"| {s['name']} | {s['n_segments']} x {s['n_per_segment']} | {s['n_sources']} | "
                     f"{s['n_layers']} | {s['slope']} |")
    lines += [
        "",
        f"Models (identical settings; the VAE has prior N(0, I)): `{payload['model_kwargs']}`; fit: "
        f"`{payload['fit_kwargs']}` (encoder q(z|x), full-covariance Gaussian posterior, fixed observation "
        "variance 1e-3 in standardized units, `rounds` training runs each followed by the exact linear "
        "refinement of the ELBO, see `IVAE.fit`).",
        "",
        f"## Target: iVAE Spearman MCC >= {TARGET_MCC} (mean over seeds) and >= {TARGET_MARGIN} above the VAE",
        "",
        "| setting | iVAE Spearman MCC mean ± sd [min, max] | VAE | gap | MCC target | margin target |",
        "|---|---|---|---|---|---|",
    ]
    for v in payload["verdicts"]:
        iv = next(r for r in rows if r["setting"] == v["setting"] and r["model"] == "iVAE")
        va = next(r for r in rows if r["setting"] == v["setting"] and r["model"] == "VAE")
        fmt = lambda r: (f"{r['mcc_spearman_mean']:.3f} ± {r['mcc_spearman_std']:.3f} "  # noqa: E731
                         f"[{r['mcc_spearman_min']:.3f}, {r['mcc_spearman_max']:.3f}]")
        lines.append(f"| {v['setting']} | {fmt(iv)} | {fmt(va)} | {v['gap']:+.3f} | "
                     f"{'met' if v['mcc_target_met'] else 'MISSED'} | "
                     f"{'met' if v['margin_target_met'] else 'MISSED'} |")
    lines += ["", "Per seed (Spearman MCC):", ""]
    for r in rows:
        lines.append(f"- {r['setting']} {r['model']}: {r['mcc_spearman_per_seed']}")
    metrics = list(rows[0]["report_mean"])
    lines += [
        "",
        "## Full metric report (`medcausal.metrics.representation.report`, mean ± sd over seeds)",
        "",
        "MCC rows are in-sample except `mcc_spearman_oos`, which matches on 70 % of the rows and scores the "
        "other 30 %; `mcc_weak` is after an affine regression, `mcc_weak_cca` after CCA. "
        "`dci_informativeness_error` is an error (0 best).",
        "",
        "| metric | " + " | ".join(f"{r['setting']} {r['model']}" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for m in metrics:
        lines.append(f"| {m} | " + " | ".join(f"{r['report_mean'][m]:.3f} ± {r['report_std'][m]:.3f}"
                                              for r in rows) + " |")
    lines.append("| fit seconds (mean) | " + " | ".join(f"{r['fit_seconds_mean']:.0f}" for r in rows) + " |")
    lines += ["", "## Notes (development measurements, not re-run by this script)", "", DEV_NOTES, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (one torch thread each)")
    parser.add_argument("--settings", nargs="+", default=None,
                        help=f"run only these settings (of {[s['name'] for s in SETTINGS]})")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from medcausal.io import atomic_write

    settings = QUICK_SETTINGS if args.quick else SETTINGS
    if args.settings:
        known = {s["name"]: s for s in settings}
        unknown = [n for n in args.settings if n not in known]
        if unknown:
            parser.error(f"unknown setting(s) {unknown}; known: {list(known)}")
        settings = [known[n] for n in args.settings]
    fit_kwargs = QUICK_FIT if args.quick else FIT
    model_kwargs = dict(MODEL, hidden=(16, 16)) if args.quick else MODEL
    jobs = [{"setting": s, "seed": seed, "model": name, "model_kwargs": model_kwargs, "fit_kwargs": fit_kwargs}
            for s in settings for seed in range(args.seeds) for name in ("iVAE", "VAE")]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    show = sys.stderr.isatty()
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            runs = list(tqdm(pool.imap(run_one, jobs), total=len(jobs), disable=not show, desc="fits"))
    else:
        runs = []
        partial = args.out / "crl_identifiability_partial.jsonl"  # finished fits, in case the run is cut short
        args.out.mkdir(parents=True, exist_ok=True)
        partial.write_text("")
        for j in tqdm(jobs, disable=not show, desc="fits"):
            runs.append(run_one(j))
            with open(partial, "a") as fh:
                fh.write(json.dumps(runs[-1], default=float) + "\n")
            print(f"done {j['setting']['name']} {j['model']} seed {j['seed']}: Spearman MCC "
                  f"{runs[-1]['mcc_spearman']:.3f} in {runs[-1]['fit_seconds']:.0f} s", flush=True)
        partial.unlink()
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    rows = summarize(runs, settings)
    command = "python benchmarks/crl_identifiability.py" + (" --quick" if args.quick else "") + (
        f" --seeds {args.seeds}" if args.seeds != 3 else "") + (f" --workers {args.workers}" if args.workers != 2
                                                                 else "") + (
        f" --settings {' '.join(args.settings)}" if args.settings else "")
    if os.environ.get("OMP_NUM_THREADS") == "1":
        command = "OMP_NUM_THREADS=1 " + command
    payload = {
        "meta": {"command": command, "wall_seconds": round(wall, 1), "workers": args.workers,
                 "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, Python "
                            f"{platform.python_version()}",
                 "timing_note": "Times measured on a shared machine are contaminated by other load.",
                 "load_average_1_5_15min": {"start": [round(v, 2) for v in load_before],
                                            "end": [round(v, 2) for v in load_after]}},
        "settings": settings, "model_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in model_kwargs.items()},
        "fit_kwargs": fit_kwargs, "target": {"mcc_spearman": TARGET_MCC, "margin_over_vae": TARGET_MARGIN},
        "summary": rows, "verdicts": verdicts(rows), "runs": runs,
    }
    stem = "crl_identifiability" + ("_quick" if args.quick else "") + (
        "_" + "_".join(args.settings) if args.settings else "")
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out / f"{stem}.json") as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2, default=float))
    with atomic_write(args.out / f"{stem}.md") as tmp:
        Path(tmp).write_text(markdown(payload))
    for v in payload["verdicts"]:
        print(f"{v['setting']}: iVAE {v['ivae_mean']:.3f}  VAE {v['vae_mean']:.3f}  gap {v['gap']:+.3f}  "
              f"MCC target {'met' if v['mcc_target_met'] else 'MISSED'}")
    print(f"wrote {args.out / stem}.json and .md in {wall:.0f} s")
    return payload


if __name__ == "__main__":
    main()
