"""How exactly does DDIM inversion invert DDIM generation on a *trained* image denoiser?

``image-diffusion`` abducts a scan by DDIM inversion; each inversion move is the solution
of a fixed-point equation (``medcausal.mechanisms.diffusion.ddim_invert_move``), so a null
intervention (invert, then generate under the same parents) returns the scan only as
exactly as that equation is solved. Untrained or briefly trained networks are smooth and
any solver converges; a trained denoiser at the first, low-noise move is close to a
projection onto the data, where plain fixed-point iteration contracts slowly. This script
measures it where it matters.

Protocol (fixed): ``BrainMRI`` 32x32, 2000 training patients (seed 0) with the parents
``brain_counterfactuals.py`` uses; ``image-diffusion`` with that benchmark's settings (20
DDIM steps, default otherwise) trained for 600 steps of batch 32 at lr 1e-3 (its column's
budget there); then on 16 held-out patients (seed 1), for each solver setting (Anderson
window ``w``; ``w = 0`` is plain fixed-point iteration) and iteration cap: the largest and
mean absolute pixel error of the round trip, the number of network calls, and CPU time.
The mechanism's stated ``reconstruction_tolerance`` is printed next to it.

    python benchmarks/ddim_inversion.py            # ~15 min on 2 loaded cores (mostly training)
    python benchmarks/ddim_inversion.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import brain_counterfactuals as bc  # noqa: E402

from medcausal.io import atomic_write  # noqa: E402
from medcausal.mechanisms import image_diffusion as idm  # noqa: E402
from medcausal.synthetic.brain import BrainMRI  # noqa: E402

SETTINGS = [(0, 4), (0, 10), (0, 20), (3, 4), (3, 10), (3, 20)]  # (window, inversion_iters)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(bc.RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    t_all, load_start = time.perf_counter(), os.getloadavg()
    sim = BrainMRI(shape=(32, 32))
    train, test = sim.sample(200 if q else 2000, seed=0), sim.sample(4 if q else 16, seed=1)
    encode, dims = bc.parent_encoder(sim, train)
    x, pa = torch.from_numpy(train.arrays["mri"]), encode(train)
    x_test, pa_test = torch.from_numpy(test.arrays["mri"]), encode(test)
    torch.manual_seed(0)
    mech = idm.ImageDiffusionMechanism(sim.graph.variables["mri"], dims, **bc.MODELS["image-diffusion"][1])
    train_steps = 20 if q else 600
    t0 = time.process_time()
    mech.fit(x, pa, max_steps=train_steps, max_epochs=10 ** 6, batch_size=32, lr=1e-3, patience=10 ** 6,
             seed=0, verbose=False)
    train_cpu = time.process_time() - t0
    mech.eval()

    calls = [0]
    net_eps = mech.eps

    def counted(*a, **k):
        calls[0] += 1
        return net_eps(*a, **k)

    mech.eps = counted
    rows = []
    for window, iters in SETTINGS:
        mech.inversion_iters, mech.inversion_window = iters, window
        calls[0], c0 = 0, time.process_time()
        with torch.no_grad():
            err = (mech.reconstruct(x_test, pa_test) - x_test).abs()
        rows.append({"window": window, "inversion_iters": iters, "max_abs_error": float(err.max()),
                     "mean_abs_error": float(err.mean()), "network_calls": calls[0],
                     "cpu_s": round(time.process_time() - c0, 2)})
        print(rows[-1], file=sys.stderr, flush=True)
    tol = mech.reconstruction_tolerance
    command = "python benchmarks/ddim_inversion.py" + (" --quick" if q else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    report = {"command": command, "train_steps": train_steps, "train_cpu_s": round(train_cpu, 1),
              "n_test": len(x_test), "ddim_steps": mech.steps, "inversion_tol": mech.inversion_tol,
              "reconstruction_tolerance": tol, "rows": rows, "load_average_start": load_start,
              "load_average_end": os.getloadavg(), "seconds": round(time.perf_counter() - t_all, 1),
              "torch": torch.__version__}
    md = ["# DDIM inversion accuracy on a trained image denoiser", "", f"Command: `{command}`  ",
          f"image-diffusion 32x32, {train_steps} training steps ({train_cpu:.0f} CPU s), {mech.steps} DDIM steps, "
          f"inversion_tol {mech.inversion_tol:g} (pixels on the [-1, 1] scale); {len(x_test)} held-out scans; "
          f"errors in [0, 1] intensity units; stated reconstruction_tolerance {tol:g}. Load average "
          f"{[round(v, 2) for v in load_start]} -> {[round(v, 2) for v in report['load_average_end']]} (2 cores).",
          "", "| solver | iteration cap | max abs error | mean abs error | within tolerance | network calls | CPU s |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        solver = "plain fixed point" if r["window"] == 0 else f"Anderson, window {r['window']}"
        md.append(f"| {solver} | {r['inversion_iters']} | {r['max_abs_error']:.2e} | {r['mean_abs_error']:.2e} | "
                  f"{'yes' if r['max_abs_error'] <= tol else 'NO'} | {r['network_calls']} | {r['cpu_s']} |")
    md.append("")
    md.append("Network calls include the 20 of generation; inversion stops early once every pixel's update is "
              "below inversion_tol.")
    out = Path(args.out)
    stem = "ddim_inversion" + ("_quick" if q else "")
    with atomic_write(out / f"{stem}.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
    with atomic_write(out / f"{stem}.md") as tmp:
        Path(tmp).write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
