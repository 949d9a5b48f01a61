"""Patient simulation and cohort augmentation on a fitted :class:`~medcausal.CausalModel`.

Four verbs, one code path for every container a model speaks (a pandas ``DataFrame``
today; a :class:`~medcausal.Cohort` of table + arrays and AnnData through the
container helpers at the bottom of this file):

- :func:`simulate`: a synthetic cohort of ``n`` patients, optionally under
  interventions ``do`` and restricted to a subgroup ``where`` (a pandas query
  string), streamed to disk in chunks for large ``n``;
- :func:`counterfactual_patients`: a twin cohort, factual and counterfactual
  values side by side per patient id, one world per intervention, with the
  per-patient effect of each world on scalar outcomes;
- :func:`augment`: grow a scarce subgroup (or rebalance a label) by sampling it
  from the model or by counterfactually transporting real patients into it,
  every synthetic row flagged ``synthetic=True`` with provenance columns;
- :func:`evaluate_augmentation`: train-on-real vs real+synthetic vs
  synthetic-only, scored on held-out real data per subgroup, gains with
  paired-bootstrap confidence intervals.

>>> import medcausal as mc
>>> sim = mc.synthetic.scm("chain")
>>> model = mc.CausalModel(sim.graph).fit(sim.sample(300, seed=0), max_epochs=2, verbose=False)
>>> df = simulate(model, 50, where="x1 > 0", seed=0)
>>> len(df), bool((df["x1"] > 0).all()), bool(df["synthetic"].all())
(50, True, True)
>>> df.attrs["medcausal"]["method"]
'root-rejection'

Provenance columns (``PROVENANCE_COLUMNS``) on every synthetic row:
``synthetic`` (True), ``synth_model`` (a hash of the model's spec and weights,
:func:`model_id`), ``synth_strategy`` (``simulate``/``sample``/``transport``/``counterfactual``),
``synth_do`` (the intervention, JSON), ``synth_where`` (the subgroup condition),
``synth_seed``, ``synth_epsilon`` (the model's privacy budget while its
``model.privacy`` ledger describes its weights, else None; always None on a transported row, a
counterfactual of a real patient that reveals that patient, which the DP guarantee does not cover:
``privacy/PRIVACY.md`` section 3) and ``synth_source`` (the real patient a transported row came from).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import secrets
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import __version__
from .adapters.tabular import check_columns, columns_of, text_columns
from .cohort import Cohort
from .errors import (CapabilityError, DataError, InterventionError, LowAcceptanceError, MedCausalError,
                     OutOfSupportWarning, warn)
from .interventions import Intervention, is_vector_value, parse_cli_do, parse_do
from .io import atomic_write
from .train import forked_rng, gather_ranks, message_group, on_rank0, portable_error, ranks

__all__ = ["simulate", "counterfactual_patients", "augment", "evaluate_augmentation", "read_run", "ImageClassifier",
           "SimulationRun", "model_id", "add_commands", "PROVENANCE_COLUMNS"]

PROVENANCE_COLUMNS = ("synthetic", "synth_model", "synth_strategy", "synth_do", "synth_where",
                      "synth_seed", "synth_epsilon", "synth_source")
SIDECAR = "simulation.json"
MARKER = "_SUCCESS"
RUN_FORMAT = "medcausal-simulation"
DEFAULT_CHUNK = 50_000         # rows per chunk for tabular models (a 10-variable flow model peaks ~0.4 GB)
DEFAULT_CHUNK_ARRAYS = 1_024   # rows per chunk when the model has image or expression variables
_DISCRETE = ("binary", "categorical")
_SCALAR = ("continuous", "binary", "categorical")


# =========================================================================== #
# provenance
# =========================================================================== #
def model_id(model) -> str:
    """A stable id of a fitted model: a hash of its JSON spec and its weights.

    The same fitted model gives the same id before and after ``save``/``load``, and so
    does a refit that reproduces its weights (the fit's wall time is left out).

    >>> import medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> m = mc.CausalModel(sim.graph).fit(sim.sample(100, seed=0), max_epochs=1, verbose=False)
    >>> model_id(m).startswith("mcm-") and len(model_id(m))
    20
    """
    spec = dict(model.spec())
    spec.pop("medcausal_version", None)
    spec.pop("history", None)  # the training trace (with timings); the weights say what was learned
    # the fit's wall time differs between two runs that give the same weights
    spec["fit"] = {k: v for k, v in spec.get("fit", {}).items() if k != "seconds"}
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for key, value in sorted(model.mechanisms.state_dict().items()):
        h.update(key.encode())
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "mcm-" + h.hexdigest()[:16]


def _epsilon(model) -> float | None:
    """The model's spent privacy budget while its ledger describes its weights (else None)."""
    ledger = model.dp_ledger()
    return None if ledger is None else float(ledger["epsilon"])


def _privacy_summary(model) -> dict | None:
    ledger = model.dp_ledger()
    return None if ledger is None else {k: ledger.get(k) for k in ("epsilon", "delta", "privacy_unit", "accountant")}


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _describe_do(do: Mapping[str, Any] | None, variables: Mapping | None = None) -> dict | None:
    """A JSON-able description of a do= mapping: values as they are (a vector's as a list),
    per-row arrays by length and content hash (so that a resumed run can check it),
    callables by name. ``variables``: the graph's, to tell a vector's value from an array."""
    if not do:
        return None
    out = {}
    for name, spec in do.items():
        kind = Intervention(name, spec).kind
        if is_vector_value(name, spec, variables):
            out[name] = [_plain(v) for v in np.asarray(spec, dtype=float)]
        elif kind == "value":
            out[name] = _plain(np.asarray(spec).item())
        elif kind == "array":
            arr = np.asarray(spec)
            data = repr(arr.tolist()).encode() if arr.dtype.hasobject else np.ascontiguousarray(arr).tobytes()
            digest = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode() + data).hexdigest()
            out[name] = f"<per-row array of {len(spec)}, sha256 {digest[:16]}>"
        else:
            out[name] = f"<callable {getattr(spec, '__name__', 'f')}>"
    return out


def _do_text(do: Mapping[str, Any] | None, variables: Mapping | None = None) -> str | None:
    d = _describe_do(do, variables)
    return None if d is None else json.dumps(d, sort_keys=True, default=str)


def _provenance(n: int, *, model_key: str, strategy: str, do, where, seed, epsilon, source=None,
                variables: Mapping | None = None) -> dict:
    return {"synthetic": np.ones(n, dtype=bool),
            "synth_model": np.full(n, model_key, dtype=object),
            "synth_strategy": np.full(n, strategy, dtype=object),
            "synth_do": np.full(n, _do_text(do, variables), dtype=object),
            "synth_where": np.full(n, where, dtype=object),
            "synth_seed": np.full(n, seed, dtype=np.int64),
            # a transported row is a counterfactual of a real patient: no DP guarantee covers it
            "synth_epsilon": np.full(n, np.nan if epsilon is None or strategy == "transport" else epsilon,
                                     dtype=float),
            "synth_source": (np.full(n, None, dtype=object) if source is None
                             else np.asarray(source, dtype=object))}


def restamp_counterfactual(model, table: pd.DataFrame, do, seed: int | None, labels) -> None:
    """In place: the provenance of counterfactual rows, where ``table`` tracks it (has any of the
    ``PROVENANCE_COLUMNS``; no column is added). Each row is now ``model``'s counterfactual of the
    input row under ``do``, whatever made that row: ``synthetic`` True, ``synth_strategy``
    ``"counterfactual"``, ``synth_do`` this ``do``, ``synth_source`` the input row's label,
    ``synth_seed`` the query's seed (missing without one; one of 2**63 or more as the int64 torch
    takes for it, ``seed - 2**64``), no ``synth_where``, and no ``synth_epsilon``: a counterfactual
    reveals the row it derives from (privacy/PRIVACY.md section 3).
    """
    present = [c for c in PROVENANCE_COLUMNS if c in table.columns]
    if not present:
        return
    n = len(table)
    stamp = _provenance(n, model_key=model_id(model), strategy="counterfactual", do=do, where=None,
                        seed=0, epsilon=None, source=np.asarray(labels, dtype=object),
                        variables=model.graph.variables)
    if seed is None:
        stamp["synth_seed"] = pd.array([None] * n, dtype="Int64")
    else:
        seed = int(seed)
        stamp["synth_seed"] = np.full(n, seed - 2**64 if seed >= 2**63 else seed, dtype=np.int64)
    for c in present:
        table[c] = stamp[c]


def _new_seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbelow(2**62)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise MedCausalError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
    return int(seed)


