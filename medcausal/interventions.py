"""Interventions as data attached to named variables.

A ``do=`` mapping sends a variable name to

- a value (``80.0``, ``"F"``): a hard intervention, the same for every row;
- a per-row array of length n: a hard intervention, one value per row;
- a callable ``f(current) -> new``: a shift / soft intervention. ``current`` is the
  value the variable would have taken in that world without its own intervention
  (sampled for ``sample``, predicted from the unit's noise for ``counterfactual``),
  as a numpy array in the data's units; it returns the new values.

>>> from medcausal.interventions import parse_do
>>> iv = parse_do({"age": lambda a: a + 10}, known=["age", "bp"])
>>> iv["age"].apply(np.array([60.0, 70.0]), n=2)
array([70., 80.])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from .errors import InterventionError


@dataclass(frozen=True)
class Intervention:
    """One variable's intervention: ``kind`` is ``"value"``, ``"array"`` or ``"callable"``."""

    name: str
    spec: Any

    @property
    def kind(self) -> str:
        if callable(self.spec):
            return "callable"
        if np.ndim(self.spec) == 0:
            return "value"
        return "array"

    @property
    def needs_current(self) -> bool:
        """True when the new value depends on the value the variable would have taken."""
        return self.kind == "callable"

    def apply(self, current: np.ndarray | None, n: int) -> np.ndarray:
        """Return the intervened values for ``n`` rows (a numpy array with first axis n)."""
        if self.kind == "value":
            return np.repeat(np.asarray(self.spec)[None], n, axis=0)
        if self.kind == "array":
            out = np.asarray(self.spec)
            if out.shape[0] != n:
                raise InterventionError(f"do[{self.name!r}] has {out.shape[0]} values for {n} rows")
            return out
        if current is None:
            raise InterventionError(f"do[{self.name!r}] is a callable but no current value is known")
        try:  # a copy: a function that edits its argument in place must not edit the user's data
            out = np.asarray(self.spec(np.array(current)))
        except Exception as e:  # the user's function failed: say which variable it was for
            raise InterventionError(f"do[{self.name!r}]: the callable raised {type(e).__name__}: {e}") from e
        if out.ndim == 0:
            out = np.repeat(out[None], n, axis=0)
        if out.shape[0] != n:
            raise InterventionError(
                f"do[{self.name!r}]: the callable returned {out.shape[0]} values for {n} rows")
        return out

    def describe(self) -> str:
        if self.kind == "value":
            return f"do({self.name}={self.spec!r})"
        if self.kind == "array":
            return f"do({self.name}=<{len(self.spec)} per-row values>)"
        return f"do({self.name}={getattr(self.spec, '__name__', 'callable')}({self.name}))"


def is_vector_value(name: str, spec: Any, variables: Mapping[str, Any] | None) -> bool:
    """``[a, b]`` for a 2-vector variable is one value for every row, not two per-row values.

    >>> from medcausal.graph import Continuous
    >>> kinds = {"v": Continuous(dim=2), "x": Continuous()}
    >>> is_vector_value("v", [1.0, 2.0], kinds), is_vector_value("x", [1.0, 2.0], kinds)
    (True, False)
    """
    vtype = (variables or {}).get(name)
    return (getattr(vtype, "kind", None) == "continuous" and vtype.dim > 1 and not callable(spec)
            and not hasattr(spec, "columns") and np.ndim(spec) == 1 and len(spec) == vtype.dim)


def parse_do(do: Mapping[str, Any] | None, known: Iterable[str], index=None) -> dict[str, Intervention]:
    """Validate a ``do=`` mapping against the known variable names.

    ``index``: the observed rows' index (counterfactuals). A per-row ``pandas.Series`` is then
    aligned to the rows by its index, so the model and the ground-truth simulators read it alike;
    a Series whose index is not a reordering of the rows' is refused.

    >>> import pandas as pd
    >>> iv = parse_do({"x": pd.Series([1.0, 2.0], index=["b", "a"])}, ["x"], index=pd.Index(["a", "b"]))
    >>> iv["x"].apply(None, n=2).tolist()
    [2.0, 1.0]
    """
    if do is None:
        return {}
    if not isinstance(do, Mapping):
        raise InterventionError(f"do= must be a mapping {{variable: value}}, got {type(do).__name__}")
    known = list(known)
    out = {}
    for name, spec in do.items():
        if name not in known:
            raise InterventionError(f"do= names unknown variable {name!r}; known: {known}")
        if spec is None:
            raise InterventionError(f"do[{name!r}] is None")
        if index is not None:
            spec = align_to_rows(spec, index, f"do[{name!r}]")
        out[name] = Intervention(name, spec)
    return out


def align_to_rows(spec: Any, index, label: str) -> Any:
    """A per-row ``pd.Series`` value (named ``label`` in errors), aligned to the rows of ``index``
    by its own index; any other value as it is.

    >>> import pandas as pd
    >>> align_to_rows(pd.Series([1, 2], index=["b", "a"]), pd.Index(["a", "b"]), "do['x']").tolist()
    [2, 1]
    """
    if not hasattr(spec, "reindex") or hasattr(spec, "columns") or spec.index.equals(index):
        return spec
    if spec.index.is_unique and len(spec) == len(index) and spec.index.isin(index).all():
        return spec.reindex(index)
    raise InterventionError(f"{label} is a pandas Series whose index does not match the observed rows' "
                            f"index; pass .to_numpy() to apply its values by position")


def parse_cli_do(items: Iterable[str], variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Parse ``["age=80", "sex=F"]`` from the command line (numbers where they parse).

    With the model's ``variables`` (``model.graph.variables``), a value written as one of a
    categorical variable's categories is that category, so ``grade=01`` stays ``"01"``.

    >>> parse_cli_do(["age=80", "sex=F"])
    {'age': 80.0, 'sex': 'F'}
    >>> from medcausal.graph import Categorical
    >>> parse_cli_do(["grade=01"], {"grade": Categorical(("01", "02"))})
    {'grade': '01'}
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise InterventionError(f"--do expects var=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise InterventionError(f"--do expects var=value, got {item!r}")
        if k in out:
            raise InterventionError(f"--do gives variable {k!r} more than once")
        vtype = (variables or {}).get(k)
        named = {str(c): c for c in getattr(vtype, "categories", None) or ()}
        if getattr(vtype, "kind", None) == "categorical" and v.strip() in named:
            out[k] = named[v.strip()]
            continue
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v.strip()
    return out


