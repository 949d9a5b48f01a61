"""``medcausal info`` and ``medcausal audit``: the privacy ledger and the membership audit.

``add_commands(subparsers)`` adds both to the ``medcausal`` command line:

    medcausal info runs/cardio
    medcausal audit runs/cardio --members train.csv --non-members heldout.csv --out audit.json

>>> import argparse
>>> p = argparse.ArgumentParser(prog="medcausal"); sub = p.add_subparsers(dest="command")
>>> add_commands(sub)
>>> p.parse_args(["info", "runs/x"]).run_dir
'runs/x'
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MedCausalError
from ..io import atomic_write, read_table
from .ledger import format_ledger, versions

from ..cli import MODEL_FILE, load_run as _load


def _read(path: str):
    """A CSV/Parquet table, or a saved Cohort directory (if the Cohort class can read one)."""
    p = Path(path)
    if p.is_dir():
        from ..cohort import Cohort

        reader = getattr(Cohort, "read", None) or getattr(Cohort, "load", None)
        if reader is None:
            raise MedCausalError(f"{path!r} is a directory; give a CSV or Parquet table")
        return reader(p)
    return read_table(p)


def cmd_info(args) -> int:
    """Print the privacy ledger (or say the model is not DP) and the library versions.

    >>> import argparse, tempfile, pathlib, medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> _ = mc.CausalModel(sim.graph).fit(sim.sample(50, seed=0), max_epochs=1, verbose=False).save(run / MODEL_FILE)
    >>> cmd_info(argparse.Namespace(run_dir=str(run)))  # doctest: +ELLIPSIS
    model: ...
    variables: x1 (flow), x2 (flow), x3 (flow)
    privacy: NOT differentially private (trained without a privacy budget; no DP guarantee)
    installed: medcausal ...
    0
    """
    model = _load(args.run_dir)
    print(f"model: {args.run_dir}")
    mechs = ", ".join(f"{v} ({c['name']})" for v, c in model.choices.items())
    print(f"variables: {mechs}")
    print(format_ledger(model.privacy))
    print("installed: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    return 0


def cmd_audit(args) -> int:
    """Run the membership-inference audit and print (and optionally write) its result.

    >>> import argparse, tempfile, pathlib, medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> train = sim.sample(40, seed=0)
    >>> _ = mc.CausalModel(sim.graph).fit(train, max_epochs=1, verbose=False).save(run / MODEL_FILE)
    >>> train.to_csv(run / "m.csv"); sim.sample(40, seed=1).to_csv(run / "n.csv")
    >>> args = argparse.Namespace(run_dir=str(run), members=str(run / "m.csv"), non_members=str(run / "n.csv"),
    ...                           attack=["loss"], n_synthetic=None, repeats=1, seed=0, out=None)
    >>> cmd_audit(args)  # doctest: +ELLIPSIS
    model: NOT differentially private
    ...
    0
    """
    from .audit import audit

    model = _load(args.run_dir)
    members, non_members = _read(args.members), _read(args.non_members)
    result = audit(model, members, non_members, attacks=args.attack or ("loss", "dcr"),
                   n_synthetic=args.n_synthetic, repeats=args.repeats, seed=args.seed)
    print(result)
    if args.out:
        with atomic_write(args.out) as tmp:
            Path(tmp).write_text(json.dumps(result.to_dict(), indent=1))
        print(f"wrote {args.out}")
    return 0


def add_commands(subparsers) -> None:
    """Add ``info`` and ``audit`` to the ``medcausal`` sub-command parsers."""
    from ..cli import RUN_HELP

    i = subparsers.add_parser("info", help="describe a fitted model: its privacy ledger (or that it is not "
                                           "differentially private) and library versions")
    i.add_argument("run_dir", help=RUN_HELP)
    i.set_defaults(func=cmd_info)

    a = subparsers.add_parser("audit", help="membership-inference audit of a fitted model (loss and "
                                            "distance-to-closest-record attacks)")
    a.add_argument("run_dir", help=RUN_HELP)
    a.add_argument("--members", required=True, help="CSV/Parquet with (some of) the training records")
    a.add_argument("--non-members", required=True,
                   help="CSV/Parquet with records from the same population NOT used for training")
    a.add_argument("--attack", action="append", choices=["loss", "dcr"], default=None,
                   help="attack to run (repeatable; default: both)")
    a.add_argument("--n-synthetic", type=int, default=None,
                   help="synthetic records for the DCR attack (default: max(1000, 2 x candidates))")
    a.add_argument("--repeats", type=int, default=1, help="draws averaged for stochastic losses (ELBOs)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default=None, help="also write the result as JSON")
    a.set_defaults(func=cmd_audit)
