"""Counterfactual error against ground truth.

The DCM benchmark's counterfactual score: the mean squared error between the
true and the predicted counterfactual, over the variables the intervention can
change (the descendants of the intervened variables), each variable weighted
equally.

>>> import pandas as pd
>>> from medcausal.graph import CausalGraph
>>> g = CausalGraph({"x1": "continuous", "x2": "continuous", "x3": "continuous"},
...                 edges=[("x1", "x2"), ("x2", "x3")])
>>> true = pd.DataFrame({"x1": [1.0, 1.0], "x2": [0.0, 2.0], "x3": [1.0, 1.0]})
>>> pred = pd.DataFrame({"x1": [1.0, 1.0], "x2": [1.0, 2.0], "x3": [1.0, 3.0]})
>>> err = counterfactual_mse(true, pred, g, ["x1"])
>>> err.per_variable, float(err)
({'x2': 0.5, 'x3': 2.0}, 1.25)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from ..errors import DataError, InterventionError
from ..graph import CausalGraph, table_columns

__all__ = ["CounterfactualError", "counterfactual_mse", "variable_columns"]


@dataclass(frozen=True)
class CounterfactualError:
    """Counterfactual MSE: the average over ``variables`` of ``per_variable``.

    ``float(err)`` gives ``err.mse``.

    >>> err = CounterfactualError(mse=0.5, per_variable={"x2": 0.5}, variables=("x2",))
    >>> float(err)
    0.5
    """

    mse: float
    per_variable: dict[str, float]
    variables: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # descendants with no squared error (categorical, image, expression)

    def __float__(self) -> float:
        return float(self.mse)

    def __repr__(self) -> str:
        parts = ", ".join(f"{v}={e:.4g}" for v, e in self.per_variable.items())
        extra = f"; not scored: {list(self.skipped)}" if self.skipped else ""
        return f"CounterfactualError(mse={self.mse:.6g}; {parts}{extra})"


def variable_columns(graph: CausalGraph, name: str) -> list[str]:
    """The DataFrame columns holding variable ``name``: ``[name]``, or
    ``[name[0], name[1], ...]`` for a continuous vector of ``dim > 1``.

    >>> from medcausal.graph import CausalGraph, Continuous
    >>> variable_columns(CausalGraph({"z": Continuous(dim=2)}), "z")
    ['z[0]', 'z[1]']
    """
    return table_columns(name, graph.variables[name])


def _do_names(do_names: Any, graph: CausalGraph) -> list[str]:
    if isinstance(do_names, str):
        names = [do_names]
    elif isinstance(do_names, Mapping):
        names = list(do_names)
    else:
        try:
            names = list(do_names)
        except TypeError:
            raise InterventionError(
                f"do_names must be a variable name, a list of names or a do= mapping, "
                f"got {type(do_names).__name__}") from None
    if not names:
        raise InterventionError("do_names is empty: name the intervened variable(s)")
    unknown = [v for v in names if v not in graph]
    if unknown:
        raise InterventionError(f"do_names names unknown variable(s) {unknown}; "
                                f"known: {list(graph.variables)}")
    return names


def _aligned(true_cf: Any, pred_cf: Any, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    for label, df in (("true_cf", true_cf), ("pred_cf", pred_cf)):
        if not isinstance(df, pd.DataFrame):
            raise DataError(f"{label} must be a pandas DataFrame, got {type(df).__name__}")
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise DataError(f"{label} lacks column(s) {missing} (descendants of the "
                            f"intervention); it has {list(df.columns)}")
    if len(true_cf) != len(pred_cf):
        raise DataError(f"true_cf has {len(true_cf)} rows but pred_cf has {len(pred_cf)}: "
                        "they must hold the same units")
    if len(true_cf) == 0:
        raise DataError("true_cf and pred_cf are empty")
    if not true_cf.index.equals(pred_cf.index):
        if not (true_cf.index.is_unique and pred_cf.index.is_unique):
            raise DataError("true_cf and pred_cf have different indexes (with duplicate ids); "
                            "they must hold the same units in the same order")
        only_true = true_cf.index.difference(pred_cf.index)
        only_pred = pred_cf.index.difference(true_cf.index)
        if len(only_true) or len(only_pred):
            raise DataError(
                "true_cf and pred_cf hold different units: "
                f"{len(only_true)} only in true_cf (e.g. {list(only_true[:3])}), "
                f"{len(only_pred)} only in pred_cf (e.g. {list(only_pred[:3])})")
        pred_cf = pred_cf.loc[true_cf.index]  # same units, other order: align by id
    out = []
    for label, df in (("true_cf", true_cf), ("pred_cf", pred_cf)):
        block = df[columns]
        try:
            arr = block.to_numpy(dtype=float)
        except (TypeError, ValueError):
            bad = [c for c in columns if not pd.api.types.is_numeric_dtype(df[c])]
            raise DataError(f"{label} column(s) {bad} are not numeric") from None
        if not np.all(np.isfinite(arr)):
            bad = [c for c, ok in zip(columns, np.isfinite(arr).all(axis=0)) if not ok]
            raise DataError(f"{label} has missing or infinite values in column(s) {bad}")
        out.append(arr)
    return out[0], out[1]


def counterfactual_mse(true_cf: pd.DataFrame, pred_cf: pd.DataFrame, graph: CausalGraph,
                       do_names: str | Iterable[str] | Mapping[str, Any]
                       ) -> CounterfactualError:
    """Mean squared counterfactual error over the descendants of the intervention.

    For each continuous or binary descendant of the intervened variables
    (``do_names``: a name, a list of names, or the ``do=`` mapping itself;
    intervened variables are excluded even when they descend from one another),
    the MSE over units and its columns (a vector variable's columns together);
    ``mse`` is the unweighted mean of these. Categorical, image and expression
    descendants have no squared error: they are listed in ``skipped`` (score
    images with :mod:`medcausal.metrics.images`, cells with
    :mod:`medcausal.metrics.singlecell`). The inputs are DataFrames or Cohorts
    (their tables, by id) holding the same units: the same index (rows are
    matched by id if only the order differs) and the descendants' columns;
    other columns are ignored.

    >>> import pandas as pd
    >>> from medcausal.graph import CausalGraph
    >>> g = CausalGraph({"a": "continuous", "b": "continuous"}, edges=[("a", "b")])
    >>> t = pd.DataFrame({"a": [0.0, 0.0], "b": [1.0, 2.0]})
    >>> float(counterfactual_mse(t, t.assign(b=[1.0, 4.0]), g, {"a": 0.0}))
    2.0
    """
    if not isinstance(graph, CausalGraph):
        raise DataError(f"graph must be a medcausal CausalGraph, got {type(graph).__name__}")
    names = _do_names(do_names, graph)
    desc: set[str] = set()
    for v in names:
        desc |= graph.descendants(v)
    descendants = tuple(v for v in graph.topological_order if v in desc and v not in names)
    if not descendants:
        raise InterventionError(f"the intervened variable(s) {names} have no descendants "
                                "outside the intervention: there is no counterfactual to score")
    variables = tuple(v for v in descendants if graph.variables[v].kind in ("continuous", "binary"))
    skipped = tuple(v for v in descendants if v not in variables)
    if not variables:
        kinds = {v: graph.variables[v].kind for v in skipped}
        raise DataError(f"counterfactual_mse scores continuous and binary variables; the descendants "
                        f"of {names} are {kinds} (images: medcausal.metrics.images; cells: "
                        "medcausal.metrics.singlecell)")
    true_cf, pred_cf = _table_of(true_cf, "true_cf"), _table_of(pred_cf, "pred_cf")
    cols = {v: variable_columns(graph, v) for v in variables}
    flat = [c for v in variables for c in cols[v]]
    t, p = _aligned(true_cf, pred_cf, flat)
    sq = (t - p) ** 2
    per_variable: dict[str, float] = {}
    start = 0
    for v in variables:
        k = len(cols[v])
        per_variable[v] = float(sq[:, start:start + k].mean())
        start += k
    mse = float(np.mean(list(per_variable.values())))
    return CounterfactualError(mse=mse, per_variable=per_variable, variables=variables, skipped=skipped)


def _table_of(data: Any, label: str):
    """A Cohort's table indexed by its ids (a DataFrame as it is)."""
    from ..cohort import Cohort

    if isinstance(data, Cohort):
        return data.table.set_index(data.id_column)
    return data