def _child_seed(seed: int, *path: int) -> int:
    """A seed for sub-task ``path`` of a run, independent of every other sub-task."""
    state = np.random.SeedSequence([int(seed), *[int(p) for p in path]]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _check_n(n, what: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) <= 0:
        raise DataError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


# =========================================================================== #
# where= : a pandas query over the model's scalar variables
# =========================================================================== #
_BACKTICK = re.compile(r"`([^`]*)`")


@dataclass
class _Where:
    """A parsed ``where=`` condition: its text and the variables it reads."""

    text: str
    variables: tuple[str, ...]

    def mask(self, table: pd.DataFrame) -> np.ndarray:
        """Boolean array: which rows of ``table`` satisfy the condition."""
        if len(table) == 0:
            return np.zeros(0, dtype=bool)
        try:
            res = table.eval(self.text, engine="python")
        except Exception as e:  # pandas raises many types; say which condition failed
            raise DataError(f"where={self.text!r} cannot be evaluated: {type(e).__name__}: {e}") from None
        arr = np.asarray(res)
        if arr.shape != (len(table),) or arr.dtype != bool:
            raise DataError(f"where={self.text!r} is not a condition (it gives {arr.dtype} values, "
                            "not True/False per row); write e.g. \"sex == 'F' and age > 60\"")
        return arr


def _variable_columns(graph) -> dict[str, str]:
    """Table column -> variable, for the scalar variables."""
    return {c: v for v, t in graph.variables.items() if t.kind in _SCALAR for c in columns_of(v, t)}


def _support(model, name: str) -> list | None:
    vtype = model.graph.variables[name]
    if vtype.kind == "binary":
        return list(_decoded_support(model, name))
    if vtype.kind == "categorical":
        return list(model.codecs[name].vtype.categories)
    return None


def _parse_expr(text: str) -> tuple[ast.Expression, dict[str, str]]:
    """Parse a pandas query as Python: backticked names become placeholders (returned)."""
    placeholders: dict[str, str] = {}

    def _sub(m):
        key = f"__bt{len(placeholders)}__"
        placeholders[key] = m.group(1)
        return key

    return ast.parse(_BACKTICK.sub(_sub, text).strip(), mode="eval"), placeholders


def _parse_where(model, where: str, what: str = "where") -> _Where:
    """Validate a pandas-query condition against the model: names, syntax, impossible values."""
    if not isinstance(where, str) or not where.strip():
        raise DataError(f"{what}= must be a non-empty pandas query string, got {where!r}")
    if "@" in _BACKTICK.sub("", where):
        raise DataError(f"{what}={where!r}: '@name' (local variables) is not supported; write the value itself")
    try:
        tree, placeholders = _parse_expr(where)
    except SyntaxError as e:
        raise DataError(f"{what}={where!r} is not a valid condition: {e.msg}") from None
    funcs = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and id(node) not in funcs:
            names.append(placeholders.get(node.id, node.id))
    columns = _variable_columns(model.graph)
    unknown = sorted({c for c in names if c not in columns})
    if unknown:
        arrays = [c for c in unknown if c in model.graph.variables]
        if arrays:
            raise DataError(f"{what}={where!r} uses {arrays}, which are "
                            f"{[model.graph.variables[a].kind for a in arrays]} variables; a condition "
                            "can only read scalar (continuous, binary, categorical) variables")
        hints = []
        for c in unknown:
            close = difflib.get_close_matches(c, list(columns), n=1)
            hints.append(f"{c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise DataError(f"{what}={where!r} names unknown variable(s) {', '.join(hints)}; "
                        f"the model's variables: {list(columns)}")
    variables = tuple(dict.fromkeys(columns[c] for c in names))
    if not variables:
        raise DataError(f"{what}={where!r} reads no variable; name at least one, e.g. \"{next(iter(columns))} > 0\"")
    # Impossible values: `discrete == literal` / `discrete in [...]` outside the variable's support.
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, a, b in zip(node.ops, operands[:-1], operands[1:]):
            if not isinstance(op, (ast.Eq, ast.In)):
                continue
            for var_node, lit_node in ((a, b), (b, a)):
                if not isinstance(var_node, ast.Name) or isinstance(op, ast.In) and var_node is b:
                    continue
                col = placeholders.get(var_node.id, var_node.id)
                var = columns.get(col)
                support = _support(model, var) if var else None
                if support is None:
                    continue
                try:
                    lit = ast.literal_eval(lit_node)
                except (ValueError, SyntaxError, TypeError):
                    continue
                values = list(lit) if isinstance(op, ast.In) and isinstance(lit, (list, tuple, set)) else [lit]
                if not any(_in_support(v, support) for v in values):
                    kind = model.graph.variables[var].kind
                    raise DataError(f"{what}={where!r} can never hold: {var!r} is {kind} and takes "
                                    f"only {support}, not {values if len(values) > 1 else values[0]!r}")
    return _Where(where, variables)


def _in_support(value, support) -> bool:
    for s in support:
        try:
            if bool(value == s):
                return True
        except (TypeError, ValueError):  # exotic comparisons just do not match
            continue
    return False


# =========================================================================== #
# simulate
# =========================================================================== #
@dataclass
class _Plan:
    method: str  # unconditional | exact-roots | root-rejection | rejection
    where: _Where | None = None
    roots: tuple[str, ...] = ()
    grid: pd.DataFrame | None = None
    grid_p: np.ndarray | None = None
    probability: float | None = None  # exact P(where) for exact-roots
    drawn: int = 0
    accepted: int = 0
    pilot_rate: float | None = None  # sizes every rejection batch, so a chunk's rows depend on its seed alone

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drawn if self.drawn else None


@dataclass
class SimulationRun:
    """A simulation streamed to a folder of parts; ``read()`` loads it (complete runs only).

    ``info`` is the JSON sidecar: provenance, the method, the acceptance rate, the parts.
    """

    path: Path
    n: int
    parts: list[str]
    info: dict = field(repr=False)

    def read(self):
        return read_run(self.path)


def simulate(model, n: int, do: Mapping[str, Any] | None = None, where: str | None = None,
             seed: int | None = None, *, chunk_size: int | None = None, out: str | os.PathLike | None = None,
             format: str = "parquet", overwrite: bool = False, resume: bool = False,
             min_acceptance: float = 1e-3, provenance: bool = True, progress: bool | None = None,
             image_format: str = "nifti"):
    """Simulate ``n`` synthetic patients, optionally under ``do`` and within the subgroup ``where``.

    ``where`` is a pandas query over the model's scalar variables, evaluated in the world of
    ``do``. How the subgroup is conditioned on (reported in ``attrs["medcausal"]["method"]``):

    - ``exact-roots``: every variable in ``where`` is a discrete root (not intervened on).
      The roots' joint values are drawn from the model's own root probabilities restricted
      to the condition (enumerated and renormalized: exact, no rejection, works for rare
      subgroups), then the rest of the model is sampled given them (``do`` on a root is
      conditioning, as a root has no parents);
    - ``root-rejection``: every variable in ``where`` is a root, some continuous: the roots
      alone are sampled and kept where the condition holds (cheap), then the rest as above;
    - ``rejection``: ``where`` reads non-root or intervened variables: whole patients are
      sampled and kept where it holds.

    Rejection methods report their acceptance rate and raise :class:`MedCausalError` when a
    pilot draw shows it below ``min_acceptance``. Chunks of ``chunk_size`` rows (default
    50,000 for tabular models, 1,024 with image/expression variables; peak memory grows
    with it) are drawn with seeds derived from ``(seed, chunk)``, so a result depends on
    ``(seed, chunk_size)`` (for ``rejection``, also on ``min_acceptance``, which sizes the
    pilot draw); ``seed=None`` draws a seed and records it.

    With ``out`` (a folder) the chunks are written as ``part-00000.<format>`` files, each
    atomically, beside a JSON sidecar ``simulation.json``; a ``_SUCCESS`` marker is
    written last, so an interrupted run leaves complete parts and no marker
    (``resume=True`` finishes it, identically). Memory stays flat in ``n``. Image
    variables are written one file per scan (``image_format``: ``"nifti"``, float32, or
    ``"png"``, 16-bit with the scale in ``<name>_scale``) into a folder
    ``part-00000.<name>/`` per chunk, the table part holding ``<name>_path`` (relative to
    the run folder); expression variables go to one ``part-00000.h5ad`` per chunk (the
    table as ``.obs``, provenance included). Returns a
    :class:`SimulationRun`; without ``out``, the cohort itself (the container kind the
    model was fitted on).

    Under ``torchrun`` (e.g. ``torchrun --nproc_per_node 4 -m medcausal.cli simulate RUN -n N
    --out FOLDER``) a run to ``out`` is split over the ranks: with 4 ranks each draws one chunk
    in four, rank 0 keeps the sidecar, and the folder holds the same patients one process would
    write (the seed is rank 0's). Every rank must make the call. Without ``out`` there is no
    split, and every rank draws all ``n``.

    >>> import medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> model = mc.CausalModel(sim.graph).fit(sim.sample(300, seed=0), max_epochs=2, verbose=False)
    >>> df = simulate(model, 100, do={"x2": 1.0}, seed=0)
    >>> df.shape, bool((df["x2"] == 1.0).all()), df["synth_do"].iloc[0]
    ((100, 11), True, '{"x2": 1.0}')
    """
    model._require_fit()
    n = _check_n(n)
    if str(image_format).lower() not in ("nifti", "png"):
        raise MedCausalError(f"image_format must be 'nifti' or 'png', got {image_format!r}")
    chunk_size = _default_chunk(model) if chunk_size is None else _check_n(chunk_size, "chunk_size")
    # as model.sample reads it: [a, b] on a 2-vector is one value; a DataFrame's columns by name
    ivs = parse_do(model._one_vector_value(do, n), model.graph.variables)
    if not 0.0 < float(min_acceptance) <= 1.0:
        raise MedCausalError(f"min_acceptance must be in (0, 1], got {min_acceptance}")
    for name, iv in ivs.items():
        if iv.kind == "array" and len(np.asarray(iv.spec)) != n:
            raise InterventionError(f"do[{name!r}] has {len(np.asarray(iv.spec))} values for n={n} patients")
    plan = _make_plan(model, ivs, where, min_acceptance)

    def start_seed():
        nonlocal seed
        if resume and out is not None and (Path(out) / SIDECAR).is_file():
            fns = [name for name, iv in ivs.items() if iv.kind == "callable"]
            if fns:
                raise InterventionError(f"cannot resume {str(out)!r} with a callable in do[{fns[0]!r}]: a "
                                        "callable cannot be verified to be the one the run started with; "
                                        "pass overwrite=True to start the run again")
            if seed is None:
                seed = _read_sidecar(Path(out)).get("seed")  # finish the interrupted run with its own seed
        return _new_seed(seed)

    # a run to a folder under torchrun: rank 0 reads the folder and draws the seed for every rank
    run_seed = start_seed() if out is None else on_rank0(start_seed)
    if plan.method in ("root-rejection", "rejection"):
        _pilot(model, plan, ivs, run_seed, min_acceptance)
    meta = {"format": RUN_FORMAT, "version": 1, "medcausal_version": __version__, "n": n,
            "chunk_size": chunk_size, "n_chunks": math.ceil(n / chunk_size), "seed": run_seed,
            "model_id": model_id(model), "epsilon": _epsilon(model), "privacy": _privacy_summary(model),
            "do": _describe_do(do, model.graph.variables),
            "where": where, "method": plan.method, "provenance": bool(provenance)}
    if plan.method in ("root-rejection", "rejection"):
        meta["min_acceptance"] = float(min_acceptance)
    if any(t.kind == "image" for t in model.graph.variables.values()):
        meta["image_format"] = str(image_format).lower()
    key = dict(model_key=meta["model_id"], strategy="simulate", do=do, where=where, seed=run_seed,
               epsilon=meta["epsilon"], variables=model.graph.variables)
    chunks = [(i, i * chunk_size, min(chunk_size, n - i * chunk_size)) for i in range(meta["n_chunks"])]

    def make(i, start, m):
        data = _simulate_chunk(model, plan, ivs, start, m, _child_seed(run_seed, i), min_acceptance)
        _set_ids(data, np.arange(start, start + m))
        if provenance:
            _assign(data, _provenance(m, **key))
        return data

    if out is None:
        parts = []
        with _bar(n, progress, "simulate") as bar:
            for i, start, m in chunks:
                parts.append(make(i, start, m))
                bar.update(m)
        result = _concat(parts)
        _table(result).attrs["medcausal"] = {**meta, **_plan_report(plan)}
        return result
    return _stream(Path(out), chunks, make, meta, plan, format, overwrite, resume, progress)


def _default_chunk(model) -> int:
    """Rows per chunk: peak memory grows with it (not with n). Small for images and cells."""
    kinds = {t.kind for t in model.graph.variables.values()}
    return DEFAULT_CHUNK if kinds <= set(_SCALAR) else DEFAULT_CHUNK_ARRAYS


def _make_plan(model, ivs: Mapping[str, Intervention], where, min_acceptance) -> _Plan:
    if where is None:
        return _Plan("unconditional")
    w = _parse_where(model, where)
    graph = model.graph
    if any(v in ivs or graph.parents(v) for v in w.variables):
        return _Plan("rejection", where=w)
    roots = w.variables
    if all(graph.variables[r].kind in _DISCRETE and model.mechanism(r).has_log_prob for r in roots):
        sizes = [len(_support(model, r)) for r in roots]
        if math.prod(sizes) <= 100_000:
            return _exact_root_plan(model, w, roots)
    return _Plan("root-rejection", where=w, roots=roots)


def _exact_root_plan(model, w: _Where, roots) -> _Plan:
    supports = [_support(model, r) for r in roots]
    combos = list(itertools.product(*[range(len(s)) for s in supports]))
    grid_idx = np.asarray(combos, dtype=np.int64).reshape(len(combos), len(roots))
    logp = np.zeros(len(combos))
    with torch.no_grad():
        for j, r in enumerate(roots):
            k = len(supports[j])
            values = torch.arange(k, dtype=torch.float32, device=model.device)[:, None]
            lp = model.mechanism(r).log_prob(values, torch.zeros(k, 0, device=model.device))
            logp += lp.double().cpu().numpy()[grid_idx[:, j]]
    grid = pd.DataFrame({r: _decoded_support(model, r)[grid_idx[:, j]] for j, r in enumerate(roots)})
    mask = w.mask(grid)
    p = np.exp(logp - logp.max()) * mask
    total = float(np.exp(logp)[mask].sum())
    if not mask.any() or p.sum() <= 0 or total < 1e-12:
        raise DataError(f"where={w.text!r} has zero support in the model: no value of {list(roots)} "
                        f"satisfies it (they take {dict(zip(roots, supports))})")
    return _Plan("exact-roots", where=w, roots=tuple(roots), grid=grid.loc[mask].reset_index(drop=True),
                 grid_p=p[mask] / p[mask].sum(), probability=total)


def _decoded_support(model, name) -> np.ndarray:
    if model.graph.variables[name].kind == "binary":  # 0/1 as the training column wrote them ("no"/"yes", True...)
        return np.asarray(model.codecs[name].restore(np.array([0, 1], dtype=np.int64)))
    return np.asarray(model.codecs[name].vtype.categories, dtype=object)


def _sample_roots(model, roots, k: int, gen: torch.Generator) -> pd.DataFrame:
    """``k`` draws of the given root variables only, decoded to a table."""
    out = {}
    with torch.no_grad():
        for r in roots:
            codec = model.codecs[r]
            x = model.mechanism(r).sample(torch.zeros(k, 0, device=model.device), generator=gen)
            v = codec.decode(x)
            cols = columns_of(r, codec.vtype)
            if codec.vtype.kind == "continuous":
                for j, c in enumerate(cols):
                    out[c] = v[:, j]
            else:
                out[r] = v
    return pd.DataFrame(out)


def _root_values(model, table: pd.DataFrame, r: str) -> np.ndarray:
    vtype = model.codecs[r].vtype
    cols = columns_of(r, vtype)
    return table[cols].to_numpy() if vtype.kind == "continuous" else table[r].to_numpy()


def _sample_quietly(model, m, do, seed, internal: Iterable[str]):
    """``model.sample``, hiding out-of-support warnings about our own root-conditioning arrays."""
    internal = set(internal)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = model.sample(m, do=do or None, seed=seed)
    for w in caught:
        if issubclass(w.category, OutOfSupportWarning) and any(f"do({r})" in str(w.message) for r in internal):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return data


def _chunk_do(ivs: Mapping[str, Intervention], start: int, m: int) -> dict:
    return {k: (np.asarray(iv.spec)[start:start + m] if iv.kind == "array" else iv.spec)
            for k, iv in ivs.items()}


def _acceptance_error(model, plan: _Plan, min_acceptance: float) -> MedCausalError:
    rate = plan.acceptance_rate or 0.0
    ranges = {v: [round(float(np.min(model.codecs[v].state["min"])), 4),
                  round(float(np.max(model.codecs[v].state["max"])), 4)]
              for v in plan.where.variables if model.graph.variables[v].kind == "continuous"}
    hint = f"; ranges seen at fit: {ranges}" if ranges else ""
    if plan.accepted == 0:
        return DataError(f"where={plan.where.text!r} has (near) zero support in the model: none of "
                         f"{plan.drawn} sampled patients satisfied it ({plan.method}){hint}")
    return LowAcceptanceError(f"where={plan.where.text!r}: acceptance rate {rate:.3g} ({plan.accepted} of "
                          f"{plan.drawn}) is below min_acceptance={min_acceptance:g}; {plan.method} would "
                          f"need ~{int(1 / max(rate, 1e-12))} draws per patient. Condition on root "
                          f"variables (sampled exactly), or lower min_acceptance{hint}")


def _pilot(model, plan: _Plan, ivs, seed: int, min_acceptance: float) -> None:
    """Estimate the acceptance rate before writing anything; raise when it is too low."""
    k = int(min(max(4096, math.ceil(5 / min_acceptance)), 1_000_000))
    gen = torch.Generator().manual_seed(_child_seed(seed, 2**31 - 1))
    if plan.method == "root-rejection":
        table = _sample_roots(model, plan.roots, k, gen)
    else:
        if any(iv.kind == "array" for iv in ivs.values()):
            raise InterventionError("per-row do= arrays cannot be combined with a where= that needs "
                                    "rejection sampling (rows are dropped); use values or callables")
        table = _table(model.sample(k, do={n: iv.spec for n, iv in ivs.items()} or None,
                                    seed=_child_seed(seed, 2**31 - 1)))
    plan.drawn, plan.accepted = k, int(plan.where.mask(table).sum())
    plan.pilot_rate = plan.acceptance_rate
    if plan.acceptance_rate < min_acceptance:
        raise _acceptance_error(model, plan, min_acceptance)


def _simulate_chunk(model, plan: _Plan, ivs, start: int, m: int, seed: int, min_acceptance: float):
    do = _chunk_do(ivs, start, m)
    if plan.method == "unconditional":
        return model.sample(m, do=do or None, seed=seed)
    if plan.method == "exact-roots":
        rng = np.random.default_rng(_child_seed(seed, 1))
        rows = plan.grid.iloc[rng.choice(len(plan.grid), size=m, p=plan.grid_p)]
        forced = {r: rows[r].to_numpy() for r in plan.roots}
        return _sample_quietly(model, m, {**do, **forced}, _child_seed(seed, 2), forced)
    if plan.method == "root-rejection":
        gen = torch.Generator().manual_seed(_child_seed(seed, 1))
        table = _rejection(lambda k, j: _sample_roots(model, plan.roots, k, gen), plan, m, min_acceptance,
                           model)
        forced = {r: _root_values(model, table, r) for r in plan.roots}
        return _sample_quietly(model, m, {**do, **forced}, _child_seed(seed, 2), forced)
    return _rejection(lambda k, j: model.sample(k, do=do or None, seed=_child_seed(seed, 3, j)), plan, m,
                      min_acceptance, model)


def _rejection(draw: Callable[[int, int], Any], plan: _Plan, m: int, min_acceptance: float, model,
               max_batch: int = 1_000_000):
    kept, got, j = [], 0, 0
    while got < m:
        # sized by the pilot's rate, not the running one: a resumed run (which has only the pilot)
        # then draws each chunk exactly as the uninterrupted run did
        rate = max(plan.pilot_rate or plan.acceptance_rate or 1.0, min_acceptance)
        k = int(min(max_batch, max(1024, math.ceil((m - got) / rate * 1.2))))
        batch = draw(k, j)
        mask = plan.where.mask(_table(batch))
        plan.drawn += k
        plan.accepted += int(mask.sum())
        if plan.acceptance_rate < min_acceptance:
            raise _acceptance_error(model, plan, min_acceptance)
        idx = np.flatnonzero(mask)[: m - got]
        kept.append(_take(batch, idx))
        got += len(idx)
        j += 1
    return _concat(kept)


def _plan_report(plan: _Plan) -> dict:
    rep = {"method": plan.method}
    if plan.method == "exact-roots":
        rep["subgroup_probability"] = plan.probability
    if plan.method in ("root-rejection", "rejection"):
        rep.update(acceptance_rate=plan.acceptance_rate, drawn=plan.drawn, accepted=plan.accepted)
    return rep


# --------------------------------------------------------------------------- #
# streaming to a folder of parts
# --------------------------------------------------------------------------- #
_PART = re.compile(r"^part-\d{5}\.")


def _part_name(i: int, fmt: str) -> str:
    return f"part-{i:05d}.{fmt}"


def _stream(out: Path, chunks, make, meta: dict, plan: _Plan, fmt: str, overwrite: bool, resume: bool,
            progress) -> SimulationRun:
    fmt = {"pq": "parquet"}.get(fmt, fmt)
    if fmt not in ("parquet", "csv"):
        raise MedCausalError(f"format must be 'parquet' or 'csv', got {fmt!r}")
    if fmt == "parquet":
        _require_parquet()
    meta = {**meta, "part_format": fmt}
    rank, world = ranks()
    # rank 0 alone checks and prepares the folder; the others learn what is done (or its error)
    done, finished, meta = on_rank0(lambda: _prepare(out, meta, overwrite, resume))
    if finished is not None:  # a complete run: nothing to do
        return SimulationRun(out, finished["n"], [p["file"] for p in finished["parts"]], finished)
    todo = [c for c in chunks if c[0] not in done]
    pilot = (plan.drawn, plan.accepted)  # every rank drew the same pilot
    drawn = [0, 0]  # what the other ranks' chunks drew (rank 0's own are in plan)
    with _bar(meta["n"], progress if rank == 0 else False, "simulate") as bar:
        bar.update(sum(p["rows"] for p in done.values()))
        # under torchrun each rank takes one chunk of every `world` (a chunk's rows depend on its seed
        # alone, so who draws it does not matter) and the sidecar is updated once per round
        for first in range(0, len(todo), world):
            mine = todo[first + rank] if first + rank < len(todo) else None
            entry, failed = None, None
            try:
                if mine is not None:
                    i, start, m = mine
                    data = make(i, start, m)
                    entry = {"chunk": i, "file": _part_name(i, fmt), "rows": m, "start": start}
                    entry.update(_write_part(out, i, fmt, data, meta.get("image_format", "nifti")))
                    del data  # hold one chunk at a time
            except Exception as e:
                if world == 1:
                    raise
                failed = e
            rows = [(entry, None if failed is None else f"{type(failed).__name__}: {failed}",
                     (plan.drawn - pilot[0], plan.accepted - pilot[1]))]
            if world > 1:
                rows = gather_ranks(rows[0])
            if failed is not None:
                raise failed
            bad = [(r, msg) for r, (_, msg, _) in enumerate(rows) if msg is not None]
            if bad:
                raise MedCausalError(f"simulate: rank {bad[0][0]} failed ({bad[0][1]}); the parts written "
                                     "so far are kept: finish the run with resume=True")
            for e, _, _ in rows:
                if e is not None:
                    done[e["chunk"]] = e
            drawn = [sum(d[j] for r, (_, _, d) in enumerate(rows) if r) for j in (0, 1)]
            meta["parts"] = [done[k] for k in sorted(done)]
            meta.update(_plan_report(_merged_plan(plan, drawn)))
            on_rank0(lambda: _write_json(out / SIDECAR, meta))
            bar.update(sum(e["rows"] for e, _, _ in rows if e is not None))
    meta["status"] = "complete"
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def finish():
        _write_json(out / SIDECAR, meta)
        _write_json(out / MARKER, {"n": meta["n"], "parts": len(meta["parts"])})  # written last
        return meta

    meta = on_rank0(finish)  # every rank returns rank 0's record, once the marker is written
    return SimulationRun(out, meta["n"], [p["file"] for p in meta["parts"]], meta)


def _prepare(out: Path, meta: dict, overwrite: bool, resume: bool) -> tuple[dict, dict | None, dict]:
    """Check and prepare the run folder; returns ``(parts already done, by chunk; the sidecar of a
    complete run, or None; meta with the start recorded)``."""
    done: dict = {}
    if out.exists() and not out.is_dir():
        raise MedCausalError(f"out={str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        old = _read_sidecar(out) if (out / SIDECAR).is_file() else None
        if resume and old is not None:
            same = ("n", "chunk_size", "seed", "model_id", "do", "where", "part_format", "image_format",
                    "provenance", "min_acceptance")
            later = ("provenance", "min_acceptance")  # not recorded by older runs: cannot be checked
            diff = [k for k in same if old.get(k, meta.get(k) if k in later else None) != meta.get(k)]
            if diff:
                detail = "; ".join(f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now" for k in diff)
                raise MedCausalError(f"cannot resume {str(out)!r}: the run there differs in {diff} ({detail})")
            if (out / MARKER).exists():
                return {}, old, meta
            done = {p["chunk"]: p for p in old["parts"] if (out / p["file"]).is_file()}
        elif overwrite:
            _clear_run(out)
        else:
            raise MedCausalError(f"out={str(out)!r} already exists and is not empty; pass overwrite=True "
                                 "(--overwrite) to replace it, or resume=True (--resume) to finish it")
    out.mkdir(parents=True, exist_ok=True)
    meta["status"] = "running"
    meta["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["parts"] = [done[i] for i in sorted(done)]
    _write_json(out / SIDECAR, meta)
    return done, None, meta


def _merged_plan(plan: _Plan, other_ranks: list[int]) -> _Plan:
    """``plan`` with the other ranks' rejection draws added (each rank drew the same pilot)."""
    return dataclasses.replace(plan, drawn=plan.drawn + other_ranks[0], accepted=plan.accepted + other_ranks[1])


def _over_ranks(data, answer):
    """``answer(data)``, split over the ranks under torchrun: each rank answers a share of the
    units, and rank 0 returns the whole answer in the input's row order (the other ranks None).
    Without torchrun, ``answer(data)``. Only for row-wise answers whose rows depend on the unit's
    label and not on the batch (``CausalModel.counterfactual``: its noise is keyed by the labels,
    a repeated label by its occurrence), so all rows of one label go to one rank, in input order.
    A failure on any rank stops every rank, with that rank's error."""
    from .mechanisms.base import RowNoise

    rank, world = ranks()
    n = len(_table(data))
    if world == 1 or n == 0:
        return answer(data)
    labels = data.ids if isinstance(data, Cohort) else _table(data).index
    unit = pd.factorize(RowNoise.label_text(labels))[0]  # units numbered by first appearance
    cut = np.linspace(0, unit.max() + 1, world + 1).astype(np.int64)
    rows = np.flatnonzero((unit >= cut[rank]) & (unit < cut[rank + 1]))
    mine, error = None, None
    try:
        if len(rows):
            mine = answer(_take(data, rows))
    except Exception as e:
        error = portable_error(e)
    parts = [None] * world if rank == 0 else None
    torch.distributed.gather_object((mine, rows, error), parts, dst=0, group=message_group())
    failed = [None]
    if rank == 0:
        failed = [next(((r, e) for r, (_, _, e) in enumerate(parts) if e is not None), None)]
    torch.distributed.broadcast_object_list(failed, src=0, group=message_group())
    if failed[0] is not None:
        where, error = failed[0]
        if isinstance(error, MedCausalError):  # a user's error: say where, keep its kind
            try:
                said = type(error)(f"rank {where}: {error}")
            except TypeError:  # a subclass with another signature
                said = MedCausalError(f"rank {where}: {type(error).__name__}: {error}")
            raise said from None
        raise error
    if rank != 0:
        return None
    kept = [(p, r) for p, r, _ in parts if p is not None]
    whole = _concat([p for p, _ in kept])
    return _take(whole, np.argsort(np.concatenate([r for _, r in kept]), kind="stable"))


def _require_parquet() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MedCausalError("Parquet output needs the 'pyarrow' package (pip install pyarrow), "
                             "or pass format='csv'") from None


def _write_json(path: Path, obj: dict) -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _scans_beside(table: pd.DataFrame, scans: Cohort, name: str, folder: Path, image_format: str) -> None:
    """Write one file per scan of ``scans`` into ``folder`` and give ``table`` (row-aligned)
    the ``<name>_path`` column, relative to the folder's parent (and ``<name>_scale`` for PNG)."""
    from .adapters.images import write_images

    idx = write_images(scans, folder, format=image_format, name=name, table_name=".index.csv")
    written = pd.read_csv(idx)
    idx.unlink()
    table[f"{name}_path"] = [f"{folder.name}/{f}" for f in written[f"{name}_path"]]
    if f"{name}_scale" in written.columns:
        table[f"{name}_scale"] = written[f"{name}_scale"].to_numpy()


def _write_table_file(table: pd.DataFrame, path: Path, fmt: str) -> None:
    keep_index = table.index.name is not None
    with atomic_write(path) as tmp:
        if fmt == "parquet":
            table.to_parquet(tmp, index=keep_index)
        else:
            table.to_csv(tmp, index=keep_index)


def _h5ad_safe(adata):
    """h5py cannot store object columns mixing None and strings: None -> "" in the obs; nor
    None or lists of mappings in ``.uns["medcausal"]`` (a report): those become JSON text."""
    obs = adata.obs
    for c in obs.columns:
        if obs[c].dtype == object:
            obs[c] = obs[c].map(lambda v: "" if v is None or v is pd.NA else str(v))
    if isinstance(adata.uns.get("medcausal"), Mapping):
        adata.uns["medcausal"] = _h5_storable(adata.uns["medcausal"])
    return adata


def _h5_storable(value):
    if isinstance(value, Mapping):
        return {str(k): _h5_storable(v) for k, v in value.items()}
    if isinstance(value, (str, bool, int, float, np.number, np.bool_)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value):
        return np.asarray(value)
    return json.dumps(value, default=str)


def _write_part(out: Path, i: int, fmt: str, data, image_format: str = "nifti") -> dict:
    """Write one chunk in its domain's format; returns the extra sidecar fields. Each file is atomic.

    Tables: the ``part-<i>.<fmt>`` file. AnnData (cells) or a Cohort with an expression
    array: also ``part-<i>.h5ad``. Image arrays: one NIfTI/PNG per scan in the folder
    ``part-<i>.<name>/`` (through :func:`medcausal.adapters.write_images`), the table part
    gaining ``<name>_path`` (relative to the run folder) and, for PNG, ``<name>_scale``.
    """
    extra: dict = {}
    if _is_anndata(data):  # single-cell path: one .h5ad per chunk
        name = f"part-{i:05d}.h5ad"
        with atomic_write(out / name) as tmp:
            _h5ad_safe(data.copy()).write_h5ad(tmp)
        extra["h5ad"] = name
        extra["container"] = "anndata"
        # The table part still carries the obs (provenance included) for quick reading.
    table = _table(data)
    if isinstance(data, Cohort):
        extra["container"] = "cohort"
        extra["id_column"] = data.id_column
    if isinstance(data, Cohort) and data.arrays:
        table = table.copy()
        images = [k for k, v in data.arrays.items() if np.ndim(v) >= 4]
        matrices = [k for k, v in data.arrays.items() if k not in images]
        if images:
            extra["images"] = {}
            for name in images:
                folder = out / f"part-{i:05d}.{name}"
                if folder.exists():  # left by an interrupted run: the chunk is redone whole
                    import shutil

                    shutil.rmtree(folder)
                keep = [data.id_column] + [c for c in (f"{name}_affine",) if c in table.columns]
                _scans_beside(table, Cohort(table[keep], {name: data.arrays[name]}, id_column=data.id_column),
                              name, folder, image_format)
                extra["images"][name] = folder.name
        if matrices:
            from .adapters.singlecell import cohort_to_anndata

            sub = Cohort(data.table, {k: data.arrays[k] for k in matrices}, id_column=data.id_column)
            adata = _h5ad_safe(cohort_to_anndata(sub, expression=matrices[0]))
            name = f"part-{i:05d}.h5ad"
            with atomic_write(out / name) as tmp:
                adata.write_h5ad(tmp)
            extra["h5ad"] = name
            extra["h5ad_arrays"] = matrices
    _write_table_file(table, out / _part_name(i, fmt), fmt)
    return extra


def _read_image_file(path: Path, scale) -> np.ndarray:
    """One scan written by write_images -> [C, H, W] / [C, D, H, W] float32."""
    if path.suffix.lower() == ".png":
        from PIL import Image as PILImage

        with PILImage.open(path) as im:
            a = np.asarray(im).astype(np.float32)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return a * np.float32(scale)
    import nibabel as nib

    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))[None]


def _read_part_arrays(path: Path, p: dict, table: pd.DataFrame) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name in p.get("images", {}):
        scale = table[f"{name}_scale"].to_numpy() if f"{name}_scale" in table.columns else np.ones(len(table))
        arrays[name] = np.stack([_read_image_file(path / f, sc) for f, sc in zip(table[f"{name}_path"], scale)])
    if "h5ad_arrays" in p:
        import anndata

        a = anndata.read_h5ad(path / p["h5ad"])
        X = a.layers["counts"] if "counts" in a.layers else a.X
        first = p["h5ad_arrays"][0]
        arrays[first] = (X.toarray() if hasattr(X, "toarray") else np.asarray(X)).astype(np.float32)
        for k in p["h5ad_arrays"][1:]:
            arrays[k] = np.asarray(a.obsm[k])
    if "arrays" in p:  # runs written before images/h5ad parts existed
        with np.load(path / p["arrays"]) as z:
            arrays.update({k: z[k] for k in z.files})
    return arrays


def _clear_run(out: Path) -> None:
    """Remove a previous run's files (marker first); refuse to delete anything else."""
    files = [p for p in out.iterdir()]
    ours = [p for p in files if p.name in (MARKER, SIDECAR) or _PART.match(p.name)
            or (p.name.startswith(".") and p.name.endswith(".part"))]
    foreign = sorted(p.name for p in files if p not in ours)
    if foreign:
        raise MedCausalError(f"refusing to overwrite {str(out)!r}: it holds files that are not a "
                             f"simulation's: {foreign[:5]}")
    import shutil

    for p in sorted(ours, key=lambda p: p.name != MARKER):
        if p.is_dir():  # a chunk's image folder
            shutil.rmtree(p)
        else:
            p.unlink()


def _read_sidecar(path: Path) -> dict:
    try:
        meta = json.loads((path / SIDECAR).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {str(path / SIDECAR)!r}: {e}") from None
    if meta.get("format") != RUN_FORMAT:
        raise DataError(f"{str(path)!r} is not a medcausal simulation folder")
    return meta


def read_run(path: str | os.PathLike, allow_incomplete: bool = False):
    """Read a simulation folder written by :func:`simulate` (``out=``) back into one cohort.

    A run without its ``_SUCCESS`` marker is incomplete and is refused unless
    ``allow_incomplete=True`` (which reads its complete parts only).

    >>> import tempfile, medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> m = mc.CausalModel(sim.graph).fit(sim.sample(200, seed=0), max_epochs=1, verbose=False)
    >>> run = simulate(m, 250, seed=0, chunk_size=100, out=tempfile.mkdtemp() + "/run", format="csv")
    >>> run.parts, len(read_run(run.path))
    (['part-00000.csv', 'part-00001.csv', 'part-00002.csv'], 250)
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"simulation folder {str(path)!r} does not exist")
    if not (path / SIDECAR).is_file():
        raise DataError(f"{str(path)!r} has no {SIDECAR}: not a simulation folder")
    meta = _read_sidecar(path)
    if not (path / MARKER).is_file() and not allow_incomplete:
        raise DataError(f"simulation {str(path)!r} is incomplete (no {MARKER} marker): "
                        f"{len(meta.get('parts', []))} of {meta.get('n_chunks')} parts were written; "
                        "finish it with simulate(..., resume=True) or read it with allow_incomplete=True")
    parts = meta["parts"]
    if parts and all(p.get("container") == "anndata" for p in parts):
        import anndata

        return anndata.concat([anndata.read_h5ad(path / p["h5ad"]) for p in parts], merge="same",
                              uns_merge="first")
    frames, arrays = [], []
    cohort = any(p.get("container") == "cohort" or "arrays" in p for p in parts)
    for p in parts:
        f = path / p["file"]
        t = pd.read_parquet(f) if meta["part_format"] == "parquet" else pd.read_csv(f)
        if "id" in t.columns and not cohort:
            t = t.set_index("id")
        frames.append(t)
        if cohort:
            arrays.append(_read_part_arrays(path, p, t))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames)
    if cohort:
        return Cohort(table.reset_index(drop=True),
                      {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]},
                      id_column=parts[0].get("id_column", "id"))
    return table


# =========================================================================== #
# counterfactual twins
# =========================================================================== #
def _worlds(do, variables: Mapping | None = None) -> dict[str, dict]:
    """Normalize ``do`` into named worlds: a do mapping, a list of them, or {name: mapping}."""
    if do is None or isinstance(do, (Mapping, list, tuple)) and len(do) == 0:
        raise InterventionError("counterfactual_patients() needs at least one world (a non-empty do=)")
    if isinstance(do, Mapping) and all(isinstance(v, Mapping) for v in do.values()):
        worlds = {str(k): dict(v) for k, v in do.items()}
    elif isinstance(do, Mapping):
        if any(isinstance(v, Mapping) for v in do.values()):
            raise InterventionError("do= mixes worlds ({name: {var: value}}) and interventions "
                                    "({var: value}); use one form")
        worlds = {_world_name(do, variables): dict(do)}
    elif isinstance(do, (list, tuple)):
        worlds = {}
        for spec in do:
            if not isinstance(spec, Mapping):
                raise InterventionError(f"each world in a do= list must be a mapping, got {spec!r}")
            name = base = _world_name(spec, variables)
            k = 2
            while name in worlds:
                name, k = f"{base}#{k}", k + 1
            worlds[name] = dict(spec)
    else:
        raise InterventionError(f"do= must be a mapping, a list of mappings or {{world: mapping}}, got "
                                f"{type(do).__name__}")
    if not worlds:
        raise InterventionError("counterfactual_patients() needs at least one world (a non-empty do=)")
    for name, spec in worlds.items():
        if not name or "@" in name or name == "factual":
            raise InterventionError(f"world name {name!r} is not allowed (empty, contains '@', or 'factual')")
        if not spec:
            raise InterventionError(f"world {name!r} has no intervention")
    return worlds


def _world_name(do: Mapping, variables: Mapping | None = None) -> str:
    parts = []
    for k, v in do.items():
        kind = Intervention(k, v).kind
        if is_vector_value(k, v, variables):
            parts.append(f"{k}={[_plain(x) for x in np.asarray(v, dtype=float)]}")
            continue
        parts.append(f"{k}={_plain(np.asarray(v).item())}" if kind == "value"
                     else f"{k}=<array>" if kind == "array" else f"{k}={getattr(v, '__name__', 'f')}({k})")
    return ",".join(parts)


def counterfactual_patients(model, patients, do, *, seed: int | None = 0, id_column: str | None = None,
                            layout: str = "wide", outcomes: Sequence[str] | None = None):
    """Twin cohort: each patient's factual values beside their counterfactuals in one or more worlds.

    ``do`` is one intervention mapping (one world), a list of them, or a dict of named worlds
    ``{"treated": {"drug": 1}, "control": {"drug": 0}}``. Every world is answered by
    ``model.counterfactual`` (abduction -> action -> prediction) with the same ``seed``, so
    the discrete variables' sampled noise is shared by worlds that intervene on the same
    variables.

    ``layout="wide"`` (default): one row per patient: the id, the factual columns, then per
    world ``<column>@<world>`` for every column the world can change, and
    ``effect:<column>@<world>`` (counterfactual - factual) for scalar outcomes (continuous
    and binary ``outcomes``; default: the changed variables that were not intervened on).
    ``layout="long"``: one row per patient and world (``world="factual"`` first), the
    variables, and ``effect:<column>`` (empty on factual rows).

    Patient ids come from ``id_column`` (a column of ``patients``), else the Cohort's id
    column, else the index (named ``patient_id`` when it has no name). Cells (AnnData) come
    back as AnnData: the factual counts in ``layers["counts"]``, each world's counterfactual
    counts in ``layers["<expression>@<world>"]`` (long layout: one cell per row and world).

    >>> import medcausal as mc
    >>> sim = mc.synthetic.scm("chain")
    >>> model = mc.CausalModel(sim.graph).fit(sim.sample(300, seed=0), max_epochs=2, verbose=False)
    >>> twins = counterfactual_patients(model, sim.sample(3, seed=1),
    ...                                 do={"low": {"x1": -1.0}, "high": {"x1": 1.0}})
    >>> [c for c in twins.columns if "@high" in c]
    ['x1@high', 'x2@high', 'x3@high', 'effect:x2@high', 'effect:x3@high']
    """
    model._require_fit()
    if layout not in ("wide", "long"):
        raise MedCausalError(f"layout must be 'wide' or 'long', got {layout!r}")
    worlds = _worlds(do, model.graph.variables)
    graph = model.graph
    like = patients if _is_anndata(patients) else None  # cells: worked on as a Cohort, returned as AnnData
    patients = model._from_anndata(patients)
    for spec in worlds.values():
        parse_do(spec, graph.variables)
    table = _table(patients)
    if len(table) == 0:
        raise DataError("counterfactual_patients() got no patients (0 rows)")
    ids, id_name = _patient_ids(patients, id_column)
    keyed = patients  # rows labelled by the patients' ids: what keys their counterfactual noise
    if id_column is not None:  # a table keeps its id column (the output drops it below)
        keyed = (patients.set_axis(pd.Index(ids), axis=0) if isinstance(patients, pd.DataFrame)
                 else keyed_by_id(patients, id_column))
    cfs = {w: model.counterfactual(keyed, do=spec, seed=seed) for w, spec in worlds.items()}
    changed = {w: _affected(graph, spec) for w, spec in worlds.items()}
    if outcomes is not None:
        bad = [o for o in outcomes if o not in graph.variables]
        if bad:
            raise DataError(f"outcomes= names unknown variable(s) {bad}; known: {list(graph.variables)}")
        notscalar = [o for o in outcomes if graph.variables[o].kind not in ("continuous", "binary")]
        if notscalar:
            raise DataError(f"outcomes= {notscalar} are not scalar continuous/binary variables: "
                            "a per-patient difference is not defined for them")
    scalar = [v for v in graph.variables if graph.variables[v].kind in _SCALAR]
    effects = {w: [v for v in (outcomes if outcomes is not None else graph.topological_order)
                   if v in changed[w] and (outcomes is not None or v not in worlds[w])
                   and graph.variables[v].kind in ("continuous", "binary")] for w in worlds}
    factual = table.reset_index(drop=True)
    if id_column is not None or isinstance(patients, Cohort):
        factual = factual.drop(columns=[id_name])
    if layout == "wide":
        cols = {id_name: ids}
        cols.update({c: factual[c].to_numpy() for c in factual.columns})
        for w, cf in cfs.items():
            ct = _table(cf).reset_index(drop=True)
            for v in scalar:
                if v in changed[w]:
                    for c in columns_of(v, graph.variables[v]):
                        cols[f"{c}@{w}"] = ct[c].to_numpy()
            for v in effects[w]:
                for c in columns_of(v, graph.variables[v]):
                    cols[f"effect:{c}@{w}"] = (ct[c].to_numpy().astype(float)
                                               - factual[c].to_numpy().astype(float))
        out = pd.DataFrame(cols)
        if isinstance(patients, Cohort) or _has_arrays(cfs):
            arrays = dict(patients.arrays) if isinstance(patients, Cohort) else {}
            for w, cf in cfs.items():
                for name, arr in getattr(cf, "arrays", {}).items():
                    if name in changed[w]:
                        arrays[f"{name}@{w}"] = arr
            return _as_anndata_like(model, Cohort(out, arrays, id_column=id_name), like)
        return out
    # long layout
    all_effects = list(dict.fromkeys(c for w in worlds for v in effects[w]
                                     for c in columns_of(v, graph.variables[v])))
    frames = []
    base = factual.copy()
    base.insert(0, "world", "factual")
    base.insert(0, id_name, ids)
    for c in all_effects:
        base[f"effect:{c}"] = np.nan
    frames.append(base)
    for w, cf in cfs.items():
        ct = _table(cf).reset_index(drop=True)
        if id_column is not None or isinstance(patients, Cohort):
            ct = ct.drop(columns=[id_name])
        ct.insert(0, "world", w)
        ct.insert(0, id_name, ids)
        for c in all_effects:
            v = next(v for v in graph.variables if c in columns_of(v, graph.variables[v]))
            ct[f"effect:{c}"] = (ct[c].to_numpy().astype(float) - factual[c].to_numpy().astype(float)
                                 if v in effects[w] else np.nan)
        frames.append(ct)
    out = pd.concat(frames, ignore_index=True)
    if isinstance(patients, Cohort):
        arrays = {}
        for name in patients.arrays:
            arrays[name] = np.concatenate([patients.arrays[name]]
                                          + [cf.arrays.get(name, patients.arrays[name]) for cf in cfs.values()])
        return _as_anndata_like(model, Cohort(out, arrays, id_column=id_name), like)
    return out


def _as_anndata_like(model, result, like):
    """A Cohort result as AnnData when the input was one (``like``), scverse-style: the factual
    counts in ``X``/``layers["counts"]``, a world's counterfactual counts in ``layers["<gene>@<world>"]``,
    the table as ``.obs`` (the long layout's rows named ``<id>@<world>``), the report in ``.uns["medcausal"]``."""
    if like is None or not isinstance(result, Cohort):
        return result
    from scipy import sparse as scipy_sparse

    from .adapters.singlecell import cohort_to_anndata

    gene = next(v for v, t in model.graph.variables.items() if t.kind == "expression")
    table = result.table.copy()
    names = table[result.id_column].astype(str)
    if "world" in table.columns and names.duplicated().any():  # the long layout: one row per patient and world
        names = names + "@" + table["world"].astype(str)
    key = "_medcausal_obs_name"
    table[key] = names.to_numpy()
    adata = cohort_to_anndata(Cohort(table, result.arrays, id_column=key), expression=gene,
                              var_names=like.var_names)
    del adata.obs[key]
    _h5ad_safe(adata)  # storable as it is: no None in the obs, the report's lists as JSON text
    adata.uns["medcausal_cohort"]["id_column"] = result.id_column
    for name in list(adata.obsm):
        if name.startswith(f"{gene}@"):
            adata.layers[name] = scipy_sparse.csr_matrix(np.asarray(adata.obsm[name], dtype=np.float32))
            del adata.obsm[name]
    if result.table.attrs.get("medcausal"):
        adata.uns["medcausal"] = _h5_storable(result.table.attrs["medcausal"])
    return adata


def _has_arrays(cfs) -> bool:
    return any(isinstance(cf, Cohort) and cf.arrays for cf in cfs.values())


def _affected(graph, spec: Mapping) -> set[str]:
    return set(spec).union(*(graph.descendants(v) for v in spec))


def _patient_ids(patients, id_column):
    table = _table(patients)
    if id_column is not None:
        if id_column not in table.columns:
            raise DataError(f"id_column={id_column!r} is not a column; columns: {list(table.columns)}")
        ids = table[id_column].to_numpy()
        name = id_column
    elif isinstance(patients, Cohort):
        ids, name = patients.ids, patients.id_column
    else:
        ids, name = table.index.to_numpy(), table.index.name or "patient_id"
        if name in table.columns:
            raise DataError(f"the index name {name!r} is also a column; pass id_column=")
    if pd.Series(ids).duplicated().any():
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].unique()[:3].tolist()
        raise DataError(f"patient ids are not unique, e.g. {dup}; pass id_column= with unique ids")
    return ids, name


# =========================================================================== #
# augment
# =========================================================================== #
def _equalities(model, w: _Where) -> dict[str, Any]:
    """``{var: value}`` for the ``var == literal`` conjuncts of a condition."""
    try:
        expr, placeholders = _parse_expr(w.text)
    except SyntaxError:
        return {}
    tree = expr.body
    conj = tree.values if isinstance(tree, ast.BoolOp) and isinstance(tree.op, ast.And) else [tree]
    if isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.BitAnd):
        conj, stack = [], [tree]
        while stack:
            t = stack.pop()
            if isinstance(t, ast.BinOp) and isinstance(t.op, ast.BitAnd):
                stack += [t.left, t.right]
            else:
                conj.append(t)
    out = {}
    for c in conj:
        if isinstance(c, ast.Compare) and len(c.ops) == 1 and isinstance(c.ops[0], ast.Eq):
            a, b = c.left, c.comparators[0]
            if isinstance(b, ast.Name):
                a, b = b, a
            name = placeholders.get(a.id, a.id) if isinstance(a, ast.Name) else None
            if name in model.graph.variables:
                try:
                    out[name] = ast.literal_eval(b)
                except (ValueError, SyntaxError, TypeError):
                    continue
    return out


def _literal(v) -> str:
    return repr(_plain(v))


def augment(model, cohort, target: str, n: int | None = None, *, strategy: str = "sample",
            do: Mapping[str, Any] | None = None, source: str | None = None, seed: int | None = None,
            min_acceptance: float = 1e-3, progress: bool | None = None):
    """Grow a scarce subgroup, or rebalance a label, with synthetic patients from ``model``.

    ``target`` is either

    - a condition (pandas query, e.g. ``"sex == 'F' and disease == 1"``): the subgroup grows
      to ``n`` rows (real + synthetic); or
    - the name of a binary/categorical variable: every class grows to ``n`` rows
      (default: the size of the largest class), i.e. the label is rebalanced.

    ``strategy``:

    - ``"sample"``: new patients drawn from the model within the subgroup (:func:`simulate`
      with ``where=``);
    - ``"transport"``: real patients from outside the subgroup (optionally only those
      matching ``source``) moved into it counterfactually: ``do`` (default: the
      ``var == value`` parts of the condition, e.g. ``do(disease=1)`` on real controls).
      Transported patients that still miss the condition are dropped (the acceptance rate
      is reported); the real pool is used without replacement first;
    - ``"mixed"``: half of each.

    Returns the cohort with the synthetic rows appended: real rows get ``synthetic=False``,
    synthetic rows ``synthetic=True`` and the provenance columns (``PROVENANCE_COLUMNS``);
    columns that are not model variables are left empty on synthetic rows. A report is in
    ``attrs["medcausal"]`` of the returned table. Cells (AnnData) come back as AnnData,
    synthetic cells' counts in ``layers["counts"]`` and the report in ``.uns["medcausal"]``.

    >>> import medcausal as mc, numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> sex = (rng.random(400) < 0.2).astype(int)
    >>> df = pd.DataFrame({"sex": sex, "bp": 120 + 8 * sex + rng.normal(0, 5, 400)})
    >>> g = mc.CausalGraph({"sex": "binary", "bp": "continuous"}, edges=[("sex", "bp")])
    >>> model = mc.CausalModel(g).fit(df, max_epochs=2, verbose=False)
    >>> aug = augment(model, df, target="sex == 1", n=200, strategy="transport", seed=0)
    >>> int((aug["sex"] == 1).sum()), int(aug["synthetic"].sum()) == 200 - int(df["sex"].sum())
    (200, True)
    >>> aug.loc[aug["synthetic"], ["synth_strategy", "synth_do"]].iloc[0].tolist()
    ['transport', '{"sex": 1}']
    """
    model._require_fit()
    if strategy not in ("sample", "transport", "mixed"):
        raise MedCausalError(f"strategy must be 'sample', 'transport' or 'mixed', got {strategy!r}")
    if n is not None:
        n = _check_n(n)
    if not 0.0 < float(min_acceptance) <= 1.0:
        raise MedCausalError(f"min_acceptance must be in (0, 1], got {min_acceptance}")
    like = cohort if _is_anndata(cohort) else None  # cells: worked on as a Cohort, returned as AnnData
    cohort = model._from_anndata(cohort)
    table = _table(cohort)
    check_columns(cohort, model.graph)
    run_seed = _new_seed(seed)
    key = model_id(model)
    eps = _epsilon(model)
    src = _parse_where(model, source, "source") if source is not None else None
    # -- what to grow -------------------------------------------------------
    if target in model.graph.variables and model.graph.variables[target].kind in _DISCRETE:
        counts = {c: int((table[target].to_numpy() == c).sum()) for c in _decoded_support(model, target)}
        size = n if n is not None else max(counts.values())
        tasks = [(f"`{target}` == {_literal(c)}", size - k) for c, k in counts.items()]
        mode = "rebalance"
        if do is not None:
            raise InterventionError(f"do= cannot be combined with rebalancing {target!r}: each class is "
                                    f"reached by its own do({target}=class)")
    else:
        if n is None:
            raise DataError(f"augment(target={target!r}) needs n= (the subgroup's size after augmentation)")
        w = _parse_where(model, target, "target")
        have = int(w.mask(table).sum())
        tasks = [(target, n - have)]
        mode = "subgroup"
    if strategy == "sample" and (do is not None or source is not None):
        opt = "do=" if do is not None else "source="
        raise (InterventionError if do is not None else DataError)(
            f"augment: {opt} applies to transported patients, but strategy='sample' transports none; "
            "use strategy='transport' or 'mixed' (or simulate(model, n, do=..., where=...) to sample "
            "under an intervention)")
    privacy = _privacy_summary(model)
    if privacy is not None:
        privacy["covers"] = ("every synthetic row (sampled from the private model)" if strategy == "sample" else
                             "the sampled rows only: transported rows are counterfactuals of real patients and "
                             "reveal them (privacy/PRIVACY.md section 3; their synth_epsilon is empty)")
    report = {"target": target, "mode": mode, "strategy": strategy, "seed": run_seed, "model_id": key,
              "epsilon": eps, "privacy": privacy, "groups": []}
    pieces = []
    next_id = _id_source(cohort)
    for t, (cond, k) in enumerate(tasks):
        entry = {"subgroup": cond, "real": int(_parse_where(model, cond, "target").mask(table).sum()),
                 "added": 0}
        report["groups"].append(entry)
        if k <= 0:
            continue
        w = _parse_where(model, cond, "target")
        k_sample = k if strategy == "sample" else k // 2 if strategy == "mixed" else 0
        k_move = k - k_sample
        tseed = _child_seed(run_seed, t)
        if k_sample:
            s = model._from_anndata(simulate(model, k_sample, where=cond, seed=_child_seed(tseed, 0),
                                             provenance=False, min_acceptance=min_acceptance, progress=progress))
            entry["sample"] = {kk: v for kk, v in _attrs(s).items() if kk in (
                "method", "acceptance_rate", "subgroup_probability")}
            _assign(s, _provenance(k_sample, model_key=key, strategy="sample", do=None, where=cond,
                                   seed=_child_seed(tseed, 0), epsilon=eps))
            pieces.append(_only_variables(model, s))
        if k_move:
            moved, info = _transport(model, cohort, w, src, k_move, do, _child_seed(tseed, 1),
                                     min_acceptance, key, eps)
            entry["transport"] = info
            pieces.append(moved)
        entry["added"] = k
    report["added"] = int(sum(g["added"] for g in report["groups"]))
    return _as_anndata_like(model, _append_synthetic(cohort, pieces, next_id, report), like)


def _attrs(data) -> dict:
    return dict(_table(data).attrs.get("medcausal", {}))


def _only_variables(model, data):
    cols = [c for v, t in model.graph.variables.items() if t.kind in _SCALAR for c in columns_of(v, t)]
    keep = cols + [c for c in PROVENANCE_COLUMNS if c in _table(data).columns]
    if isinstance(data, Cohort):
        return Cohort(data.table[[data.id_column] + keep], data.arrays, id_column=data.id_column)
    return data[keep]


def _transport(model, cohort, w: _Where, src: _Where | None, k: int, do, seed: int, min_acceptance,
               key, eps):
    table = _table(cohort)
    spec = dict(do) if do is not None else _equalities(model, w)
    if not spec:
        raise MedCausalError(f"cannot derive an intervention from target={w.text!r} (it has no "
                             "'variable == value' part); pass do= explicitly")
    for name, iv in parse_do(spec, model.graph.variables).items():
        if iv.kind == "array" and not is_vector_value(name, iv.spec, model.graph.variables):
            raise InterventionError(f"do[{name!r}] is a per-row array; transport picks patients at random, "
                                    "so give a value or a callable")
    pool_mask = ~w.mask(table)
    pool_mask &= ~_synthetic_flag(table)  # transport real patients only, never earlier synthetic ones
    if src is not None:
        pool_mask &= src.mask(table)
    pool = np.flatnonzero(pool_mask)
    if len(pool) == 0:
        raise DataError(f"no real patient outside target={w.text!r}"
                        + (f" and matching source={src.text!r}" if src else "") + " to transport")
    ids = cohort.ids if isinstance(cohort, Cohort) else table.index.to_numpy()  # what synth_source names
    if pd.Series(ids).duplicated().any():
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].unique()[:3].tolist()
        raise DataError(f"augment(strategy={'transport'!r}) names each row's source patient (synth_source) by "
                        f"{'the Cohort ids' if isinstance(cohort, Cohort) else 'the index'}, which repeats, "
                        f"e.g. {dup}; give the rows unique ids (e.g. df.reset_index(drop=True))")
    rng = np.random.default_rng(seed)
    order = rng.permutation(pool)
    kept, got, drawn, accepted, rounds, pos = [], 0, 0, 0, 0, 0
    reused = False
    while got < k:
        rate = max(accepted / drawn, min_acceptance) if drawn else 1.0
        want = int(math.ceil((k - got) / rate * 1.1)) if drawn else k - got
        if pos < len(order):
            idx = order[pos:pos + want]
            pos += len(idx)
        else:
            reused = True
            idx = rng.choice(pool, size=want, replace=True)
        rows = _take(cohort, idx)
        cf = model.counterfactual(rows, do=spec, seed=_child_seed(seed, rounds))
        mask = w.mask(_table(cf))
        drawn += len(idx)
        accepted += int(mask.sum())
        if drawn >= min(len(pool), 1000) and accepted / drawn < min_acceptance:
            do_text = _do_text(spec, model.graph.variables)
            raise MedCausalError(
                f"transport into target={w.text!r} with do={do_text}: only {accepted} of {drawn} "
                "transported patients satisfy the target; pass a do= that moves patients into it "
                "(or a source= closer to it)" if accepted else
                f"transport into target={w.text!r} with do={do_text}: none of {drawn} transported "
                "patients satisfies the target; pass a do= that moves patients into it")
        sel = np.flatnonzero(mask)[: k - got]
        part = _only_variables(model, _take(cf, sel))
        _assign(part, _provenance(len(sel), model_key=key, strategy="transport", do=spec, where=w.text,
                                  seed=seed, epsilon=eps, source=ids[idx[sel]], variables=model.graph.variables))
        kept.append(part)
        got += len(sel)
        rounds += 1
    if reused:
        warn(f"augment: only {len(pool)} real patients could be transported into {w.text!r} for "
             f"{k} synthetic rows; some were transported more than once (see synth_source)",
             UserWarning)
    return _concat(kept), {"do": _describe_do(spec, model.graph.variables), "acceptance_rate": accepted / drawn,
                           "drawn": drawn,
                           "pool": int(len(pool)), "reused_patients": reused}


def _id_source(cohort) -> Callable[[int], np.ndarray]:
    """New ids for ``k`` synthetic rows: integers after the largest id, else ``syn-<i>`` strings."""
    if isinstance(cohort, Cohort):
        ids = pd.Index(cohort.ids)
    else:
        ids = cohort.index
    state = {"next": 0}
    if pd.api.types.is_integer_dtype(ids.dtype):
        state["next"] = int(ids.max()) + 1 if len(ids) else 0

        def take(k):
            out = np.arange(state["next"], state["next"] + k)
            state["next"] += k
            return out
    else:  # after the syn-<i> ids of an earlier augmentation, so that ids stay unique
        taken = [re.fullmatch(r"syn-(\d+)", str(i)) for i in ids]
        state["next"] = max((int(t.group(1)) + 1 for t in taken if t), default=0)

        def take(k):
            out = np.array([f"syn-{state['next'] + i}" for i in range(k)], dtype=object)
            state["next"] += k
            return out
    return take


def _nullable_int(col: pd.Series) -> pd.Series:
    """An object column of integers and None as pandas' nullable Int64 (as is, if not all integers)."""
    values = col.dropna()
    if len(values) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return col.astype("Int64")
    return col


def _synthetic_flag(table: pd.DataFrame) -> np.ndarray:
    """The ``synthetic`` column as booleans; a missing flag is a real row (real data
    concatenated with earlier synthetic output has NaN there), no column: all real."""
    if "synthetic" not in table.columns:
        return np.zeros(len(table), dtype=bool)
    if table["synthetic"].dtype == bool:  # the common case, without a Python loop
        return table["synthetic"].to_numpy()
    col = table["synthetic"].astype(object).where(table["synthetic"].notna(), False)
    text = {"true": True, "1": True, "false": False, "0": False, "": False}  # as a CSV may hold it
    return np.array([text.get(v.strip().lower(), True) if isinstance(v, str) else bool(v) for v in col],
                    dtype=bool)


def _append_synthetic(cohort, pieces, next_id, report):
    table = _table(cohort)
    real = table.copy()
    if "synthetic" not in real.columns:
        real["synthetic"] = False
    for c in PROVENANCE_COLUMNS[1:]:
        if c not in real.columns:
            real[c] = np.nan if c == "synth_epsilon" else None
    if not pieces:
        real.attrs["medcausal"] = report
        return Cohort(real, cohort.arrays, id_column=cohort.id_column) if isinstance(cohort, Cohort) else real
    syn = _concat(pieces)
    syn_t = _table(syn).copy()
    new_ids = next_id(len(syn_t))
    if isinstance(cohort, Cohort):
        if isinstance(syn, Cohort) and syn.id_column != cohort.id_column:
            syn_t = syn_t.drop(columns=[syn.id_column])  # the pieces' own ids give way to the cohort's
        syn_t[cohort.id_column] = new_ids
    else:
        syn_t.index = pd.Index(new_ids, name=table.index.name)
    for c in syn_t.columns:
        if c in real.columns and c not in PROVENANCE_COLUMNS:
            syn_t[c] = _like_dtype(syn_t[c], real[c])
    combined = pd.concat([real, syn_t])
    combined = combined[list(real.columns) + [c for c in combined.columns if c not in real.columns]]
    combined["synthetic"] = _synthetic_flag(combined)
    for c in ("synth_seed", "synth_source"):  # None on real rows: keep integers exact (not float64)
        combined[c] = _nullable_int(combined[c])
    combined.attrs["medcausal"] = report
    if isinstance(cohort, Cohort):
        arrays = {}
        for name, arr in cohort.arrays.items():
            extra = syn.arrays.get(name) if isinstance(syn, Cohort) else None
            if extra is None:
                raise CapabilityError(f"augment: synthetic rows have no array {name!r}; image/expression "
                                      "augmentation needs a model with a mechanism for it")
            arrays[name] = np.concatenate([arr, extra])
        return Cohort(combined.reset_index(drop=True), arrays, id_column=cohort.id_column)
    return combined


def _like_dtype(col: pd.Series, ref: pd.Series) -> pd.Series:
    try:
        if ref.dtype == bool:
            return col.astype(int).astype(bool)
        if pd.api.types.is_integer_dtype(ref.dtype) and pd.api.types.is_integer_dtype(col.dtype):
            return col.astype(ref.dtype)
        if isinstance(ref.dtype, pd.CategoricalDtype):
            return col.astype(ref.dtype)
    except (TypeError, ValueError):
        pass
    return col


# =========================================================================== #
# evaluate_augmentation
# =========================================================================== #
_METRICS: dict[str, tuple[str, bool]] = {  # name -> (needs "proba" or "pred", higher is better)
    "roc_auc": ("proba", True), "average_precision": ("proba", True), "accuracy": ("pred", True),
    "balanced_accuracy": ("pred", True), "f1": ("pred", True), "r2": ("pred", True),
    "mae": ("pred", False), "rmse": ("pred", False)}


def _metric_fn(name: str, pos_label=None):
    from sklearn import metrics as skm

    return {"roc_auc": skm.roc_auc_score, "average_precision": skm.average_precision_score,
            "accuracy": skm.accuracy_score, "balanced_accuracy": skm.balanced_accuracy_score,
            "f1": lambda y, p: skm.f1_score(y, p, pos_label=pos_label, zero_division=0.0), "r2": skm.r2_score,
            "mae": skm.mean_absolute_error,
            "rmse": lambda y, p: float(np.sqrt(skm.mean_squared_error(y, p)))}[name]


def _default_estimator(task: str, X: pd.DataFrame):
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline

    final = LogisticRegression(max_iter=2000) if task == "classification" else Ridge(alpha=1.0)
    return make_pipeline(_preprocessor(X), final)


def _preprocessor(X: pd.DataFrame):
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    cat = [c for c in X.columns if not pd.api.types.is_numeric_dtype(X[c]) or X[c].dtype == bool]
    num = [c for c in X.columns if c not in cat]
    return ColumnTransformer([("num", StandardScaler(), num),
                              ("cat", OneHotEncoder(handle_unknown="ignore"), cat)])


class ImageClassifier:
    """A small torch CNN with the scikit-learn classifier interface, for image arrays.

    ``fit(X, y)`` takes ``X`` as ``[n, C, H, W]`` (2D scans) or ``[n, C, D, H, W]`` (3D);
    ``predict_proba`` / ``predict`` return class probabilities / labels. Architecture:
    per entry of ``channels`` a 3x3 convolution, batch norm, ReLU and 2x max-pooling,
    then global average pooling and a linear layer; cross-entropy, Adam. Inputs are
    standardized per channel with the training set's mean and sd. Training runs
    ``steps`` optimizer steps when given (the same budget whatever the training-set
    size: the fair setting for comparing training sets of different sizes), else
    ``epochs`` passes. Deterministic for a given ``seed`` and thread count.
    :func:`evaluate_augmentation` uses it (with ``seed``) for image features.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 64); X = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
    >>> X[:, :, 2:6, 2:6] += 2.0 * y[:, None, None, None]     # a bright square in class 1
    >>> clf = ImageClassifier(channels=(4,), steps=60, seed=0).fit(X, y)
    >>> float((clf.predict(X) == y).mean()) > 0.9
    True
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), epochs: int = 20, steps: int | None = None,
                 batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0):
        self.channels, self.epochs, self.steps, self.batch_size = channels, epochs, steps, batch_size
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed

    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in ("channels", "epochs", "steps", "batch_size", "lr",
                                              "weight_decay", "seed")}

    def set_params(self, **params) -> "ImageClassifier":
        for k, v in params.items():
            if k not in self.get_params():
                raise MedCausalError(f"ImageClassifier has no parameter {k!r}")
            setattr(self, k, v)
        return self

    def _net(self, C: int, dims: int, n_classes: int):
        from torch import nn

        conv, bn, pool = ((nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if dims == 2
                          else (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d))
        layers, c_in = [], C
        for c in self.channels:
            layers += [conv(c_in, int(c), 3, padding=1), bn(int(c)), nn.ReLU(), pool(2, ceil_mode=True)]
            c_in = int(c)
        layers += [nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                   nn.Linear(c_in, n_classes)]
        return nn.Sequential(*layers)

    def _prep(self, X) -> torch.Tensor:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim not in (4, 5):
            raise DataError(f"ImageClassifier needs images [n, C, H, W] or [n, C, D, H, W], got shape {X.shape}")
        if hasattr(self, "shape_") and X.shape[1:] != self.shape_:
            raise DataError(f"ImageClassifier was fitted on images of shape {self.shape_}, got {X.shape[1:]}")
        return (torch.from_numpy(X) - self.mean_) / self.sd_

    def fit(self, X, y) -> "ImageClassifier":
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim not in (4, 5):
            raise DataError(f"ImageClassifier needs images [n, C, H, W] or [n, C, D, H, W], got shape {X.shape}")
        if len(X) != len(y):
            raise DataError(f"ImageClassifier.fit: {len(X)} images but {len(y)} labels")
        if not np.isfinite(X).all():
            raise DataError("ImageClassifier.fit: the images have non-finite values")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DataError(f"ImageClassifier.fit needs at least two classes, got {self.classes_.tolist()}")
        axes = (0,) + tuple(range(2, X.ndim))
        self.shape_ = X.shape[1:]
        self.mean_ = torch.from_numpy(X.mean(axis=axes, keepdims=True)[0:1])
        self.sd_ = torch.from_numpy(X.std(axis=axes, keepdims=True)[0:1] + 1e-6)
        Xt, yt = self._prep(X), torch.from_numpy(codes.astype(np.int64))
        rng = np.random.default_rng(self.seed)
        with forked_rng(seed=self.seed):  # its initial weights; the caller's random state is kept
            self.net_ = self._net(X.shape[1], X.ndim - 2, len(self.classes_))
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        bs = max(2, min(int(self.batch_size), len(X)))
        per_epoch = max(1, len(X) // bs)  # full batches only (batch norm needs > 1 row)
        total = int(self.steps) if self.steps is not None else int(self.epochs) * per_epoch
        self.net_.train()
        step = 0
        while step < total:
            order = rng.permutation(len(X))
            for b in range(per_epoch):
                if step >= total:
                    break
                idx = torch.from_numpy(order[b * bs:(b + 1) * bs])
                loss = torch.nn.functional.cross_entropy(self.net_(Xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        self.net_.eval()
        self.n_steps_ = step
        return self

    def predict_proba(self, X) -> np.ndarray:
        if not hasattr(self, "net_"):
            raise MedCausalError("ImageClassifier is not fitted; call fit(X, y) first")
        Xt = self._prep(X)
        with torch.no_grad():
            out = [torch.softmax(self.net_(Xt[s:s + 256]), dim=1) for s in range(0, len(Xt), 256)]
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, len(self.classes_)))

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


def _image_feature(train, test, features) -> str | None:
    """The image array the downstream model trains on, or None for tabular features."""
    arrays = {k: v for k, v in (test.arrays.items() if isinstance(test, Cohort) else [])}
    if features is None:
        imgs = [k for k, v in arrays.items() if np.ndim(v) >= 4
                and isinstance(train, Cohort) and k in train.arrays]
        if len(imgs) > 1:
            raise DataError(f"the cohorts hold several image arrays {imgs}; pick one with features=[name]")
        return imgs[0] if imgs else None
    feats = list(features)
    named = [f for f in feats if f in arrays or isinstance(train, Cohort) and f in train.arrays]
    if not named:
        return None
    if len(feats) > 1:
        raise CapabilityError(f"features {feats} mix image array(s) {named} with other features; the image "
                              "path trains on one image array alone")
    for nm, t in (("train", train), ("test", test)):
        if not (isinstance(t, Cohort) and named[0] in t.arrays):
            raise DataError(f"image feature {named[0]!r} is not an array of {nm}")
    if np.ndim(arrays[named[0]]) < 4:
        raise CapabilityError(f"array {named[0]!r} has shape {np.shape(arrays[named[0]])}; the torch classifier "
                              "takes images [n, C, H, W] or [n, C, D, H, W]")
    return named[0]


def evaluate_augmentation(train, test, label: str, *, synthetic=None, features: Sequence[str] | None = None,
                          estimator=None, subgroups: str | Sequence[str] | Mapping[str, str] | None = None,
                          metric: str | None = None, task: str | None = None, n_boot: int = 1000,
                          ci: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Does synthetic data help a downstream model? Train on real, real+synthetic, synthetic only.

    ``train`` is the real training cohort, or an augmented one (its ``synthetic=True`` rows
    are then the synthetic set). ``synthetic`` is a synthetic table or a dict of named
    ones (``{"sample": ..., "transport": ...}``; only rows flagged ``synthetic`` are used
    when the table has that column). ``test`` is held-out *real* data. For every
    synthetic set ``s`` the conditions are ``real``, ``real+s`` and ``s`` (synthetic only);
    each trains a fresh clone of ``estimator`` (default: standardized/one-hot features into
    a logistic regression, or ridge regression) on ``features`` (default: the columns
    shared by train and test, minus the label, the provenance and id columns).

    Images: when ``features`` names one image array of :class:`~medcausal.Cohort` inputs
    (``features=["mri"]``), or is ``None`` and train and test share exactly one image
    array, each condition trains a fresh :class:`ImageClassifier` (a small torch CNN,
    seeded with ``seed``; pass ``estimator=ImageClassifier(steps=..., ...)`` to set it)
    on that array; synthetic sets must then be Cohorts holding the array too.

    Scores on the test rows of each subgroup (``subgroups``: a condition, a list, or
    ``{name: condition}``; ``"all"`` is always there). ``metric``: ``roc_auc`` (binary
    default), ``balanced_accuracy`` (multiclass default), ``r2`` (regression default),
    ``average_precision``, ``accuracy``, ``f1``, ``mae``, ``rmse``. ``gain`` is the
    improvement over ``real`` (positive = better, also for errors), with a paired
    percentile bootstrap over test patients (``n_boot`` resamples, level ``ci``); the CI
    covers test-set sampling, not retraining variability.

    Returns one row per (subgroup, condition).

    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> def cohort(n):
    ...     x = rng.normal(size=n); return pd.DataFrame({"x": x, "y": (x + rng.normal(size=n) > 0).astype(int)})
    >>> res = evaluate_augmentation(cohort(200), cohort(300), "y", synthetic=cohort(200), n_boot=50)
    >>> res[["condition", "n_train_real", "n_train_synthetic"]].values.tolist()
    [['real', 200, 0], ['real+synthetic', 200, 200], ['synthetic', 0, 200]]
    """
    from sklearn.base import clone

    if not 0.0 < float(ci) < 1.0:
        raise MedCausalError(f"ci is a level in (0, 1), e.g. 0.95; got {ci}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise MedCausalError(f"n_boot must be a positive integer, got {n_boot!r}")
    train_t, test_t = _table(train), _table(test)
    for name, t in (("train", train_t), ("test", test_t)):
        if label not in t.columns:
            raise DataError(f"label {label!r} is not a column of {name}; columns: {list(t.columns)}")
    if _synthetic_flag(test_t).any():
        raise DataError("test= holds synthetic rows (synthetic=True); evaluate on held-out real data only")
    img = _image_feature(train, test, features)  # an image array: the torch classifier path
    arr: dict[str, np.ndarray] = {}  # image arrays of the real set and of each synthetic set
    # -- split real / synthetic sets -----------------------------------------
    if "synthetic" in train_t.columns:
        flag = _synthetic_flag(train_t)
        real = train_t.loc[~flag]
        if img is not None:
            arr["real"] = train.arrays[img][~flag]
        if synthetic is None and flag.any():
            synthetic = {"synthetic": train[flag] if img is not None else train_t.loc[flag]}
    else:
        real = train_t
        if img is not None:
            arr["real"] = train.arrays[img]
    if synthetic is None:
        synthetic = {}
    elif not isinstance(synthetic, Mapping):
        synthetic = {"synthetic": synthetic}
    syn_sets = {}
    for name, s in synthetic.items():
        st = _table(s)
        keep = _synthetic_flag(st) if "synthetic" in st.columns else np.ones(len(st), bool)
        st = st.loc[keep]
        if label not in st.columns:
            raise DataError(f"synthetic set {name!r} has no label column {label!r}")
        if img is not None:
            if not (isinstance(s, Cohort) and img in s.arrays):
                raise DataError(f"synthetic set {name!r} has no image array {img!r} (pass a medcausal Cohort)")
            arr[f"syn:{name}"] = s.arrays[img][keep]
        syn_sets[str(name)] = st
    if len(real) == 0:
        raise DataError("train= has no real rows")
    # -- features, task, metric ------------------------------------------------
    drop = {label, *PROVENANCE_COLUMNS}
    for t in (train, test):
        if isinstance(t, Cohort):
            drop.add(t.id_column)
    if img is not None:
        features = []  # the image array alone; checked by _image_feature
    elif features is None:
        features = [c for c in test_t.columns if c in real.columns and c not in drop]
        # a column the model does not generate is empty on synthetic rows (augment leaves it NaN)
        empty = [c for c in features if any(c in st.columns and len(st) and st[c].isna().all()
                                            for st in syn_sets.values())]
        if empty:
            warn(f"evaluate_augmentation: feature column(s) {empty} are empty on the synthetic rows "
                 "(not variables of the model), so they are left out; pass features= to choose", UserWarning)
            features = [c for c in features if c not in empty]
    features = list(features)
    missing = {nm: [c for c in features if c not in t.columns]
               for nm, t in [("train", real), ("test", test_t), *syn_sets.items()]}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        raise DataError(f"feature column(s) missing: {missing}")
    if not features and img is None:
        raise DataError("no feature columns to train on; pass features=")
    y_all = pd.concat([real[label], test_t[label]])
    if task is None:
        numeric = pd.api.types.is_numeric_dtype(y_all) and y_all.dtype != bool
        task = ("classification" if not numeric or (pd.api.types.is_integer_dtype(y_all) and y_all.nunique() <= 20)
                else "regression")
    if task not in ("classification", "regression"):
        raise MedCausalError(f"task must be 'classification' or 'regression', got {task!r}")
    if img is not None and task != "classification" and estimator is None:
        raise CapabilityError(f"image feature {img!r}: the built-in torch model is a classifier; label "
                              f"{label!r} is a regression target (pass estimator= with fit(X, y)/predict on arrays)")
    classes = sorted(pd.unique(y_all), key=lambda v: (str(type(v)), v)) if task == "classification" else None
    if metric is None:
        metric = ("roc_auc" if len(classes) == 2 else "balanced_accuracy") if task == "classification" else "r2"
    if metric not in _METRICS:
        raise MedCausalError(f"unknown metric {metric!r}; known: {sorted(_METRICS)}")
    needs, higher = _METRICS[metric]
    regression_metric = metric in ("r2", "mae", "rmse")
    if (task == "regression") != regression_metric:
        raise MedCausalError(f"metric {metric!r} does not fit a {task} task")
    if (needs == "proba" or metric == "f1") and len(classes) != 2:
        raise MedCausalError(f"metric {metric!r} needs a binary label; {label!r} has classes {classes}")
    pos = classes[-1] if classes is not None and len(classes) == 2 else None
    score_fn = _metric_fn(metric, pos)
    # -- subgroups -----------------------------------------------------------
    groups = {"all": None}
    if isinstance(subgroups, str):
        groups[subgroups] = subgroups
    elif isinstance(subgroups, Mapping):
        groups.update({str(k): v for k, v in subgroups.items()})
    elif subgroups is not None:
        groups.update({str(s): s for s in subgroups})

    def in_group(t: pd.DataFrame, cond) -> np.ndarray:
        if cond is None:
            return np.ones(len(t), dtype=bool)
        try:
            res = np.asarray(t.eval(cond, engine="python"))
        except Exception as e:
            raise DataError(f"subgroup {cond!r} cannot be evaluated: {type(e).__name__}: {e}") from None
        if res.dtype != bool:
            raise DataError(f"subgroup {cond!r} is not a condition")
        return res

    # -- train every condition -------------------------------------------------
    conditions = {"real": (real, None, len(real))}  # name -> (rows, synthetic set, real rows in it)
    images = {"real": arr.get("real")}  # name -> the image array of those rows (image path)
    for name, st in syn_sets.items():
        conditions[f"real+{name}"] = (pd.concat([real, st], ignore_index=True), name, len(real))
        conditions[name] = (st, name, 0)
        if img is not None:
            images[f"real+{name}"] = np.concatenate([arr["real"], arr[f"syn:{name}"]])
            images[name] = arr[f"syn:{name}"]
    X_test = test.arrays[img] if img is not None else test_t[features]
    preds, notes = {}, {}
    for cond, (data, sname, _) in conditions.items():
        if img is not None:
            est = (clone(estimator) if estimator is not None and hasattr(estimator, "get_params")
                   else estimator if estimator is not None else ImageClassifier(seed=seed))
        else:
            est = clone(estimator) if estimator is not None else _default_estimator(task, real[features])
        if img is None and estimator is not None and any(not pd.api.types.is_numeric_dtype(real[c])
                                                         for c in features):
            from sklearn.pipeline import make_pipeline
            est = make_pipeline(_preprocessor(real[features]), est)
        y = data[label]
        if len(data) == 0 or task == "classification" and y.nunique() < 2:
            preds[cond], notes[cond] = None, (f"cannot train: {len(data)} rows, classes "
                                              f"{sorted(pd.unique(y).tolist())}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            est.fit(images[cond] if img is not None else data[features], y.to_numpy() if img is not None else y)
        if needs == "proba":
            proba = est.predict_proba(X_test)
            cls = list(est.classes_)
            preds[cond] = proba[:, cls.index(pos)] if pos in cls else None
        else:
            preds[cond] = est.predict(X_test)
    # -- score, with a paired bootstrap over test patients ---------------------
    rng = np.random.default_rng(seed)
    alpha = (1 - ci) / 2
    y_test = test_t[label].to_numpy()
    if needs == "proba":
        y_test = (y_test == pos).astype(int)
    rows = []

    def safe(y, p):
        if needs == "proba" and len(np.unique(y)) < 2:
            return np.nan
        try:
            return float(score_fn(y, p))
        except ValueError:
            return np.nan

    for gname, cond in groups.items():
        idx = np.flatnonzero(in_group(test_t, cond))
        boots = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        yt = y_test[idx]
        base = preds.get("real")
        base_b = _boot_scores(metric, score_fn, yt, base[idx], boots) if base is not None else np.full(n_boot, np.nan)
        real_score = safe(yt, base[idx]) if base is not None and len(idx) else np.nan
        for cname, (data, sname, n_real) in conditions.items():
            p = preds[cname]
            score = safe(yt, p[idx]) if p is not None and len(idx) else np.nan
            sb = _boot_scores(metric, score_fn, yt, p[idx], boots) if p is not None else np.full(n_boot, np.nan)
            gain_b = (sb - base_b) if higher else (base_b - sb)
            gain = (score - real_score) if higher else (real_score - score)
            n_syn = len(syn_sets[sname]) if sname is not None else 0
            rows.append({
                "subgroup": gname, "condition": cname, "metric": metric, "score": score,
                "score_low": _pct(sb, alpha), "score_high": _pct(sb, 1 - alpha),
                "gain": gain, "gain_low": _pct(gain_b, alpha), "gain_high": _pct(gain_b, 1 - alpha),
                "n_test": int(len(idx)), "n_train_real": n_real, "n_train_synthetic": n_syn,
                "n_train_subgroup": int(in_group(data, cond).sum()) if _has_cols(data, cond) else None,
                "note": notes.get(cname)})
    return pd.DataFrame(rows)


def _boot_scores(metric: str, score_fn, y: np.ndarray, p: np.ndarray, boots: np.ndarray,
                 block: int = 200) -> np.ndarray:
    """The metric on every bootstrap resample (rows of ``boots`` index ``y``/``p``), vectorized.

    ``roc_auc`` is the Mann-Whitney statistic on average ranks (ties count 1/2), as in
    scikit-learn; the other vectorized metrics follow scikit-learn's definitions; the rest
    call ``score_fn`` per resample. Undefined resamples (one class only) give NaN.
    """
    from scipy.stats import rankdata

    out = np.full(len(boots), np.nan)
    if boots.size == 0:
        return out
    for s in range(0, len(boots), block):
        b = boots[s:s + block]
        Y, P = y[b], p[b]
        with np.errstate(invalid="ignore", divide="ignore"):
            if metric == "roc_auc":
                Y = Y.astype(float)
                n1 = Y.sum(1)
                n0 = Y.shape[1] - n1
                r = rankdata(P, axis=1)
                val = ((r * Y).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)
                val[(n1 == 0) | (n0 == 0)] = np.nan
            elif metric == "accuracy":
                val = (Y == P).mean(1)
            elif metric == "balanced_accuracy":
                recalls = []
                for c in pd.unique(y):
                    yc = Y == c
                    recalls.append(np.where(yc.sum(1) > 0, (yc & (P == c)).sum(1) / yc.sum(1), np.nan))
                val = np.nanmean(np.stack(recalls), axis=0)
            elif metric in ("r2", "mae", "rmse"):
                Y, P = Y.astype(float), P.astype(float)
                if metric == "mae":
                    val = np.abs(Y - P).mean(1)
                elif metric == "rmse":
                    val = np.sqrt(((Y - P) ** 2).mean(1))
                else:
                    tot = ((Y - Y.mean(1, keepdims=True)) ** 2).sum(1)
                    val = np.where(tot > 0, 1 - ((Y - P) ** 2).sum(1) / tot, np.nan)
            else:
                one_class = _METRICS[metric][0] == "proba"  # undefined on one class (f1 is not)
                val = np.array([_try(score_fn, yy, pp, one_class) for yy, pp in zip(Y, P)])
        out[s:s + len(b)] = val
    return out


def _try(fn, y, p, undefined_on_one_class: bool = True) -> float:
    try:
        return float(fn(y, p)) if len(np.unique(y)) > 1 or not undefined_on_one_class else np.nan
    except ValueError:
        return np.nan


def _has_cols(t: pd.DataFrame, cond) -> bool:
    if cond is None:
        return True
    try:
        t.head(1).eval(cond, engine="python")
        return True
    except Exception:  # noqa: BLE001
        return False


def _pct(x: np.ndarray, q: float) -> float:
    x = x[np.isfinite(x)]
    return float(np.quantile(x, q)) if len(x) else float("nan")


# =========================================================================== #
# container helpers: DataFrame | Cohort (table + arrays) | AnnData (single cells)
# =========================================================================== #
def _is_anndata(x) -> bool:
    return type(x).__name__ == "AnnData" and hasattr(x, "obs")


def _table(data) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Cohort):
        return data.table
    if _is_anndata(data):
        return data.obs
    raise DataError(f"expected a pandas DataFrame, a medcausal Cohort or an AnnData, got {type(data).__name__}")


def _take(data, positions):
    positions = np.asarray(positions, dtype=np.int64)
    if isinstance(data, pd.DataFrame):
        return data.iloc[positions]
    if isinstance(data, Cohort):
        return data[positions]
    if _is_anndata(data):
        return data[positions].copy()
    raise DataError(f"cannot select rows of a {type(data).__name__}")


def _concat(parts: list):
    if not parts:
        raise MedCausalError("nothing to concatenate")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, pd.DataFrame):
        return pd.concat(parts)
    if isinstance(first, Cohort):
        table = pd.concat([p.table for p in parts], ignore_index=True)
        arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in first.arrays}
        return Cohort(table, arrays, id_column=first.id_column)
    if _is_anndata(first):
        import anndata

        return anndata.concat(parts, merge="same", uns_merge="first")
    raise DataError(f"cannot concatenate {type(first).__name__} objects")


