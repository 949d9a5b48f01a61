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
import sys
from pathlib import Path

import torch

from medcausal.mechanisms.diffusion import DiffusionMechanism

sys.path.insert(0, str(Path(__file__).parent))
from diffusion_latent_bound import (_diffusions, add_saved_fit_options, cf_mse_x100, print_row,  # noqa: E402
                                    saved_fits, write_results)
from tabular_scm import add_run_options, begin_run  # noqa: E402

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
    add_saved_fit_options(ap)
    add_run_options(ap)
    args = ap.parse_args(argv)
    command, started = begin_run(args, "diffusion_query_variants_tried.py", argv)
    rows = []
    try:
        for sim, train, queries, row, model in saved_fits(args):
            values = model._encode(train)
            for name, mech in _diffusions(model).items():
                with torch.no_grad():
                    mu, log_sigma = mech._affine(model._parents(name, values, len(train)).float())
                mech.training_conditioning = torch.cat([mu, log_sigma], -1)
            for v in VARIANTS:
                DiffusionMechanism._query = _variant_query(v)
                row[v] = cf_mse_x100(model, sim, *queries)
            DiffusionMechanism._query = _default_query
            rows.append(row)
            print_row(row)
    finally:
        DiffusionMechanism._query = _default_query
    write_results(args, "diffusion_query_variants_tried", command, started, rows, ["flow", *VARIANTS],
                  "Tried and not kept: other query-time answers of the diffusion mechanism",
                  "every diffusion column answers with the same fitted model, `flow` with the flow model of the "
                  "same run and seed. `box`: the library's default; `nearest`: the denoiser sees the nearest "
                  "training row's conditioning; `+clamp_mu`: the location clamped to its training range as well.")


if __name__ == "__main__":
    main()
