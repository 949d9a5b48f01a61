"""Tried and not kept: other query-time answers to the diffusion mechanism's off-manifold queries.

The additive diamond misses issue 3's "within 1.2x flow" target over fit seeds 0-5 because two
fits in six answer ``do(x3)`` badly for x4: its counterfactual parents pair a unit's ``x2`` with
an ``x3`` far off the training manifold. Two things go wrong there: the denoiser sees a
conditioning ``(mu, log sigma)`` that is inside the training box coordinate by coordinate but
off the training rows' curve, and the preconditioner's location ``mu`` extrapolates. This script
re-answers the protocol's queries of saved models (``tabular_scm.py --save-models``) with
``DiffusionMechanism._query`` replaced by each variant:

- ``box``: the library's default (the training box, :meth:`DiffusionMechanism._query`);
- ``nearest``: the denoiser sees the *nearest training row's* conditioning (and its
  ``log sigma``) instead of the box's nearest point;
- ``box+clamp_mu`` / ``nearest+clamp_mu``: the same, with ``mu`` clamped to its training range
  too (a bounded location, the bias a flow's bounded spline has).

    python benchmarks/diffusion_query_variants_tried.py --models /tmp/models --scms diamond \\
        --fit-seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import medcausal as mc
from medcausal.io import atomic_write
from medcausal.mechanisms.diffusion import DiffusionMechanism

sys.path.insert(0, str(Path(__file__).parent))
from diffusion_latent_bound import _diffusions, cf_mse_x100, record_box, saved_protocol  # noqa: E402
from tabular_scm import _markdown, add_run_options, begin_run, model_path, protocol_data  # noqa: E402

VARIANTS = ("box", "nearest", "box+clamp_mu", "nearest+clamp_mu")
_default_query = DiffusionMechanism._query


def _variant_query(variant: str):
    def query(self, parents):
        if variant == "box":
            return _default_query(self, parents)
        mu, log_sigma = self._affine(parents)
        d, lo, hi = self.dim, self.box_lo.to(parents), self.box_hi.to(parents)
        log_sigma = log_sigma.clamp(lo[d:d + 1], hi[d:d + 1])
        if variant.startswith("nearest"):
            bank = self.training_conditioning  # [rows, dim + 1]: each training row's (mu, log sigma)
            cond = bank[torch.cdist(torch.cat([mu, self._affine(parents)[1]], -1), bank).argmin(-1)]
            log_sigma = cond[:, d:]
        else:
            cond = self._cond(parents.clamp(lo[d + 1:], hi[d + 1:]), mu.clamp(lo[:d], hi[:d]), log_sigma)
        return (mu.clamp(lo[:d], hi[:d]) if variant.endswith("clamp_mu") else mu), log_sigma, cond
    return query


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="the folder of tabular_scm.py --save-models")
    ap.add_argument("--scms", nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", default=["additive", "non-additive"])
    ap.add_argument("--fit-seeds", type=int, nargs="+", default=[0])
    add_run_options(ap)
    args = ap.parse_args(argv)
    command, started = begin_run(args, "diffusion_query_variants_tried.py", argv)
    protocol = saved_protocol(args.models)
    rows = []
    try:
        for name in args.scms:
            for variant in args.variants:
                sim = mc.synthetic.scm(name, additive=variant == "additive")
                train, qs, factual, truth = protocol_data(sim, **protocol)
                for seed in args.fit_seeds:
                    paths = {m: model_path(args.models, name, variant, m, seed) for m in ("flow", "diffusion")}
                    row = {"scm": name, "variant": variant, "fit_seed": seed,
                           "flow": cf_mse_x100(mc.CausalModel.load(paths["flow"]), sim, qs, factual, truth)}
                    model = mc.CausalModel.load(paths["diffusion"])
                    record_box(model, train)
                    values = model._encode(train)
                    for mech_name, mech in _diffusions(model).items():
                        with torch.no_grad():
                            mu, log_sigma = mech._affine(model._parents(mech_name, values, len(train)).float())
                        mech.training_conditioning = torch.cat([mu, log_sigma], -1)
                    for v in VARIANTS:
                        DiffusionMechanism._query = _variant_query(v)
                        row[v] = cf_mse_x100(model, sim, qs, factual, truth)
                    DiffusionMechanism._query = _default_query
                    rows.append(row)
                    print(" ".join(f"{k}={x:.3f}" if isinstance(x, float) else f"{k}={x}" for k, x in row.items()),
                          flush=True)
    finally:
        DiffusionMechanism._query = _default_query
    df = pd.DataFrame(rows)
    means = df.groupby(["scm", "variant"], sort=False)[["flow", *VARIANTS]].mean().reset_index()
    means.insert(2, "n_seeds", df.groupby(["scm", "variant"], sort=False).size().to_numpy())
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"diffusion_query_variants_tried{args.suffix}"
    meta = {"command": command, "seconds": round(time.time() - started, 1), "medcausal": mc.__version__,
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    with atomic_write(stem.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Tried and not kept: other query-time answers of the diffusion mechanism", "",
             f"Command: `{command}`  ", f"{meta['seconds']} s on {meta['threads']} torch threads; medcausal "
             f"{meta['medcausal']}, torch {meta['torch']}. CF MSE x100 of `tabular_scm.py`'s protocol; every "
             "diffusion column answers with the same fitted model, `flow` with the flow model of the same run "
             "and seed. `box`: the library's default; `nearest`: the denoiser sees the nearest training row's "
             "conditioning; `+clamp_mu`: the location clamped to its training range as well.", "",
             _markdown(df), "", "## Mean over fit seeds", "", _markdown(means), ""]
    with atomic_write(stem.with_suffix(".md")) as tmp:
        Path(tmp).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