def _assign(data, columns: Mapping[str, Any]) -> None:
    """Add columns in place (on a chunk this module created)."""
    t = _table(data)
    for k, v in columns.items():
        t[k] = v


def _set_ids(data, ids: np.ndarray) -> None:
    if isinstance(data, pd.DataFrame):
        data.index = pd.Index(ids, name="id")
    elif isinstance(data, Cohort):
        data.table[data.id_column] = ids
    elif _is_anndata(data):
        data.obs_names = [str(i) for i in ids]


@contextlib.contextmanager
def _bar(total: int, progress: bool | None, desc: str):
    from tqdm import tqdm  # the plain bar: tqdm.auto warns in kernels without ipywidgets

    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, unit="patients", unit_scale=True, disable=not show, leave=False)
    try:
        yield bar
    finally:
        bar.close()


# =========================================================================== #
# command line: `medcausal simulate`, `medcausal augment`, `medcausal worlds`
# =========================================================================== #
def _sidecar_for(path: Path, info: dict) -> None:
    _write_json(path.with_name(path.name + ".json"), info)


_TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def _passthrough_columns(path: Path, model) -> list[str]:
    """Columns of a CSV input that are not model variables (ids, notes): read as text, so
    they reach ``--out`` as written (patient id ``"007"`` stays ``"007"``, not ``7``)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return []  # Parquet keeps its types
    try:
        columns = pd.read_csv(path, nrows=0).columns
    except Exception:  # noqa: BLE001 - read_table reports an unreadable file, naming it
        return []
    typed = set(PROVENANCE_COLUMNS).union(*(columns_of(v, t) for v, t in model.graph.variables.items()))
    return [c for c in columns if c not in typed]


def _read_input(model, path: str | os.PathLike, id_column: str | None = None):
    """The CLI's ``--input``: a CSV/Parquet table (with ``<name>_path`` columns for the model's
    image variables: scans loaded as the model was fitted), an ``.h5ad`` file, or a folder
    written by ``medcausal simulate``. ``id_column`` (``--id-column``) must be a column of a
    table; it is the id column of the scans' Cohort (default ``"id"``)."""
    from .io import read_table

    path = Path(path)
    if not path.exists():
        raise DataError(f"input {str(path)!r} does not exist")
    if path.suffix.lower() == ".h5ad":
        if id_column is not None:
            raise DataError(f"--id-column {id_column!r}: cells in {str(path)!r} are named by their obs_names; "
                            "give --id-column with a table input only")
        from .adapters.singlecell import read_h5ad

        return read_h5ad(path)
    if path.is_dir():
        data = read_run(path)
        _check_id_column(_table(data), id_column, path)
        return data
    table = read_table(path, str_columns=_passthrough_columns(path, model) + text_columns(model.graph))
    _check_id_column(table, id_column, path)
    images = [v for v, t in model.graph.variables.items() if t.kind == "image"]
    if not images:
        return table
    missing = [f"{v}_path" for v in images if f"{v}_path" not in table.columns]
    if missing:
        raise DataError(f"input {str(path)!r} has no column(s) {missing} naming the scans of the model's image "
                        f"variable(s) {images}; give a table with them, or a simulation folder")
    from .adapters.images import load_images

    cohort = None
    for v in images:
        c = load_images(None, table=path, image_column=f"{v}_path", name=v, id_column=id_column or "id",
                        spec=model.image_specs.get(v), shape=model.graph.variables[v].shape,
                        intensity=None, progress=False)
        cohort = c if cohort is None else Cohort(cohort.table, {**cohort.arrays, v: c.arrays[v]},
                                                 id_column=cohort.id_column)
    return cohort


