"""``hvae`` vs ``cvae`` (vs ``image-diffusion``) counterfactual brain scans against the ground truth, in one run.

Protocol (fixed; the same for every mechanism):

- cohort: ``medcausal.synthetic.BrainMRI`` axial slices (64x64 by default); ``--n-train``
  training patients (seed 0) and ``--n-test`` held-out patients (seed 1);
- the image mechanism alone is trained on the training scans given their true parents
  (``scanner`` one-hot, ``icv``, ``brain_volume``, ``ventricle_volume``, ``lesion_load``
  standardized: the codecs ``CausalModel`` uses), with the one training loop
  (``medcausal.train.train``), the same ``--steps``, batch size and learning rate for both VAEs;
  ``image-diffusion`` gets ``--diffusion-train-steps`` (default ``--steps``) and its own
  documented learning rate (``image_diffusion.TRAIN_SETTINGS``, 1e-3; ``--diffusion-lr``),
  at the query knobs of its hyperparameters (default: 20 DDIM steps here, full depth,
  guidance 1); its ``reconstruct`` *is* the null counterfactual (a DDIM round trip), so its
  "decoder-mean" composition is the composition itself (reported, not recomputed);
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
  MAE of each continuous parent (in the variable's units, e.g. mL) and scanner accuracy;
- composition: L1 after 1 and 10 null interventions (the mechanism's counterfactual, pixel
  noise included; and the decoder mean, i.e. the VAE alone, as in Ribeiro et al.);
  reversibility: L1 after 1..3 cycles of do(age + 20) then undo;
  (``--soundness-n``: on the first k held-out patients only, the same k for every mechanism);
- realism: Fréchet distance between predictor features (its penultimate layer) of fresh
  samples under the held-out patients' parents and the held-out real scans (with
  ``--n-realism N``: N further patients, seed + 3, so that the distance is not read off a
  handful of scans; next to it the distance between those real scans and N more real ones,
  seed + 4: the estimator's floor at that N);
- CLD (``medcausal.metrics.counterfactual_latent_divergence``, Sanchez & Tsaftaris) of the
  binary flips (disease, sex) with the predictor's penultimate features as the encoder and
  a third set of ``--n-ref`` held-out real scans (seed + 2) with their classes as the
  reference; next to the CLD of the true counterfactual scans and of the unchanged scans;
- training images/s and seconds, and counterfactual ms/patient (abduction + prediction,
  batches of 64), wall clock and this process's CPU time (the machine may be shared);
- ``--finetune-steps N``: each VAE is scored again after N steps of counterfactual fine-tuning
  (Ribeiro et al. 2023, Sec. 3.4; ``finetune_counterfactual``, counterfactual parents drawn by
  shuffling the rows) against a second anti-causal predictor (seed + 5) fitted on the parents as
  the mechanism sees them, so the scores' predictor is not the one optimized; reported as
  ``NAME-cft``. Measured at 32x32, 3000 + 1000 steps (``brain_counterfactuals_32_3000_cft.md``):
  it raised the true-counterfactual MAE of both VAEs (hvae 0.0152 -> 0.0170, cvae 0.0150 ->
  0.0164) while the scoring predictor read the scans a little better (age+20 brain volume
  MAE 75.6 -> 68.5 and 79.1 -> 72.9): the fine-tuning moves the scans toward what a
  predictor reads, not toward the true counterfactual;
- ``--sweep depth,guidance ...``: the image-diffusion knobs re-queried on the same trained
  model (first ``--sweep-n`` held-out patients): CF MAE, oracle effectiveness, CLD.

    python benchmarks/brain_counterfactuals.py                 # full run (~15 min on 2 cores)
    python benchmarks/brain_counterfactuals.py --quick         # smoke run (~1 min)
    python benchmarks/brain_counterfactuals.py --models hvae hvae-mediator   # latents as mediators
    python benchmarks/brain_counterfactuals.py --models hvae hvae-decoder-scale   # sigma(z, pa) from the decoder
    python benchmarks/brain_counterfactuals.py --size 32 --models hvae cvae image-diffusion \
        --n-test 40 --soundness-n 16 --sweep 1,1 0.6,1 1,2 0.6,2 --stem brain_counterfactuals_32
    python benchmarks/brain_counterfactuals.py ... --seed 1 --stem run_seed1   # the same protocol, new draw
    python benchmarks/brain_counterfactuals.py --summarize results/run.json results/run_seed1.json \
        --stem run_seeds       # means, sds and paired differences over the runs (nothing trained)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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
from medcausal.mechanisms import image_diffusion as _idiff  # registers "image-diffusion"
from medcausal.metrics import images as im
from medcausal.metrics.predictors import AntiCausalPredictor
from medcausal.synthetic.brain import SCANNERS, BrainMRI
from medcausal.train import forked_rng

RESULTS = Path(__file__).parent / "results"
VOLUMES = ("icv", "brain_volume", "ventricle_volume", "lesion_load")


def _next_scanner(s):
    order = list(SCANNERS)
    return np.array([order[(order.index(v) + 1) % len(order)] for v in s], dtype=object)


#: --models choices: name -> (registered mechanism, hyperparameters); the defaults otherwise.
MODELS = {"hvae": ("hvae", {}), "cvae": ("cvae", {}),
          # the paper's ladder without the pose warp (hvae's default before session 26)
          "hvae-plain": ("hvae", {"pose_warp": False}),
          "hvae-mediator": ("hvae", {"latent_mode": "mediator", "mediator_abduction": "prior"}),
          "hvae-decoder-scale": ("hvae", {"pixel_scale": "decoder"}),
          "hvae-mediator-mixture": ("hvae", {"latent_mode": "mediator", "mediator_abduction": "mixture",
                                             "alpha": 0.5}),
          # 20 DDIM steps (the fewest its reconstruction tolerance allows): the CPU setting; the
          # mechanism's other defaults (channels [32, 64, 64], full depth, guidance 1, cfg 0.1).
          "image-diffusion": ("image-diffusion", {"steps": 20})}

#: binary flips scored by CLD: query -> the flipped variable (its classes)
CLD_QUERIES = {"disease flip": "disease", "sex flip": "sex"}

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
    out, t0, c0 = [], time.perf_counter(), time.process_time()
    with torch.no_grad():
        for s in range(0, len(x), batch):
            out.append(mech.counterfactual(x[s:s + batch], pa[s:s + batch], pa_cf[s:s + batch]))
    return (torch.cat(out), (time.perf_counter() - t0) / len(x) * 1000.0,
            (time.process_time() - c0) / len(x) * 1000.0)


def score_query(mech, sim, test, true, encode, predictor, pred_targets, ref_feats, cld_var, seed, fresh=True):
    """One query on the patients of ``test`` (true counterfactuals ``true``): the metrics of one row."""
    x_test, pa_test = torch.from_numpy(test.arrays["mri"]), encode(test)
    pa_cf = encode(true)
    x_true = true.arrays["mri"]
    cf, ms_q, cpu_ms_q = timed_counterfactual(mech, x_test, pa_test, pa_cf)
    cf_np = cf.numpy()
    row = {"cf": im.true_counterfactual_error(cf_np, x_true, data_range=1.0),
           "unchanged": im.true_counterfactual_error(x_test.numpy(), x_true, data_range=1.0),
           "cf_ms_per_patient": ms_q, "cf_cpu_ms_per_patient": cpu_ms_q}
    if fresh:
        with torch.no_grad():
            fresh_np = mech.sample(pa_cf, generator=torch.Generator().manual_seed(seed)).numpy()
        row["null_abduction"] = im.true_counterfactual_error(fresh_np, x_true, data_range=1.0)
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
    if cld_var is not None:
        f_ref, ref = ref_feats
        row["cld"] = im.counterfactual_latent_divergence(
            predictor.features(x_test.numpy()), predictor.features(cf_np), test.table[cld_var].to_numpy(),
            true.table[cld_var].to_numpy(), f_ref, ref.table[cld_var].to_numpy())
    return row


def pose_readout(mech, sim, test, x_test, pa_test) -> dict:
    """Whether a pose-warped hvae's latents carry the scan's pose: the 5-fold cross-validated R^2
    of each true pose parameter (the simulator's rotation and shifts, standard normal) from a linear
    read-out of the top latent the model abducts."""
    from scipy.special import ndtri
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import cross_val_predict

    with torch.no_grad():
        z = torch.cat([mech.latents(pa_test[s:s + 64], mech.abduct(x_test[s:s + 64], pa_test[s:s + 64]))[0]
                       for s in range(0, len(x_test), 64)]).mean(dim=(2, 3)).numpy()
    pose = ndtri(sim.noise(test).arrays["mri_params"][:, :sim.n_pose_params].astype(np.float64))
    names = ["rotation"] + [f"shift {i + 1}" for i in range(pose.shape[1] - 1)] if pose.shape[1] == 3 \
        else [f"pose {i + 1}" for i in range(pose.shape[1])]
    out = {}
    for j, n in enumerate(names):
        pred = cross_val_predict(LinearRegression(), z, pose[:, j], cv=5)
        out[n] = float(1.0 - ((pose[:, j] - pred) ** 2).mean() / pose[:, j].var())
    return out


def evaluate(name, mech, sim, test, x_test, pa_test, encode, truths, predictor, pred_targets, seed,
             ref_feats=None, soundness_n=None, reconstruct_is_null=False, realism=None):
    res = {"queries": {}}
    ms, cpu_ms = [], []
    for q, true in truths.items():
        log(f"  {name}: query {q}")
        row = score_query(mech, sim, test, true, encode, predictor, pred_targets, ref_feats,
                          CLD_QUERIES.get(q) if ref_feats is not None else None, seed)
        ms.append(row["cf_ms_per_patient"])
        cpu_ms.append(row["cf_cpu_ms_per_patient"])
        res["queries"][q] = row
    res["cf_ms_per_patient"] = float(np.median(ms))
    res["cf_cpu_ms_per_patient"] = float(np.median(cpu_ms))
    k = len(x_test) if soundness_n is None else min(int(soundness_n), len(x_test))
    res["soundness_n"] = k
    xs, ps = x_test[:k], pa_test[:k]
    log(f"  {name}: composition / reversibility on {k} patients")
    with torch.no_grad():
        res["null_max_abs_error"] = float((mech.counterfactual(xs, ps, ps) - xs).abs().max())
        null = lambda x: mech.counterfactual(x, ps, ps)  # noqa: E731
        res["composition"] = im.composition(null, xs, steps=10).l1
        if reconstruct_is_null:
            # reconstruct() is the null counterfactual itself (deterministic): the same curve
            res["composition_decoder_mean"] = list(res["composition"])
            res["composition_decoder_mean_is_composition"] = True
        else:
            mean_null = lambda x: mech.reconstruct(x, ps)  # noqa: E731
            res["composition_decoder_mean"] = im.composition(mean_null, xs, steps=10).l1
        pa_age = encode(truths["age+20"])[:k]
        do = lambda x: mech.counterfactual(x, ps, pa_age)  # noqa: E731
        undo = lambda x: mech.counterfactual(x, pa_age, ps)  # noqa: E731
        res["reversibility"] = im.reversibility(do, undo, xs, cycles=3).l1
        x_real, pa_real = (x_test, pa_test) if realism is None else realism
        log(f"  {name}: realism on {len(x_real)} fresh samples")
        gen = mech.sample(pa_real, generator=torch.Generator().manual_seed(seed + 1)).numpy()
    if hasattr(mech, "latent_kl"):  # the VAEs: do their latents carry anything of the scan?
        with forked_rng(seed=seed):
            kl = torch.cat([mech.latent_kl(x_test[s:s + 64], pa_test[s:s + 64]) for s in range(0, len(x_test), 64)])
        res["latent_kl_nats"] = kl.mean(0).tolist()
    if getattr(getattr(mech, "net", None), "pose_logscale", None) is not None:
        log(f"  {name}: reading the pose out of its top latent")
        res["pose_readout_r2"] = pose_readout(mech, sim, test, x_test, pa_test)
    res["fid_samples_vs_real"] = im.feature_frechet_distance(x_real.numpy(), gen, predictor.features)
    res["realism_n"] = len(x_real)
    return res


def knob_sweep(mech, settings, sim, test, encode, truths, predictor, pred_targets, ref_feats, seed, n, queries):
    """image-diffusion's depth and guidance re-queried on the same trained model (first n patients)."""
    sub = test[:n]
    keep = (mech.depth, mech.guidance)
    out = []
    try:
        for depth, guidance in settings:
            mech.set_knobs(depth=depth, guidance=guidance)
            rec = {"depth": depth, "guidance": guidance, "n": len(sub), "queries": {}}
            for q in queries:
                log(f"  sweep depth {depth} guidance {guidance}: {q}")
                rec["queries"][q] = score_query(mech, sim, sub, truths[q][:n], encode, predictor, pred_targets,
                                                ref_feats, CLD_QUERIES.get(q), seed, fresh=False)
            out.append(rec)
    finally:
        mech.set_knobs(depth=keep[0], guidance=keep[1])
    return out


def finetuning_predictor(x_train, pa_train, parent_dims, pred_targets, size, seed, max_epochs):
    """The frozen anti-causal predictor of counterfactual fine-tuning: trained on the training scans
    against their parents *as the mechanism sees them* (standardized volumes, scanner index), the
    layout ``parent_nll`` reads; its own seed, so the scores' predictor is not the one optimized."""
    values, start = {}, 0
    for k, w in parent_dims.items():
        block = pa_train[:, start:start + w]
        values[k] = block.argmax(1).numpy() if w > 1 else block[:, 0].numpy().astype(float)
        start += w
    torch.manual_seed(seed)
    guide = AntiCausalPredictor((1, size, size), {k: pred_targets[k] for k in parent_dims})
    return guide.fit(x_train, values, max_epochs=max_epochs, seed=seed, verbose=False)


def _predictor_values(cohort, encode, k):
    if k == "scanner":
        return np.array([list(SCANNERS).index(s) for s in cohort.table["scanner"]])
    return cohort.table[k].to_numpy(dtype=float)


def _settings(text):
    depth, guidance = (float(v) for v in text.split(","))
    return depth, guidance


def _write(summary, out, stem, final=True):
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / f"{stem}.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1, default=float))
    md = render_markdown(summary)
    with atomic_write(out / f"{stem}.md") as tmp:
        Path(tmp).write_text(md)
    return md


def main(argv=None, command: str | None = None):
    """``command``: what to record as the command of the run (a wrapper script's own)."""
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
    ap.add_argument("--stem", default=None, help="result file name (default brain_counterfactuals[_quick])")
    ap.add_argument("--n-ref", type=int, default=200, help="held-out reference scans (seed + 2) for CLD")
    ap.add_argument("--n-realism", type=int, default=None,
                    help="realism on this many further patients (seed + 3) instead of the held-out set")
    ap.add_argument("--soundness-n", type=int, default=None,
                    help="composition/reversibility on the first k held-out patients (default all)")
    ap.add_argument("--hvae-hparams", type=json.loads, default=None,
                    help="hyperparameters of the hvae models, as JSON, over their defaults")
    ap.add_argument("--cvae-hparams", type=json.loads, default=None,
                    help="hyperparameters of the cvae model, as JSON, over its defaults")
    ap.add_argument("--finetune-steps", type=int, default=0,
                    help="after training, also score each VAE after this many steps of counterfactual "
                         "fine-tuning (reported as NAME-cft; 0: off)")
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--finetune-slack", type=float, default=0.01,
                    help="the fine-tuning's allowed relative rise of the negative ELBO")
    ap.add_argument("--diffusion-train-steps", type=int, default=None, help="image-diffusion steps (default --steps)")
    ap.add_argument("--diffusion-lr", type=float, default=None,
                    help="image-diffusion learning rate (default its TRAIN_SETTINGS lr)")
    ap.add_argument("--diffusion-hparams", type=json.loads, default=None,
                    help="image-diffusion hyperparameters (JSON), replacing MODELS' entry")
    ap.add_argument("--sweep", type=_settings, nargs="*", default=[], metavar="DEPTH,GUIDANCE",
                    help="image-diffusion knob settings re-queried on the same trained model")
    ap.add_argument("--sweep-n", type=int, default=None, help="patients in the sweep (default all held-out)")
    ap.add_argument("--sweep-queries", nargs="+", default=None, choices=sorted(QUERIES))
    ap.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="JSON",
                    help="no training: means and paired differences over these runs' result files "
                         "(the same protocol at different --seed); written to --stem (default "
                         "brain_counterfactuals_seeds)")
    args = ap.parse_args(argv)
    if args.summarize:
        command = "python benchmarks/brain_counterfactuals.py " + shlex.join(
            argv if argv is not None else sys.argv[1:])
        md = summarize_main(args.summarize, args.out, args.stem or "brain_counterfactuals_seeds", command)
        print(md)
        return None
    if args.n_realism is not None and args.n_realism < 2:
        ap.error(f"--n-realism must be at least 2 (a Fréchet distance needs two rows), got {args.n_realism}")
    if args.quick:
        args.size, args.n_train, args.n_test, args.steps = 32, 200, 40, 30
    if args.diffusion_hparams is not None:
        MODELS["image-diffusion"] = ("image-diffusion", dict(args.diffusion_hparams))
    torch.set_num_threads(args.threads)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    command = (f"{env} " if env else "") + (command or "python benchmarks/brain_counterfactuals.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]))
    stem = args.stem or ("brain_counterfactuals" + ("_quick" if args.quick else ""))
    load_start = os.getloadavg()
    t_all, cpu_all = time.perf_counter(), time.process_time()
    warnings.simplefilter("ignore", OutOfSupportWarning)

    sim = BrainMRI(shape=(args.size, args.size))
    log(f"rendering {args.n_train} + {args.n_test} + {args.n_ref} patients and {len(QUERIES)} counterfactual sets")
    t0 = time.perf_counter()
    train = sim.sample(args.n_train, seed=args.seed)
    test = sim.sample(args.n_test, seed=args.seed + 1)
    ref = sim.sample(args.n_ref, seed=args.seed + 2) if args.n_ref else None
    truths = {q: sim.counterfactual(test, do=do) for q, do in QUERIES.items()}
    realism = None
    if args.n_realism:
        real, real2 = sim.sample(args.n_realism, seed=args.seed + 3), sim.sample(args.n_realism, seed=args.seed + 4)
    sim_seconds = time.perf_counter() - t0
    encode, parent_dims = parent_encoder(sim, train)
    x_train, pa_train = torch.from_numpy(train.arrays["mri"]), encode(train)
    x_test, pa_test = torch.from_numpy(test.arrays["mri"]), encode(test)
    if args.n_realism:
        realism = (torch.from_numpy(real.arrays["mri"]), encode(real))

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

    guide = None
    if args.finetune_steps:
        log("training the fine-tuning predictor (a second one: the scores use the first)")
        guide = finetuning_predictor(x_train, pa_train, parent_dims, pred_targets, args.size,
                                     seed=args.seed + 5, max_epochs=3 if args.quick else 10)

    fid_floor = (im.feature_frechet_distance(real.arrays["mri"], real2.arrays["mri"], predictor.features)
                 if args.n_realism else None)
    ref_feats, cld_baselines = None, {}
    if ref is not None:
        f_ref = predictor.features(ref.arrays["mri"])
        ref_feats = (f_ref, ref)
        f_test = predictor.features(x_test.numpy())
        for q, var in CLD_QUERIES.items():
            true = truths[q]
            cls, cls_cf, cls_ref = (c.table[var].to_numpy() for c in (test, true, ref))
            cld_baselines[q] = {
                "variable": var,
                "true_scan": im.counterfactual_latent_divergence(
                    f_test, predictor.features(true.arrays["mri"]), cls, cls_cf, f_ref, cls_ref),
                "unchanged": im.counterfactual_latent_divergence(f_test, f_test, cls, cls_cf, f_ref, cls_ref),
                "reference_class_counts": {str(k): int(v) for k, v in
                                           pd.Series(cls_ref).value_counts().sort_index().items()}}

    summary = {"command": command, "protocol": __doc__, "seed": args.seed, "size": args.size,
               "n_train": args.n_train, "n_test": args.n_test, "n_ref": args.n_ref, "steps": args.steps,
               "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
               "machine": platform.platform(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "load_average_start": load_start, "simulator_seconds": sim_seconds,
               "predictor_seconds": predictor_seconds, "predictor_test_quality": predictor_quality,
               "cld_baselines": cld_baselines, "n_realism": args.n_realism, "fid_real_vs_real": fid_floor,
               "results": {}, "complete": False}
    results = summary["results"]
    for name in args.models:
        torch.manual_seed(args.seed)
        kind, hparams = MODELS[name]
        hparams = {**hparams, **({"hvae": args.hvae_hparams, "cvae": args.cvae_hparams}.get(kind) or {})}
        try:
            mech = registry.get(kind)(sim.graph.variables["mri"], parent_dims, **hparams)
        except TypeError as e:  # e.g. a misspelt --hvae-hparams key
            raise SystemExit(f"model {name!r} with settings {hparams}: {e}") from None
        steps, lr = args.steps, args.lr
        if kind == "image-diffusion":
            steps = args.diffusion_train_steps or args.steps
            lr = args.diffusion_lr or _idiff.TRAIN_SETTINGS["lr"]
        log(f"training {name}: {steps} steps, lr {lr}")
        t0, c0 = time.perf_counter(), time.process_time()
        fit = mech.fit(x_train, pa_train, max_steps=steps, max_epochs=10 ** 6, batch_size=args.batch_size,
                       lr=lr, patience=10 ** 6, seed=args.seed, verbose=None)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        mech.eval()
        log(f"evaluating {name} (trained {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU)")

        def score(label, steps, seconds, cpu_seconds, **extra):
            """Evaluate the mechanism as it is now, record it under ``label``, write the partial results."""
            t0 = time.perf_counter()
            r = evaluate(label, mech, sim, test, x_test, pa_test, encode, truths, predictor, pred_targets,
                         args.seed, ref_feats=ref_feats, soundness_n=args.soundness_n,
                         reconstruct_is_null=(kind == "image-diffusion"), realism=realism)
            r.update({"train_seconds": seconds, "train_cpu_seconds": cpu_seconds, "steps": steps, "lr": lr,
                      "best_val_loss_nats": fit.best_val_loss, "train_images_per_s": steps * args.batch_size / seconds,
                      "rolled_back": fit.rolled_back, "skipped_batches": fit.skipped_batches,
                      "eval_seconds": time.perf_counter() - t0,
                      "parameters": sum(p.numel() for p in mech.net.parameters()), "hparams": mech.hparams, **extra})
            results[label] = r
            log(f"{label}: CF MAE {_query_mean(r):.4f}")
            summary.update(load_average=os.getloadavg(), total_seconds=time.perf_counter() - t_all,
                           total_cpu_seconds=time.process_time() - cpu_all)
            _write(summary, args.out, stem)  # partial results survive an interrupted run
            return r

        r = score(name, fit.steps, seconds, cpu_seconds)
        if guide is not None and kind in ("hvae", "cvae"):
            log(f"counterfactual fine-tuning of {name}: {args.finetune_steps} steps, lr {args.finetune_lr}")
            t0, c0 = time.perf_counter(), time.process_time()
            tuned = mech.finetune_counterfactual(x_train, pa_train, guide.parent_nll, elbo_slack=args.finetune_slack,
                                                 max_steps=args.finetune_steps, batch_size=args.batch_size,
                                                 lr=args.finetune_lr, seed=args.seed, verbose=None)
            ft_seconds, ft_cpu = time.perf_counter() - t0, time.process_time() - c0
            score(f"{name}-cft", fit.steps + tuned.steps, seconds + ft_seconds, cpu_seconds + ft_cpu,
                  finetune_steps=tuned.steps, finetune_lr=args.finetune_lr, finetune_seconds=ft_seconds,
                  finetune_cpu_seconds=ft_cpu, elbo_target_nats=tuned.elbo_target,
                  lagrange_multiplier=tuned.lagrange_multiplier)
        if kind == "image-diffusion" and args.sweep:
            n = args.sweep_n or args.n_test
            queries = args.sweep_queries or list(QUERIES)
            log(f"sweeping {name}'s knobs {args.sweep} on {n} patients, queries {queries}")
            r["sweep"] = []
            for setting in args.sweep:
                r["sweep"] += knob_sweep(mech, [setting], sim, test, encode, truths, predictor, pred_targets,
                                         ref_feats, args.seed, n, queries)
                summary.update(load_average=os.getloadavg(), total_seconds=time.perf_counter() - t_all,
                               total_cpu_seconds=time.process_time() - cpu_all)
                _write(summary, args.out, stem)

    summary.update(complete=True, load_average=os.getloadavg(), total_seconds=time.perf_counter() - t_all,
                   total_cpu_seconds=time.process_time() - cpu_all)
    md = _write(summary, args.out, stem)
    print(md)
    return summary


def _query_mean(r: dict, baseline: str = "cf", metric: str = "mae") -> float:
    """A mechanism's ``baseline`` (cf / null_abduction / unchanged) ``metric`` averaged over the queries."""
    return float(np.mean([q[baseline][metric] for q in r["queries"].values()]))


def _fmt(v, nd=4):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}g}"


