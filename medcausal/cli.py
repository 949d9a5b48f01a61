"""The ``medcausal`` command line: fit a recipe, sample, ask counterfactuals, run the demo.

    medcausal fit cohorts/triangle.toml --out runs/triangle
    medcausal sample runs/triangle -n 1000 --do x1=0.5 --out synthetic.csv
    medcausal counterfactual runs/triangle --input patients.csv --do x1=0.5 --out cf.csv
    medcausal demo --out demo_output          # brain-MRI counterfactuals (--quick: toy size)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import MedCausalError
from .interventions import parse_cli_do

MODEL_FILE = "model.mcm"


def load_run(run_dir: str):
    """The model of a run directory made by ``medcausal fit`` (or a model file itself)."""
    from .model import CausalModel

    run = Path(run_dir)
    if run.is_file():
        return CausalModel.load(run)
    if not run.is_dir():
        raise MedCausalError(f"run directory {run_dir!r} does not exist (create it with `medcausal fit`)")
    return CausalModel.load(run / MODEL_FILE)


RUN_FILES = (MODEL_FILE, "recipe.toml", "fit.json")
RUN_HELP = "run directory made by `medcausal fit` (or a model file)"
INPUT_HELP = ("CSV/Parquet (with <name>_path columns naming the scans of image variables), .h5ad for cells, "
              "or a `medcausal simulate` folder")
OUT_HELP = "CSV or Parquet (scans written as files beside it), or .h5ad for cells"


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Every command's output rule: an existing ``--out`` is replaced only with ``--overwrite``."""
    if Path(out).exists() and not overwrite:
        raise MedCausalError(f"{str(out)!r} already exists; pass --overwrite to replace it")


def _check_replaceable_run(out: Path) -> None:
    """``fit --overwrite`` replaces a previous run folder, and nothing else: not a file, not the
    working folder or one above it, not a folder holding other files (the recipe, the data)."""
    if not out.is_dir():
        raise MedCausalError(f"--out {str(out)!r} is a file, not a run folder; choose another --out")
    here, target = Path.cwd().resolve(), out.resolve()
    if here == target or target in here.parents:
        raise MedCausalError(f"refusing to replace {str(out)!r}: it is the working folder or holds it")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES)
    if foreign:
        raise MedCausalError(f"refusing to replace {str(out)!r}: it holds files that are not a fitted run's: "
                             f"{foreign[:5]} (a run folder holds only {list(RUN_FILES)})")


def cmd_fit(args) -> int:
    from .model import CausalModel
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    if out.exists():
        _check_replaceable_run(out)  # before the fit, so a refusal costs nothing
    try:  # the mechanisms are checked before the data are read or rendered
        model = CausalModel(recipe.graph(), mechanisms=recipe.mechanisms or None)
    except MedCausalError as e:
        raise type(e)(f"{args.recipe}: [mechanisms]: {e}") from None
    fit_args = recipe.fit.model_dump()
    if args.max_epochs is not None:
        fit_args["max_epochs"] = args.max_epochs
    privacy = None
    if args.privacy:
        from .privacy import load_profile
        privacy = load_profile(*args.privacy)
    data = recipe.load_data()
    model.fit(data, verbose=not args.quiet and None, privacy=privacy, **fit_args)

    def write_run():  # build the run directory beside its final place, then move it in whole
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            # mkdtemp makes the folder its owner's only; give the run the mode a plain mkdir would
            # (0777 less the umask), as atomic_write does for files, so collaborators can read it.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            model.save(tmp / MODEL_FILE)
            shutil.copyfile(args.recipe, tmp / "recipe.toml")
            (tmp / "fit.json").write_text(json.dumps({"fit": model.fit_info, "history": model.history},
                                                     indent=1))
            _swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    from .train import on_rank0, ranks
    on_rank0(write_run)  # under torchrun the ranks hold the same weights: rank 0 writes, once
    if ranks()[0] != 0:
        return 0
    info = model.fit_info
    how = (f"best validation loss {info['best_val_loss']:.4f}" if info.get("best_val_loss") is not None
           else f"{info['steps']} DP-SGD steps")
    size = (f"{model.privacy['n_records']} {model.privacy['privacy_unit']}s" if info.get("n_rows") is None
            else f"{info['n_rows']} rows")  # unit-level DP: the row count is not kept
    if info.get("seconds") is not None:  # not kept for a DP fit
        size += f" in {info['seconds']:.1f}s"
    print(f"fitted {recipe.name!r} on {size} ({info['epochs']} epochs, {how}) -> {out}")
    print(privacy_line(model))
    return 0