def _check_id_column(table: pd.DataFrame, id_column: str | None, path) -> None:
    if id_column is not None and id_column not in table.columns:
        raise DataError(f"--id-column {id_column!r} is not a column of {str(path)!r}; columns: "
                        f"{list(table.columns)}")


def keyed_by_id(data, id_column: str | None):
    """``data`` with its units labelled by ``id_column``: what keys their counterfactual noise
    (:meth:`medcausal.CausalModel.counterfactual`) and names them in provenance. A table's
    index becomes that column (written back as the first column); a Cohort takes it as its id
    column. ``None`` leaves ``data`` as it is (a table's rows labelled by position)."""
    if id_column is None:
        return data
    if isinstance(data, Cohort):
        return Cohort(data.table, data.arrays, id_column=id_column, meta=data.meta)
    return data.set_index(id_column)


def _write_output(data, out: Path, image_format: str = "nifti") -> dict:
    """Write a CLI result in its domain's format; returns extra sidecar fields.

    ``.h5ad``: AnnData, or a Cohort with an expression array (as AnnData, the table in
    ``.obs``). ``.csv``/``.parquet``: the table; a Cohort's image arrays go one file per
    scan (NIfTI or PNG) into ``<stem>_<name>/`` beside it, the table holding
    ``<name>_path`` relative to its own folder (what :func:`medcausal.adapters.load_images`
    reads back). Every file is written atomically.
    """
    suffix = out.suffix.lower()
    if suffix == ".h5ad":
        from .adapters.singlecell import cohort_to_anndata, write_h5ad

        if _is_anndata(data):
            adata = data
        elif isinstance(data, Cohort) and any(np.ndim(a) == 2 for a in data.arrays.values()):
            expr = [k for k, a in data.arrays.items() if np.ndim(a) == 2][0]
            adata = cohort_to_anndata(Cohort(data.table, {k: a for k, a in data.arrays.items() if np.ndim(a) <= 2},
                                             id_column=data.id_column), expression=expr)
        else:
            raise DataError(f"{str(out)!r}: .h5ad output needs single-cell data (an expression array); this "
                            "result has none: write .csv or .parquet")
        write_h5ad(_h5ad_safe(adata.copy()), out)
        return {"format": "h5ad"}
    if suffix not in _TABLE_SUFFIXES:
        raise DataError(f"output {str(out)!r}: use a .csv, .parquet or .h5ad file (or a folder for simulate)")
    if _is_anndata(data) or isinstance(data, Cohort) and any(np.ndim(a) == 2 for a in data.arrays.values()):
        raise DataError(f"{str(out)!r}: the result holds expression counts; write it as .h5ad "
                        "(or to a folder with `medcausal simulate`)")
    table = _table(data)
    extra: dict = {"format": "parquet" if suffix in (".parquet", ".pq") else "csv"}
    if isinstance(data, Cohort) and data.arrays:
        table = table.copy()
        unique = table[data.id_column].astype(str)
        if unique.duplicated().any():  # long layouts repeat ids: name files by id and row
            unique = unique + "_" + pd.Series(np.arange(len(table)), index=table.index).astype(str)
        extra["images"] = {}
        for name, arr in data.arrays.items():
            folder = out.parent / f"{out.stem}_{_safe_stem(name)}"
            scans = pd.DataFrame({"_file": unique.to_numpy()})
            # the scans keep their affine (a world's "mri@w" has the factual "mri_affine")
            aff = next((c for c in (f"{name}_affine", f"{name.split('@')[0]}_affine") if c in table.columns), None)
            if aff is not None:
                scans[f"{name}_affine"] = table[aff].to_numpy()
            _scans_beside(table, Cohort(scans, {name: arr}, id_column="_file"), name, folder, image_format)
            extra["images"][name] = folder.name
        extra["image_format"] = image_format
    _write_table_file(table, out, extra["format"])
    return extra


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name))


