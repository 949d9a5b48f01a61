"""Reproduce the 64x64 ``image-diffusion`` column of ``brain_counterfactuals.py`` on a GPU.

The same protocol, cohort, metrics and run as ``benchmarks/brain_counterfactuals.py``
(imported, not copied): this script only adds the ``image-diffusion`` entry to its
``MODELS`` and puts that mechanism on the GPU (``mech.to(device)``; its ``fit`` trains
where its weights are and its queries return CPU tensors), so the other mechanisms
(``hvae`` by default, the comparison the issue asks for) run exactly as on the CPU.
Results go to ``--out`` (default ``benchmarks/results/image_diffusion_gpu/``), never over
the CPU results. Not used by the tests or CI.

    python benchmarks/image_diffusion_gpu.py                      # 64x64, hvae + image-diffusion
    python benchmarks/image_diffusion_gpu.py --quick              # smoke run
    python benchmarks/image_diffusion_gpu.py --diffusion '{"steps": 100, "guidance": 2.0}'
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
import brain_counterfactuals as bc  # noqa: E402

from medcausal.mechanisms import image_diffusion as _idiff  # noqa: E402,F401  (registers it)
from medcausal.mechanisms import registry  # noqa: E402

#: the 64x64 settings: the mechanism's defaults (channels [32, 64, 64], 50 DDIM steps,
#: full depth, guidance 1, cfg_dropout 0.1); override with --diffusion.
DEFAULT = {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--diffusion", type=json.loads, default=DEFAULT, help="image-diffusion hparams (JSON)")
    ap.add_argument("--out", type=Path, default=bc.RESULTS / "image_diffusion_gpu")
    args, rest = ap.parse_known_args(argv)
    bc.MODELS["image-diffusion"] = ("image-diffusion", dict(args.diffusion))

    def get(kind):
        cls = registry.get(kind)
        if kind != "image-diffusion":
            return cls
        return lambda *a, **kw: cls(*a, **kw).to(args.device)

    bc.registry = SimpleNamespace(get=get)  # only where brain_counterfactuals builds the mechanisms
    if "--models" not in rest:
        rest += ["--models", "hvae", "image-diffusion"]
    command = "python benchmarks/image_diffusion_gpu.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    return bc.main(rest + ["--out", str(args.out)], command=command)


if __name__ == "__main__":
    main()