def _swap_in(new: Path, out: Path) -> None:
    """Move the folder ``new`` to ``out``; an old ``out`` is set aside first and deleted only once
    the new one is in place (an interruption leaves the old run or the new one, never neither)."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old / out.name, out)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def privacy_line(model, of_inputs: bool = False) -> str:
    """What a user must know about outputs of this model: the DP guarantee, or that there is none.
    ``of_inputs``: the outputs are counterfactuals of given patients, which the guarantee does not cover."""
    p = model.dp_ledger()
    if p is None:
        return "privacy: NOT differentially private (outputs carry no DP guarantee)"
    line = (f"privacy: model ({p['epsilon']:.3g}, {p['delta']:.2g})-DP per {p['privacy_unit']} "
            f"({p['accountant']} accountant); see `medcausal info`")
    if of_inputs:
        line += ("\n  these rows are counterfactuals of the input patients: each reveals its input row, and the "
                 "DP guarantee does NOT cover them (privacy/PRIVACY.md, section 3)")
    return line


def _check_table_out(args) -> None:
    """``--out`` of sample/counterfactual: a .csv, .parquet or .h5ad file, not replaced without --overwrite."""
    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".parquet", ".pq", ".h5ad"):
        raise MedCausalError(f"--out {str(out)!r}: write a .csv or .parquet file (cells: .h5ad)")
    refuse_existing(out, args.overwrite)


def cmd_sample(args) -> int:
    from .simulate import _write_output

    _check_table_out(args)
    model = load_run(args.run_dir)
    out = model.sample(args.n, do=parse_cli_do(args.do, model.graph.variables) or None,
                       seed=args.seed)
    _write_output(out, Path(args.out))  # scans one file each beside the table; cells as .h5ad
    print(f"wrote {args.n} samples to {args.out}")
    print(privacy_line(model))
    return 0


def cmd_counterfactual(args) -> int:
    from .simulate import _over_ranks, _read_input, _write_output, keyed_by_id

    _check_table_out(args)
    model = load_run(args.run_dir)
    # a table (scans by <name>_path), .h5ad or a simulation folder; --id-column keys each patient's noise
    data = keyed_by_id(_read_input(model, args.input, args.id_column), args.id_column)
    do = parse_cli_do(args.do, model.graph.variables)
    if not do:
        raise MedCausalError("counterfactual needs at least one --do var=value")
    # under torchrun each rank answers a share of the patients and rank 0 writes them all
    cf = _over_ranks(data, lambda rows: model.counterfactual(rows, do=do, seed=args.seed))
    if cf is None:  # not rank 0
        return 0
    _write_output(cf, Path(args.out))
    print(f"wrote {cf.n_obs if hasattr(cf, 'n_obs') else len(cf)} counterfactuals to {args.out}")
    print(privacy_line(model, of_inputs=True))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo, run_tabular_demo

    run = run_tabular_demo if args.tabular else run_demo
    report = run(args.out, quick=args.quick, verbose=not args.quiet and None)
    print(f"demo finished: report at {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medcausal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    p.add_argument("--version", action="version", version=f"medcausal {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit a causal model from a cohort recipe (TOML)")
    f.add_argument("recipe", help="path to a recipe TOML (see cohorts/)")
    f.add_argument("--out", required=True, help="run directory to create (model.mcm, fit.json, recipe.toml)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    f.add_argument("--max-epochs", type=int, default=None, help="override the recipe's [fit] max_epochs")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--privacy", action="append", default=[], metavar="PROFILE.toml",
                   help="train under differential privacy with this profile (e.g. privacy/eps8.toml); "
                        "repeatable, later files override earlier ones (see privacy/PRIVACY.md)")
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser("sample", help="sample units from a fitted model, optionally under interventions")
    s.add_argument("run_dir", help=RUN_HELP)
    s.add_argument("-n", type=int, required=True, help="number of units")
    s.add_argument("--do", action="append", default=[], metavar="VAR=VALUE", help="intervention (repeatable)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help=OUT_HELP)
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("counterfactual", help="counterfactuals of given units under interventions (under "
                                              "torchrun: the units split over the ranks)")
    c.add_argument("run_dir", help=RUN_HELP)
    c.add_argument("--input", required=True, help=f"the observed units: {INPUT_HELP}")
    c.add_argument("--do", action="append", default=[], metavar="VAR=VALUE", help="intervention (repeatable)")
    c.add_argument("--seed", type=int, default=0, help="seed for the noise of discrete variables")
    c.add_argument("--id-column", default=None,
                   help="column holding patient ids: a patient's discrete noise is keyed by its id, so its "
                        "counterfactual is the same in any input file (default: the row number)")
    c.add_argument("--out", required=True, help=OUT_HELP)
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.set_defaults(func=cmd_counterfactual)

    d = sub.add_parser("demo", help="the brain-MRI demo: fit hvae and cvae on a synthetic cohort whose true "
                                    "counterfactual scans are known; write the grid figure, report and models")
    d.add_argument("--out", default="demo_output", help="output directory (default: demo_output)")
    d.add_argument("--quick", action="store_true", help="a toy-size run (under a minute) that checks the plumbing")
    d.add_argument("--tabular", action="store_true", help="the tabular demo instead (flow vs additive on an SCM)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)

    from .privacy.cli import add_commands as add_privacy_commands
    from .simulate import add_commands as add_simulation_commands
    add_simulation_commands(sub)
    add_privacy_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import torch.distributed

    args = build_parser().parse_args(argv)
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()  # by our caller
    try:
        code = args.func(args)
        if not grouped and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank done before any leaves (else gloo may abort one)
        return code
    except MedCausalError as e:
        print(f"medcausal {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: say which, without a traceback
        where = f" {e.filename!r}" if e.filename else ""
        print(f"medcausal {args.command}: error:{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:  # under torchrun: leave the process group we made cleanly (gloo may abort a rank whose peer left)
        if not grouped and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