def cmd_simulate(args) -> int:
    """``medcausal simulate RUN -n N [--do v=x] [--where COND] --out FOLDER|FILE``."""
    from .cli import load_run, privacy_line, refuse_existing

    model = load_run(args.run_dir)
    out = Path(args.out)
    kw = dict(do=parse_cli_do(args.do, model.graph.variables) or None, where=args.where, seed=args.seed,
              chunk_size=args.chunk_size, min_acceptance=args.min_acceptance, progress=not args.quiet and None)
    if out.suffix.lower() in (*_TABLE_SUFFIXES, ".h5ad"):
        if ranks()[0] != 0:  # one file: written by one process (a folder --out splits the work)
            return 0
        refuse_existing(out, args.overwrite)
        if out.suffix.lower() in (".parquet", ".pq"):
            _require_parquet()
        df = simulate(model, args.n, **kw)
        info = dict(_table(df).attrs.get("medcausal", {}))
        extra = _write_output(df, out, args.image_format)
        _sidecar_for(out, {**info, **extra, "file": out.name, "rows": len(df), "status": "complete"})
        print(f"wrote {len(df)} simulated patients to {out} ({info.get('method')})")
        print(privacy_line(model))
        return 0
    run = simulate(model, args.n, out=out, format=args.format, overwrite=args.overwrite, resume=args.resume,
                   image_format=args.image_format, **kw)
    if ranks()[0] == 0:  # under torchrun, once
        print(f"wrote {run.n} simulated patients in {len(run.parts)} part(s) to {out} ({run.info.get('method')})")
        print(privacy_line(model))
    return 0


