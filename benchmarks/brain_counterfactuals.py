"""``hvae`` vs ``cvae`` counterfactual brain scans against the ground truth, in one run.

Protocol (fixed; the same for both mechanisms):

- cohort: ``medcausal.synthetic.BrainMRI`` axial slices (64x64 by default); ``--n-train``
  training patients (seed 0) and ``--n-test`` held-out patients (seed 1);
- the image mechanism alone is trained on the training scans given their true parents
  (``scanner`` one-hot, ``icv``, ``brain_volume``, ``ventricle_volume``, ``lesion_load``
  standardized: the codecs ``CausalModel`` uses), with the one training loop
  (``medcausal.train.train``), the same ``--steps``, batch size and learning rate for both;
- queries on the held-out patients: do(age + 20), do(disease := 1 - disease),
  do(sex := 1 - sex), do(scanner := next scanner). The simulator gives each patient's true
  counterfactual parents and scan; the mechanism gets the true counterfactual parents, so
  the numbers measure the image mechanism alone;
- true-counterfactual MAE / SSIM of the counterfactual scan, next to the null-abduction
  baseline (a fresh interventional sample under the same counterfactual parents, i.e. the
  patient's own noise thrown away) and the "unchanged" baseline (the factual scan);
- oracle effectiveness: ``BrainMRI.measure`` (the simulator's segmentation) on the
  counterfactual scans vs the true counterfactual volumes, MAE in mL, per intervened
  variable, next to measure() on the true counterfactual scans (the oracle's own error);
- effectiveness by anti-causal predictors (a CNN medcausal trains on the training scans):
  MAE of each continuous parent (in standardized units) and scanner accuracy;
- composition: L1 after 1 and 10 null interventions (the mechanism's counterfactual, pixel
  noise included; and the decoder mean, i.e. the VAE alone, as in Ribeiro et al.);
  reversibility: L1 after 1..3 cycles of do(age + 20) then undo;
- realism: Fréchet distance between predictor features (its penultimate layer) of fresh
  samples under the held-out patients' parents and the held-out real scans;
- training images/s, and counterfactual ms/patient (abduction + prediction, batches of 64).

    python benchmarks/brain_counterfactuals.py                 # full run (~15 min on 2 cores)
    python benchmarks/brain_counterfactuals.py --quick         # smoke run (~1 min)
    python benchmarks/brain_counterfactuals.py --models hvae hvae-mediator   # latents as mediators
    python benchmarks/brain_counterfactuals.py --models hvae hvae-decoder-scale   # sigma(z, pa) from the decoder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medcausal.adapters import tabular
from medcausal.errors import OutOfSupportWarning
from medcausal.io import atomic_write
from medcausal.mechanisms import registry
from medcausal.mechanisms import cvae as _cvae  # noqa: F401  (registers "cvae")
from medcausal.mechanisms import hvae as _hvae  # noqa: F401  (registers "hvae")
from medcausal.metrics import images as im
from medcausal.metrics.predictors import AntiCausalPredictor
from medcausal.synthetic.brain import SCANNERS, BrainMRI

RESULTS = Path(__file__).parent / "results"
VOLUMES = ("icv", "brain_volume", "ventricle_volume", "lesion_load")


def _next_scanner(s):
    order = list(SCANNERS)
    return np.array([order[(order.index(v) + 1) % len(order)] for v in s], dtype=object)


#: --models choices: name -> (registered mechanism, hyperparameters); the defaults otherwise.
MODELS = {"hvae": ("hvae", {}), "cvae": ("cvae", {}),
          "hvae-mediator": ("hvae", {"latent_mode": "mediator", "mediator_abduction": "prior"}),
          "hvae-decoder-scale": ("hvae", {"pixel_scale": "decoder"}),
          "hvae-mediator-mixture": ("hvae", {"latent_mode": "mediator", "mediator_abduction": "mixture",
                                             "alpha": 0.5})}

QUERIES = {
    "age+20": {"age": lambda a: a + 20.0},
    "disease flip": {"disease": lambda d: 1 - d},
    "sex flip": {"sex": lambda s: 1 - s},
    "scanner next": {"scanner": _next_scanner},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parent_encoder(sim, train):
    """The parents of ``mri`` encoded as CausalModel encodes them (codecs fitted on train)."""
    codecs = tabular.fit_codecs(train, sim.graph)
    parents = sim.graph.parents("mri")

    def encode(cohort) -> torch.Tensor:
        return torch.cat([codecs[p].features(codecs[p].encode(cohort)) for p in parents], dim=1)

    return encode, {p: codecs[p].feature_dim for p in parents}


def timed_counterfactual(mech, x, pa, pa_cf, batch=64):
    out, t0 = [], time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(x), batch):
            out.append(mech.counterfactual(x[s:s + batch], pa[s:s + batch], pa_cf[s:s + batch]))
    return torch.cat(out), (time.perf_counter() - t0) / len(x) * 1000.0


def evaluate(name, mech, sim, test, x_test, pa_test, encode, truths, predictor, pred_targets, seed):
    res = {"queries": {}}
    ms = []
    for q, true in truths.items():
        pa_cf = encode(true)
        x_true = true.arrays["mri"]
        cf, ms_q = timed_counterfactual(mech, x_test, pa_test, pa_cf)
        ms.append(ms_q)
        with torch.no_grad():
            fresh = mech.sample(pa_cf, generator=torch.Generator().manual_seed(seed))
        cf_np, fresh_np = cf.numpy(), fresh.numpy()
        row = {"cf": im.true_counterfactual_error(cf_np, x_true, data_range=1.0),
               "null_abduction": im.true_counterfactual_error(fresh_np, x_true, data_range=1.0),
               "unchanged": im.true_counterfactual_error(x_test.numpy(), x_true, data_range=1.0)}
        changed = [v for v in VOLUMES if not np.allclose(true.table[v], test.table[v])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m_cf, m_true = sim.measure(cf_np), sim.measure(x_true)
        targets = {v: true.table[v].to_numpy() for v in changed}
        row["oracle"] = {v: {"cf_mae_ml": im.effectiveness(m_cf[v], targets[v])["mae"],
                             "true_scan_mae_ml": im.effectiveness(m_true[v], targets[v])["mae"],
                             "mean_abs_change_ml": float(np.abs(targets[v] - test.table[v]).mean())}
                         for v in changed}
        pred = predictor.predict(cf_np)
        eff = {}
        for k, kind in pred_targets.items():
            target = _predictor_values(true, encode, k)
            eff[k] = im.effectiveness(pred[k], target, "categorical" if kind != "continuous" else "continuous")
        row["effectiveness"] = eff
        res["queries"][q] = row
    res["cf_ms_per_patient"] = float(np.median(ms))
    with torch.no_grad():
        res["null_max_abs_error"] = float((mech.counterfactual(x_test, pa_test, pa_test) - x_test).abs().max())
    null = lambda x: mech.counterfactual(x, pa_test, pa_test)  # noqa: E731
    res["composition"] = im.composition(null, x_test, steps=10).l1
    mean_null = lambda x: mech.reconstruct(x, pa_test)  # noqa: E731
    res["composition_decoder_mean"] = im.composition(mean_null, x_test, steps=10).l1
    pa_age = encode(truths["age+20"])
    do = lambda x: mech.counterfactual(x, pa_test, pa_age)  # noqa: E731
    undo = lambda x: mech.counterfactual(x, pa_age, pa_test)  # noqa: E731
    res["reversibility"] = im.reversibility(do, undo, x_test, cycles=3).l1
    with torch.no_grad():
        gen = mech.sample(pa_test, generator=torch.Generator().manual_seed(seed + 1)).numpy()
    res["fid_samples_vs_real"] = im.feature_frechet_distance(x_test.numpy(), gen, predictor.features)
    return res


def _predictor_values(cohort, encode, k):
    if k == "scanner":
        return np.array([list(SCANNERS).index(s) for s in cohort.table["scanner"]])
    return cohort.table[k].to_numpy(dtype=float)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--steps", type=int, default=600, help="training steps per mechanism")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--models", nargs="+", default=["hvae", "cvae"], choices=sorted(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.n_train, args.n_test, args.steps = 32, 200, 40, 30
    torch.set_num_threads(args.threads)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    command = (f"{env} " if env else "") + "python benchmarks/brain_counterfactuals.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    t_all = time.perf_counter()
    warnings.simplefilter("ignore", OutOfSupportWarning)

    sim = BrainMRI(shape=(args.size, args.size))
    log(f"rendering {args.n_train} + {args.n_test} patients and {len(QUERIES)} counterfactual sets")
    t0 = time.perf_counter()
    train = sim.sample(args.n_train, seed=args.seed)
    test = sim.sample(args.n_test, seed=args.seed + 1)
    truths = {q: sim.counterfactual(test, do=do) for q, do in QUERIES.items()}
    sim_seconds = time.perf_counter() - t0
    encode, parent_dims = parent_encoder(sim, train)
    x_train, pa_train = torch.from_numpy(train.arrays["mri"]), encode(train)
    x_test, pa_test = torch.from_numpy(test.arrays["mri"]), encode(test)

    log("training the anti-causal predictor")
    t0 = time.perf_counter()
    pred_targets = {"scanner": len(SCANNERS), "icv": "continuous", "brain_volume": "continuous",
                    "ventricle_volume": "continuous", "lesion_load": "continuous"}
    torch.manual_seed(args.seed)
    predictor = AntiCausalPredictor((1, args.size, args.size), pred_targets)
    predictor.fit(x_train, {k: _predictor_values(train, encode, k) for k in pred_targets},
                  max_epochs=3 if args.quick else 10, seed=args.seed, verbose=False)
    pred_test = predictor.predict(x_test)
    predictor_quality = {k: im.effectiveness(pred_test[k], _predictor_values(test, encode, k),
                                             "categorical" if k == "scanner" else "continuous")
                         for k in pred_targets}
    predictor_seconds = time.perf_counter() - t0

    results = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        kind, hparams = MODELS[name]
        mech = registry.get(kind)(sim.graph.variables["mri"], parent_dims, **hparams)
        log(f"training {name}: {args.steps} steps")
        t0 = time.perf_counter()
        fit = mech.fit(x_train, pa_train, max_steps=args.steps, max_epochs=10 ** 6, batch_size=args.batch_size,
                       lr=args.lr, patience=10 ** 6, seed=args.seed, verbose=None)
        seconds = time.perf_counter() - t0
        mech.eval()
        log(f"evaluating {name}")
        r = evaluate(name, mech, sim, test, x_test, pa_test, encode, truths, predictor, pred_targets, args.seed)
        r.update({"train_seconds": seconds, "steps": fit.steps, "best_val_loss_nats": fit.best_val_loss,
                  "train_images_per_s": fit.steps * args.batch_size / seconds,
                  "parameters": sum(p.numel() for p in mech.net.parameters()), "hparams": mech.hparams})
        results[name] = r
        print(f"{name}: trained {seconds:.0f}s; CF MAE "
              f"{np.mean([q['cf']['mae'] for q in r['queries'].values()]):.4f}", file=sys.stderr)

    summary = {"command": command, "protocol": __doc__, "size": args.size, "n_train": args.n_train,
               "n_test": args.n_test, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "threads": args.threads, "machine": platform.platform(), "cpu_count": os.cpu_count(),
               "load_average": os.getloadavg(), "simulator_seconds": sim_seconds,
               "predictor_seconds": predictor_seconds, "predictor_test_quality": predictor_quality,
               "results": results, "total_seconds": time.perf_counter() - t_all}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "brain_counterfactuals" + ("_quick" if args.quick else "")
    with atomic_write(args.out / f"{stem}.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1, default=float))
    md = render_markdown(summary)
    with atomic_write(args.out / f"{stem}.md") as tmp:
        Path(tmp).write_text(md)
    print(md)
    return summary


def _fmt(v, nd=4):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}g}"


def render_markdown(s: dict) -> str:
    res = s["results"]
    names = list(res)
    L = [f"# Counterfactual brain scans: {' vs '.join(names)}", "",
         f"Command: `{s['command']}`  ", f"BrainMRI {s['size']}x{s['size']}, {s['n_train']} training / "
         f"{s['n_test']} held-out patients; {s['steps']} steps of batch {s['batch_size']}, lr {s['lr']}; "
         f"{s['threads']} torch threads on {s['cpu_count']} CPUs (load average at the end "
         f"{', '.join(f'{x:.1f}' for x in s['load_average'])}: timings taken on a shared machine are "
         f"inflated by the load). Total {s['total_seconds'] / 60:.1f} min.", ""]
    L += ["## True-counterfactual error (held-out patients, mean over the queries)", "",
          "| mechanism | CF MAE | null-abduction MAE | CF / null (target <= 0.5) | unchanged-scan MAE | CF SSIM "
          "| null SSIM |", "|---|---|---|---|---|---|---|"]
    for n in names:
        q = res[n]["queries"].values()
        cf = np.mean([x["cf"]["mae"] for x in q])
        nu = np.mean([x["null_abduction"]["mae"] for x in q])
        un = np.mean([x["unchanged"]["mae"] for x in q])
        L.append(f"| {n} | {cf:.4f} | {nu:.4f} | {cf / nu:.2f} {'met' if cf / nu <= 0.5 else 'MISSED'} | "
                 f"{un:.4f} | {np.mean([x['cf']['ssim'] for x in q]):.3f} | "
                 f"{np.mean([x['null_abduction']['ssim'] for x in q]):.3f} |")
    if "hvae" in res and "cvae" in res:
        h = np.mean([x["cf"]["mae"] for x in res["hvae"]["queries"].values()])
        c = np.mean([x["cf"]["mae"] for x in res["cvae"]["queries"].values()])
        L += ["", f"hvae CF MAE below cvae's (target): {'met' if h < c else 'MISSED'} ({h:.4f} vs {c:.4f})."]
    L += ["", "## Per query: CF MAE (null-abduction MAE); unchanged-scan MAE", "",
          "| query | " + " | ".join(names) + " | unchanged |", "|---|" + "---|" * (len(names) + 1)]
    for q, row in next(iter(res.values()))["queries"].items():
        L.append(f"| {q} | " + " | ".join(f"{res[n]['queries'][q]['cf']['mae']:.4f} "
                                           f"({res[n]['queries'][q]['null_abduction']['mae']:.4f})"
                                           for n in names) + f" | {row['unchanged']['mae']:.4f} |")
    L += ["", "## Oracle effectiveness: BrainMRI.measure() on the CF scans vs the true CF volumes (MAE, mL)", "",
          "Next to it: measure() on the true CF scans (the oracle's own error) and the mean true change.", "",
          "| query | volume | " + " | ".join(names) + " | true scan | mean change |",
          "|---|---|" + "---|" * len(names) + "---|---|"]
    first = next(iter(res.values()))["queries"]
    for q, row in first.items():
        for v, o in row["oracle"].items():
            L.append(f"| {q} | {v} | " + " | ".join(f"{res[n]['queries'][q]['oracle'][v]['cf_mae_ml']:.2f}"
                                                 for n in names)
                     + f" | {o['true_scan_mae_ml']:.2f} | {o['mean_abs_change_ml']:.2f} |")
    L += ["", "## Effectiveness by the anti-causal predictor on the CF scans", "",
          "Continuous: MAE in the variable's units; scanner: accuracy. The predictor's own error on real "
          "held-out scans: " + ", ".join(f"{k} {_fmt(next(iter(v.values())), 3)}"
                                         for k, v in s["predictor_test_quality"].items()) + ".", "",
          "| query | target | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for q in first:
        for k in first[q]["effectiveness"]:
            L.append(f"| {q} | {k} | " + " | ".join(
                _fmt(next(iter(res[n]["queries"][q]["effectiveness"][k].values())), 3) for n in names) + " |")
    L += ["", "## Soundness, realism, speed", "",
          "| mechanism | composition 1 | composition 10 | 10 / 1 (target <= 2) | decoder-mean comp. 1 | "
          "decoder-mean comp. 10 | 10 / 1 | reversibility 1 / 3 cycles | FID (predictor features) | "
          "train img/s | CF ms/patient (target < 50) |", "|---" * 11 + "|"]
    for n in names:
        r = res[n]
        c, cm, rv = r["composition"], r["composition_decoder_mean"], r["reversibility"]
        ratio = c[9] / c[0] if c[0] > 0 else float("nan")
        ratio_m = cm[9] / cm[0] if cm[0] > 0 else float("nan")
        L.append(f"| {n} | {c[0]:.2e} | {c[9]:.2e} | {ratio:.1f} {'met' if ratio <= 2 else 'MISSED'} | "
                 f"{cm[0]:.4f} | {cm[9]:.4f} | {ratio_m:.2f} {'met' if ratio_m <= 2 else 'MISSED'} | "
                 f"{rv[0]:.4f} / {rv[2]:.4f} | {r['fid_samples_vs_real']:.3g} | {r['train_images_per_s']:.1f} | "
                 f"{r['cf_ms_per_patient']:.1f} {'met' if r['cf_ms_per_patient'] < 50 else 'MISSED'} |")
    L += ["", "Composition with the pixel noise abducted is exact up to float32 rounding (largest pixel error "
          "of one null intervention: " + ", ".join(f"{n} {res[n]['null_max_abs_error']:.1e}" for n in names)
          + "), so its 10/1 ratio compares rounding errors; the decoder-mean columns measure the VAE itself "
          "(the setting of Ribeiro et al.).", ""]
    return "\n".join(L)


if __name__ == "__main__":
    main()