def render_markdown(s: dict) -> str:
    res = s["results"]
    names = list(res)
    load_end = s.get("load_average", s.get("load_average_start", ()))
    load_start = s.get("load_average_start")
    per_model = "; ".join(f"{n}: {res[n]['steps']} steps, lr {res[n].get('lr', s['lr']):g}" for n in names)
    L = [f"# Counterfactual brain scans: {' vs '.join(names)}", "",
         f"Command: `{s['command']}`  ", f"BrainMRI {s['size']}x{s['size']}, {s['n_train']} training / "
         f"{s['n_test']} held-out patients; batch {s['batch_size']}; {per_model}; "
         f"{s['threads']} torch threads on {s['cpu_count']} CPUs (load average "
         + (f"at the start {', '.join(f'{x:.1f}' for x in load_start)}, " if load_start else "")
         + f"at the end {', '.join(f'{x:.1f}' for x in load_end)}: timings taken on a shared machine are "
         f"inflated by the load; CPU times are this process's). Total {s.get('total_seconds', float('nan')) / 60:.1f} min"
         + (f" wall, {s['total_cpu_seconds'] / 60:.1f} min CPU" if "total_cpu_seconds" in s else "") + "."
         + ("" if s.get("complete", True) else " **Run incomplete: partial results.**"), ""]
    if any("rolled_back" in res[n] for n in names):
        L += ["Training loop's spike guard: " + "; ".join(
            f"{n} undid {res[n].get('rolled_back', 0)} update(s) and skipped {res[n].get('skipped_batches', 0)} "
            f"batch(es)" for n in names) + ".", ""]
    for n in names:
        if "image-diffusion" in n or "guidance" in res[n].get("hparams", {}):
            hp = res[n]["hparams"]
            L += [f"{n}: {hp.get('steps')} DDIM steps, depth {hp.get('depth')}, guidance {hp.get('guidance')}, "
                  f"channels {hp.get('channels')}, T {hp.get('num_train_timesteps')}, cfg_dropout "
                  f"{hp.get('cfg_dropout')}, inversion_iters {hp.get('inversion_iters')}, "
                  f"semantic_dim {hp.get('semantic_dim')}.", ""]
    L += ["## True-counterfactual error (held-out patients, mean over the queries)", "",
          "| mechanism | CF MAE | null-abduction MAE | CF / null (target <= 0.5) | unchanged-scan MAE | CF SSIM "
          "| null SSIM |", "|---|---|---|---|---|---|---|"]
    for n in names:
        r = res[n]
        cf, nu, un = (_query_mean(r, b) for b in ("cf", "null_abduction", "unchanged"))
        L.append(f"| {n} | {cf:.4f} | {nu:.4f} | {cf / nu:.2f} {'met' if cf / nu <= 0.5 else 'MISSED'} | "
                 f"{un:.4f} | {_query_mean(r, 'cf', 'ssim'):.3f} | {_query_mean(r, 'null_abduction', 'ssim'):.3f} |")
    for hv, cv in (("hvae", "cvae"), ("hvae-cft", "cvae-cft")):
        if hv in res and cv in res:
            h, c = _query_mean(res[hv]), _query_mean(res[cv])
            L += ["", f"{hv} CF MAE below {cv}'s (target): {'met' if h < c else 'MISSED'} ({h:.4f} vs {c:.4f})."]
    for n in names:
        if n != "hvae" and "hvae" in res and "guidance" in res[n].get("hparams", {}):
            h, d = _query_mean(res["hvae"]), _query_mean(res[n])
            fh, fd = res["hvae"]["fid_samples_vs_real"], res[n]["fid_samples_vs_real"]
            L += ["", f"{n} CF MAE at least as good as hvae's (target): {'met' if d <= h else 'MISSED'} "
                  f"({d:.4f} vs {h:.4f}); realism (FID) at least as good as hvae's (target): "
                  f"{'met' if fd <= fh else 'MISSED'} ({fd:.3g} vs {fh:.3g})."]
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
    realism_n = sorted({res[n].get("realism_n", s["n_test"]) for n in names})
    L += ["", f"FID on {', '.join(map(str, realism_n))} fresh samples against as many real scans"
          + (f" (further patients, seed + 3); between those real scans and as many other real ones: "
             f"{s['fid_real_vs_real']:.3g}, the estimator's floor at this sample size." if s.get("fid_real_vs_real")
             is not None else " (the held-out patients).")]
    ks = sorted({res[n].get("soundness_n", s["n_test"]) for n in names})
    L += ["", f"Composition and reversibility on the first {', '.join(map(str, ks))} held-out patients. "
          "Largest pixel error of one null intervention: "
          + ", ".join(f"{n} {res[n]['null_max_abs_error']:.1e}" for n in names)
          + ". For the VAEs (exact abduction of the pixel noise) composition is exact up to float32 rounding, so "
          "its 10/1 ratio compares rounding errors, and the decoder-mean columns measure the VAE itself (the "
          "setting of Ribeiro et al.). image-diffusion's abduction is deterministic-approximate (DDIM inversion by "
          "fixed-point iteration; stated tolerance 5e-3): its composition error is the inversion error, and its "
          "reconstruct() is the same null counterfactual, so its decoder-mean columns repeat its composition.", ""]
    kl_names = [n for n in names if res[n].get("latent_kl_nats") is not None]
    if kl_names:
        L += ["## Latent use", "",
              "The ELBO's KL term per latent group on the held-out scans (nats per image; hvae: one per latent "
              "level, coarsest first; cvae: its one code). About 0 means the group is unused (posterior "
              "collapse): the scan's own detail then reaches a counterfactual only through the pixel noise, and "
              "the counterfactual change is the decoder mean's, mu(pa*) - mu(pa), the same for every patient "
              "with the same parents.", "", "| mechanism | KL per group | total |", "|---|---|---|"]
        for n in kl_names:
            kl = res[n]["latent_kl_nats"]
            L.append(f"| {n} | {' / '.join(f'{v:.3g}' for v in kl)} | {sum(kl):.3g} |")
        L.append("")
        posed = [n for n in names if "pose_readout_r2" in res[n]]
        if posed:
            keys = list(res[posed[0]]["pose_readout_r2"])
            L += ["What the pose warp's latents carry: the 5-fold cross-validated R^2 of the simulator's true "
                  "pose (standard-normal rotation and shifts) from a linear read-out of the abducted top latent "
                  "(held-out patients; 1: the pose is known, 0: nothing of it).", "",
                  "| mechanism | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            for n in posed:
                L.append(f"| {n} | " + " | ".join(f"{res[n]['pose_readout_r2'][k]:.3f}" for k in keys) + " |")
            L.append("")
    L += ["## Time", "",
          "| mechanism | steps | lr | train s (wall) | train s (CPU) | train img/s | CF ms/patient (wall) | "
          "CF ms/patient (CPU) | evaluation s (wall) | parameters |", "|---" * 10 + "|"]
    for n in names:
        r = res[n]
        L.append(f"| {n} | {r['steps']} | {r.get('lr', s['lr']):g} | {r['train_seconds']:.0f} | "
                 f"{r.get('train_cpu_seconds', float('nan')):.0f} | {r['train_images_per_s']:.1f} | "
                 f"{r['cf_ms_per_patient']:.1f} | {r.get('cf_cpu_ms_per_patient', float('nan')):.1f} | "
                 f"{r.get('eval_seconds', float('nan')):.0f} | {r['parameters']} |")
    cldb = s.get("cld_baselines") or {}
    if cldb:
        L += ["", "## CLD (counterfactual latent divergence; lower is better, range [log 2 = 0.693, 1.693])", "",
              f"Encoder: the anti-causal predictor's penultimate features; reference: {s.get('n_ref')} further "
              "held-out real scans (seed + 2) with their classes ("
              + "; ".join(f"{b['variable']} {b['reference_class_counts']}" for b in cldb.values()) + ").", "",
              "| query | " + " | ".join(names) + " | true CF scan | unchanged scan |", "|---|" + "---|" * (len(names) + 2)]
        for q, b in cldb.items():
            L.append(f"| {q} | " + " | ".join(_fmt(res[n]["queries"][q].get("cld"), 4) for n in names)
                     + f" | {b['true_scan']:.4f} | {b['unchanged']:.4f} |")
    for n in names:
        sw = res[n].get("sweep")
        if not sw:
            continue
        qs = list(sw[0]["queries"])
        L += ["", f"## {n}: depth / guidance sweep on the same trained model (first {sw[0]['n']} held-out patients)",
              "", "CF MAE per query (mean over the queries last); oracle effectiveness: MAE (mL) of measure() on "
              "the CF scans vs the true CF volume, for the volumes the query changes; CLD for the flips; CF "
              "ms/patient (wall / CPU, median over the queries).", "",
              "| depth | guidance | " + " | ".join(f"CF MAE {q}" for q in qs) + " | CF MAE mean | "
              + " | ".join(f"oracle {q}: {v}" for q in qs for v in sw[0]["queries"][q]["oracle"])
              + " | " + " | ".join(f"CLD {q}" for q in qs if "cld" in sw[0]["queries"][q]) + " | ms/patient |",
              "|---|---|" + "---|" * (len(qs) + 1 + sum(len(sw[0]["queries"][q]["oracle"]) for q in qs)
                                     + sum("cld" in sw[0]["queries"][q] for q in qs) + 1)]
        for rec in sw:
            rq = rec["queries"]
            L.append(f"| {rec['depth']:g} | {rec['guidance']:g} | "
                     + " | ".join(f"{rq[q]['cf']['mae']:.4f}" for q in qs)
                     + f" | {np.mean([rq[q]['cf']['mae'] for q in qs]):.4f} | "
                     + " | ".join(f"{rq[q]['oracle'][v]['cf_mae_ml']:.2f}" for q in qs for v in rq[q]["oracle"])
                     + " | " + " | ".join(f"{rq[q]['cld']:.4f}" for q in qs if "cld" in rq[q])
                     + f" | {np.median([rq[q]['cf_ms_per_patient'] for q in qs]):.0f} / "
                       f"{np.median([rq[q]['cf_cpu_ms_per_patient'] for q in qs]):.0f} |")
    L.append("")
    return "\n".join(L)


def summarize_runs(runs: dict[str, dict]) -> dict:
    """Means over complete runs of the same protocol at different ``--seed`` s (a new cohort,
    predictor and fit seed each): per mechanism the CF MAE (mean over the queries, and per
    query) and FID, each with its per-seed values; and the paired differences behind the
    targets (hvae - cvae CF MAE; image-diffusion - hvae CF MAE and FID), so a gap can be read
    against its spread over seeds. ``runs``: file name -> that run's JSON summary."""
    if len(runs) < 2:
        raise ValueError(f"--summarize needs at least two runs, got {len(runs)}")
    keys = ("size", "n_train", "n_test", "steps", "batch_size", "lr", "n_realism")
    first_name, first = next(iter(runs.items()))
    seeds = {}
    for name, s in runs.items():
        if not isinstance(s, dict) or "results" not in s or "command" not in s:
            raise ValueError(f"{name}: not a brain_counterfactuals.py result (no 'results' / 'command')")
        if not s.get("complete"):
            raise ValueError(f"{name}: the run is incomplete (partial results); rerun it before summarizing")
        for k in keys:
            if s.get(k) != first.get(k):
                raise ValueError(f"{name}: {k}={s.get(k)!r} differs from {first_name}'s {first.get(k)!r}")
        if list(s["results"]) != list(first["results"]):
            raise ValueError(f"{name}: mechanisms {list(s['results'])} differ from {first_name}'s "
                             f"{list(first['results'])}")
        for m, r in s["results"].items():
            if r.get("hparams") != first["results"][m].get("hparams"):
                raise ValueError(f"{name}: {m}'s hyperparameters {r.get('hparams')} differ from {first_name}'s "
                                 f"{first['results'][m].get('hparams')}")
        seed = s.get("seed", _seed_of(s["command"]))
        if seed in seeds:
            raise ValueError(f"{name} and {seeds[seed]} are the same --seed {seed}: not independent runs")
        seeds[seed] = name

    def stats(values):
        v = np.asarray(values, dtype=float)
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)), "per_seed": [float(x) for x in v]}

    ordered = [runs[seeds[k]] for k in sorted(seeds)]
    models = list(first["results"])
    out = {"seeds": sorted(seeds), "files": [seeds[k] for k in sorted(seeds)],
           "protocol": {k: first.get(k) for k in keys},
           "fid_real_vs_real": stats([s["fid_real_vs_real"] for s in ordered]) if first.get("fid_real_vs_real")
           is not None else None, "models": {}, "paired": {}}
    for m in models:
        rs = [s["results"][m] for s in ordered]
        out["models"][m] = {
            "cf_mae": stats([_query_mean(r) for r in rs]),
            "null_abduction_mae": stats([_query_mean(r, "null_abduction") for r in rs]),
            "fid": stats([r["fid_samples_vs_real"] for r in rs]),
            "queries": {q: stats([r["queries"][q]["cf"]["mae"] for r in rs]) for q in rs[0]["queries"]},
            "hparams": rs[0].get("hparams", {})}
    pairs = [("hvae", "cvae", "cf_mae"), ("image-diffusion", "hvae", "cf_mae"), ("image-diffusion", "hvae", "fid")]
    for a, b, metric in pairs:
        if a in out["models"] and b in out["models"]:
            d = np.subtract(out["models"][a][metric]["per_seed"], out["models"][b][metric]["per_seed"])
            out["paired"][f"{a} - {b} {metric}"] = stats(d)
    return out