def cmd_augment(args) -> int:
    """``medcausal augment RUN --input COHORT --target COND|LABEL [-n N] --out FILE``."""
    from .cli import load_run, privacy_line, refuse_existing

    model = load_run(args.run_dir)
    # the patients' ids: what synth_source names, and the synthetic rows get
    data = keyed_by_id(_read_input(model, args.input, args.id_column), args.id_column)
    aug = augment(model, data, target=args.target, n=args.n, strategy=args.strategy,
                  do=parse_cli_do(args.do, model.graph.variables) or None, source=args.source, seed=args.seed,
                  progress=not args.quiet and None)
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    extra = _write_output(aug, out, args.image_format)
    table = _table(aug)
    report = table.attrs.get("medcausal", {})
    _sidecar_for(out, {**report, **extra, "input": str(args.input), "rows": len(aug),
                       "synthetic_rows": int(_synthetic_flag(table).sum())})
    print(f"added {report.get('added', 0)} synthetic patients ({args.strategy}) -> {out} ({len(aug)} rows)")
    print(privacy_line(model))
    if model.dp_ledger() is not None and args.strategy != "sample":
        print("  transported rows are counterfactuals of real patients: each reveals its source patient, and the "
              "DP guarantee does NOT cover them (their synth_epsilon is empty; privacy/PRIVACY.md, section 3)")
    return 0


