"""The synthetic brain-MRI cohort: generation time, and how well measured volumes track the truth.

Protocol (fixed; nothing is tuned to the result):

- ``BrainMRI(shape=(64, 64))`` draws ``--n`` (2000) patients with ``sample(n, seed=0)``; the
  template cache is built first and timed apart. Timed: sample (variables + scans), the true
  counterfactual of every patient under ``do(age = age + 10)``, and ``measure`` on the scans.
- Measured vs true: Pearson r (raw and log scale) and the median ratio measured/true for brain
  volume, ventricle volume, lesion load and ICV, on the factual scans, and Pearson r between
  measured and true *changes* under ``do(age + 10)``.
- Targets: 2000 64x64 patients generated in < 60 s on 2 cores; r > 0.9 for brain volume,
  ventricle volume and lesion load (the floor the tests assert is r > 0.95 at 64x64).
- ``--with-3d`` adds 40 volumes of 48x48x48 (time per patient, the same correlations).

    python benchmarks/brain_cohort.py                 # full run (about 2-4 min on 2 loaded cores)
    python benchmarks/brain_cohort.py --quick         # smoke run: 100 patients of 32x32 (~30 s)

Timings taken while other jobs share the machine are inflated; the markdown records the load
average at the start and the end of the run.
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
import torch

from medcausal.errors import OutOfSupportWarning
from medcausal.io import atomic_write
from medcausal.synthetic.brain import BrainMRI, _template

RESULTS = Path(__file__).parent / "results"
VOLUMES = ["brain_volume", "ventricle_volume", "lesion_load", "icv"]
R_FLOOR = 0.9
TIME_TARGET_S = 60.0


def _corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def run_shape(shape: tuple, n: int, seed: int) -> dict:
    sim = BrainMRI(shape=shape)
    t0 = time.perf_counter()
    _template(shape)
    t_template = time.perf_counter() - t0
    with warnings.catch_warnings(record=True) as caught_sample:
        warnings.simplefilter("always", OutOfSupportWarning)
        t0, c0 = time.perf_counter(), time.process_time()
        cohort = sim.sample(n, seed=seed)
        t_sample, c_sample = time.perf_counter() - t0, time.process_time() - c0
    with warnings.catch_warnings(record=True) as caught_cf:
        warnings.simplefilter("always", OutOfSupportWarning)
        t0 = time.perf_counter()
        cf = sim.counterfactual(cohort, do={"age": lambda a: a + 10})
        t_cf = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = sim.measure(cohort)
    t_measure = time.perf_counter() - t0
    m_cf = sim.measure(cf)
    truth, truth_cf = cohort.table, cf.table
    corr = {}
    for v in VOLUMES:
        corr[v] = {"r": _corr(m[v], truth[v]),
                   "r_log": _corr(np.log(m[v] + 0.1), np.log(truth[v] + 0.1)),
                   "median_ratio": float(np.median(m[v] / truth[v])),
                   "r_change_do_age_plus_10": (_corr(m_cf[v] - m[v], truth_cf[v] - truth[v])
                                               if v != "icv" else None)}
    return {"shape": list(shape), "n": n, "seed": seed,
            "seconds": {"template_cache": round(t_template, 2), "sample": round(t_sample, 2),
                        "sample_cpu": round(c_sample, 2),
                        "counterfactual_do_age_plus_10": round(t_cf, 2), "measure": round(t_measure, 2)},
            "patients_per_second_sample": round(n / t_sample, 1),
            "out_of_support_warnings": {"sample": [str(w.message) for w in caught_sample],
                                        "counterfactual": [str(w.message) for w in caught_cf]},
            "correlations": corr}


def markdown(res: dict) -> str:
    L = ["# Synthetic brain-MRI cohort: generation time and measured-vs-true volumes", "",
         f"Command: `{res['command']}`  ",
         f"Machine: {res['machine']['cpus']} CPUs, torch threads {res['machine']['torch_threads']}, "
         f"load average {res['machine']['load_start']} at start, {res['machine']['load_end']} at end "
         "(timings on a shared machine are inflated; re-run on a quiet one for reference numbers).", ""]
    for r in res["runs"]:
        shape = "x".join(map(str, r["shape"]))
        s = r["seconds"]
        target = ""
        if r["shape"] == [64, 64] and r["n"] >= 2000:
            ok = s["sample"] < TIME_TARGET_S
            target = f" - target < {TIME_TARGET_S:.0f} s: **{'met' if ok else 'missed'}**"
        L += [f"## {shape}, {r['n']} patients", "",
              f"- template cache (once per process): {s['template_cache']} s",
              f"- sample (variables + scans): {s['sample']} s wall, {s['sample_cpu']} s CPU (all "
              f"threads) ({r['patients_per_second_sample']} patients/s){target}",
              f"- true counterfactuals under do(age + 10): {s['counterfactual_do_age_plus_10']} s",
              f"- measure(): {s['measure']} s", ""]
        for step, msgs in r["out_of_support_warnings"].items():
            if msgs:
                L += [f"Out-of-support warnings ({step}): " + "; ".join(msgs), ""]
        L += ["| variable | Pearson r | r (log) | median measured/true | r of changes, do(age+10) | "
              f"floor r > {R_FLOOR} |", "|---|---|---|---|---|---|"]
        for v, c in r["correlations"].items():
            floor = "-" if v == "icv" else ("met" if c["r"] > R_FLOOR else "**missed**")
            ch = "-" if c["r_change_do_age_plus_10"] is None else f"{c['r_change_do_age_plus_10']:.3f}"
            L.append(f"| {v} | {c['r']:.4f} | {c['r_log']:.4f} | {c['median_ratio']:.3f} | {ch} | {floor} |")
        L.append("")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 patients of 32x32 (smoke test)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the renderer is mostly numpy, and on a busy "
                         "machine more threads only wait for each other)")
    ap.add_argument("--with-3d", action="store_true", help="also 40 volumes of 48x48x48")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    runs = []
    if args.quick:
        runs.append(run_shape((32, 32), 100, seed=0))
    else:
        runs.append(run_shape((64, 64), args.n, seed=0))
        if args.with_3d:
            runs.append(run_shape((48, 48, 48), 40, seed=0))
    res = {"benchmark": "brain_cohort", "command": "python " + " ".join([Path(sys.argv[0]).as_posix(),
                                                                          *(argv or sys.argv[1:])]),
           "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "python": platform.python_version(), "torch": torch.__version__,
                       "load_start": [round(x, 2) for x in load_start] if load_start else None,
                       "load_end": [round(x, 2) for x in os.getloadavg()] if load_start else None},
           "targets": {"sample_seconds_2000_64x64": TIME_TARGET_S, "r_floor": R_FLOOR},
           "runs": runs}
    out = Path(args.out)
    stem = "brain_cohort_quick" if args.quick else "brain_cohort"
    with atomic_write(out / f"{stem}.json") as tmp:
        Path(tmp).write_text(json.dumps(res, indent=1))
    with atomic_write(out / f"{stem}.md") as tmp:
        Path(tmp).write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