def _seed_of(command: str) -> int:
    """The ``--seed`` of a run that predates the ``seed`` field (its command line; default 0)."""
    parts = command.split()
    for i, part in enumerate(parts):
        if part.startswith("--seed="):
            return int(part.split("=", 1)[1])
        if part == "--seed" and i + 1 < len(parts):
            return int(parts[i + 1])
    return 0


def render_seed_markdown(t: dict, command: str) -> str:
    models, seeds = list(t["models"]), t["seeds"]
    pm = lambda x, nd=4: f"{x['mean']:.{nd}f} ± {x['sd']:.{nd}f}"  # noqa: E731
    per = lambda x, nd=4: " / ".join(f"{v:.{nd}f}" for v in x["per_seed"])  # noqa: E731
    p = t["protocol"]
    L = [f"# Counterfactual brain scans over --seed {', '.join(map(str, seeds))}: {' vs '.join(models)}", "",
         f"Command: `{command}`  ", f"Runs: {', '.join(f'`{f}`' for f in t['files'])} (each with its own "
         "command and timings). Each --seed draws a new cohort, anti-causal predictor and fit seed; "
         f"BrainMRI {p['size']}x{p['size']}, {p['n_train']} training / {p['n_test']} held-out patients, "
         f"{p['steps']} steps. Mean ± sd over the runs (sd with ddof 1), then the per-seed values.", ""]
    for m, r in t["models"].items():
        hp = r.get("hparams", {})
        if "guidance" in hp:
            L += [f"{m}: {hp.get('steps')} DDIM steps, depth {hp.get('depth')}, guidance {hp.get('guidance')}.", ""]
    L += ["| mechanism | CF MAE | per seed | null-abduction MAE | FID | per seed |", "|---|---|---|---|---|---|"]
    for m, r in t["models"].items():
        L.append(f"| {m} | {pm(r['cf_mae'])} | {per(r['cf_mae'])} | {pm(r['null_abduction_mae'])} | "
                 f"{pm(r['fid'], 3)} | {per(r['fid'], 3)} |")
    if t.get("fid_real_vs_real"):
        f = t["fid_real_vs_real"]
        L += ["", f"FID between two sets of {p['n_realism']} real scans (the estimator's floor): {pm(f, 3)} "
              f"({per(f, 3)})."]
    L += ["", "## Per query CF MAE", "", "| query | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for q in t["models"][models[0]]["queries"]:
        L.append(f"| {q} | " + " | ".join(pm(t["models"][m]["queries"][q]) for m in models) + " |")
    targets = {"hvae - cvae cf_mae": "hvae CF MAE below cvae's", "image-diffusion - hvae cf_mae":
               "image-diffusion CF MAE at least as good as hvae's", "image-diffusion - hvae fid":
               "image-diffusion FID at least as good as hvae's"}
    L += ["", "## Targets on the means, with the paired difference per seed", "",
          "| target | paired difference (mean ± sd) | per seed | verdict on the mean |", "|---|---|---|---|"]
    for k, d in t["paired"].items():
        nd = 3 if k.endswith("fid") else 4
        met = d["mean"] < 0 if k.startswith("hvae - cvae") else d["mean"] <= 0
        L.append(f"| {targets[k]} | {pm(d, nd)} | {per(d, nd)} | {'met' if met else 'MISSED'} |")
    L.append("")
    return "\n".join(L)


def summarize_main(paths: list[Path], out: Path, stem: str, command: str) -> str:
    runs = {}
    for path in paths:
        try:
            runs[Path(path).name] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--summarize: cannot read {path}: {e}")
    try:
        table = summarize_runs(runs)
    except ValueError as e:
        raise SystemExit(f"--summarize: {e}")
    table["command"] = command
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / f"{stem}.json") as tmp:
        Path(tmp).write_text(json.dumps(table, indent=1))
    md = render_seed_markdown(table, command)
    with atomic_write(out / f"{stem}.md") as tmp:
        Path(tmp).write_text(md)
    return md


if __name__ == "__main__":
    main()