def _parse_world(item: str, variables=None) -> tuple[str, dict]:
    """``"treated:drug=1,dose=2"`` -> ``("treated", {"drug": 1.0, "dose": 2.0})``."""
    if ":" not in item:
        raise InterventionError(f"--world expects NAME:VAR=VALUE[,VAR=VALUE], got {item!r}")
    name, spec = item.split(":", 1)
    return name.strip(), parse_cli_do([s for s in spec.split(",") if s.strip()], variables)


def cmd_worlds(args) -> int:
    """``medcausal worlds RUN --input PATIENTS --world NAME:VAR=VAL ... --out FILE``."""
    from .cli import load_run, privacy_line, refuse_existing

    model = load_run(args.run_dir)
    data = _read_input(model, args.input, args.id_column)
    parsed = [_parse_world(w, model.graph.variables) for w in args.world]
    names = [n for n, _ in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InterventionError(f"--world names {repeated} more than once; give each world its own name "
                                "(several interventions of one world go after one name: NAME:A=1,B=2)")
    worlds = dict(parsed)
    if args.do:
        worlds = {**worlds, **_worlds(parse_cli_do(args.do, model.graph.variables), model.graph.variables)}
    if not worlds:
        raise MedCausalError("worlds needs at least one --world NAME:VAR=VALUE (or --do VAR=VALUE)")
    twins = counterfactual_patients(model, data, do=worlds, seed=args.seed, id_column=args.id_column,
                                    layout=args.layout)
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    extra = _write_output(twins, out, args.image_format)
    _sidecar_for(out, {**extra, "model_id": model_id(model),
                       "worlds": {k: _describe_do(v, model.graph.variables) for k, v in worlds.items()},
                       "seed": args.seed, "layout": args.layout, "patients": len(data), "input": str(args.input),
                       "privacy": None if model.dp_ledger() is None else {
                           **_privacy_summary(model), "covers": "nothing in this file: every row is a "
                           "counterfactual of an input patient and reveals it (privacy/PRIVACY.md section 3)"}})
    print(f"wrote {len(data)} patients x {len(worlds)} world(s) to {out}")
    print(privacy_line(model, of_inputs=True))
    return 0


def add_commands(subparsers) -> None:
    """Add ``simulate``, ``augment`` and ``worlds`` to the ``medcausal`` command's subparsers.

    >>> import argparse
    >>> p = argparse.ArgumentParser(prog="medcausal"); sub = p.add_subparsers(dest="command")
    >>> add_commands(sub)
    >>> p.parse_args(["simulate", "runs/x", "-n", "10", "--where", "sex == 1", "--out", "s.csv"]).where
    'sex == 1'
    """
    from .cli import INPUT_HELP, RUN_HELP

    s = subparsers.add_parser("simulate", help="simulate patients, optionally under interventions and in a subgroup")
    s.add_argument("run_dir", help=RUN_HELP)
    s.add_argument("-n", type=int, required=True, help="number of patients")
    s.add_argument("--do", action="append", default=[], metavar="VAR=VALUE", help="intervention (repeatable)")
    s.add_argument("--where", default=None, metavar="COND",
                   help="subgroup condition, a pandas query, e.g. \"sex == 1 and age > 60\"")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="a folder (chunked parts + simulation.json + _SUCCESS), or a "
                                                "single .csv/.parquet file (held in memory) with a .json sidecar")
    s.add_argument("--format", choices=["parquet", "csv"], default="parquet", help="part format of a folder")
    s.add_argument("--image-format", choices=["nifti", "png"], default="nifti",
                   help="file format of simulated scans (one file per scan, paths in <name>_path)")
    s.add_argument("--chunk-size", type=int, default=None,
                   help=f"patients per chunk (default {DEFAULT_CHUNK:,}; {DEFAULT_CHUNK_ARRAYS:,} with images/cells)")
    s.add_argument("--min-acceptance", type=float, default=1e-3, help="lowest rejection acceptance rate allowed")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.add_argument("--resume", action="store_true", help="finish an interrupted run in the same folder")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)

    a = subparsers.add_parser("augment", help="grow a scarce subgroup or rebalance a label with synthetic patients")
    a.add_argument("run_dir", help=RUN_HELP)
    a.add_argument("--input", required=True, help=f"the real cohort: {INPUT_HELP}")
    a.add_argument("--target", required=True,
                   help="subgroup condition (\"sex == 1 and disease == 1\") or a label variable to rebalance")
    a.add_argument("-n", type=int, default=None, help="subgroup size after augmentation (per class for a label)")
    a.add_argument("--strategy", choices=["sample", "transport", "mixed"], default="sample")
    a.add_argument("--do", action="append", default=[], metavar="VAR=VALUE",
                   help="transport intervention (default: the VAR == VALUE parts of --target)")
    a.add_argument("--source", default=None, metavar="COND", help="transport only real patients matching this")
    a.add_argument("--id-column", default=None,
                   help="column holding patient ids: synth_source names the source patient by it, and synthetic "
                        "rows get new ids there (default: the row number)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True, help="output CSV or Parquet (real + synthetic rows, provenance columns; "
                                                "scans as files beside it), or .h5ad for cells")
    a.add_argument("--image-format", choices=["nifti", "png"], default="nifti", help="file format of scans")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=cmd_augment)

    w = subparsers.add_parser("worlds", help="twin cohort: patients' counterfactuals in several named worlds")
    w.add_argument("run_dir", help=RUN_HELP)
    w.add_argument("--input", required=True, help=f"the observed patients: {INPUT_HELP}")
    w.add_argument("--world", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                   help="a named world (repeatable)")
    w.add_argument("--do", action="append", default=[], metavar="VAR=VALUE",
                   help="one unnamed world from these interventions")
    w.add_argument("--id-column", default=None, help="column holding patient ids (default: row number)")
    w.add_argument("--layout", choices=["wide", "long"], default="wide")
    w.add_argument("--seed", type=int, default=0, help="seed for the noise of discrete variables")
    w.add_argument("--out", required=True, help="output CSV or Parquet (scans as files beside it), or .h5ad")
    w.add_argument("--image-format", choices=["nifti", "png"], default="nifti", help="file format of scans")
    w.add_argument("--overwrite", action="store_true")
    w.set_defaults(func=cmd_worlds)
