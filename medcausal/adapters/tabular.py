"""Tables in, tensors out: one codec per variable, fitted once and stored in the model file.

A codec turns a variable's column(s) into the tensor its mechanism sees, turns that
tensor into features for the variable's children, and turns tensors back into columns.

- continuous: standardized with the training mean/std; the training range is kept to
  warn about interventions outside it. Vector variables use columns ``name[0]``, ``name[1]``...
- binary: 0/1 (``True``/``False`` accepted); a float ``[n, 1]`` index.
- categorical: the index into ``categories`` (declared, or the sorted values seen at fit);
  dates and times are kept as ISO strings (``"2021-06-01T00:00:00"``), so a model file
  stays JSON and ``do=`` takes a ``Timestamp``, a ``datetime`` or that string alike.
- image / expression: arrays from a :class:`~medcausal.Cohort`, passed through as float.

>>> import pandas as pd
>>> from medcausal.graph import CausalGraph
>>> g = CausalGraph({"age": "continuous", "sex": "binary"})
>>> df = pd.DataFrame({"age": [50.0, 70.0], "sex": [0, 1]})
>>> codecs = fit_codecs(df, g)
>>> encode(df, g, codecs)["age"].squeeze(-1).round(decimals=3).tolist()
[-1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from ..cohort import Cohort
from ..errors import DataError, InterventionError, OutOfSupportWarning, warn
from ..graph import Categorical, CausalGraph, VariableType, table_columns


columns_of = table_columns  # the table columns that hold a variable (one naming rule: graph.py)


def text_columns(graph: CausalGraph) -> list[str]:
    """Categorical variables whose categories are all text: a CSV reader must keep them as
    text, or codes like ``"01"`` come back as the number 1 and match no category.

    >>> from medcausal.graph import CausalGraph, Categorical
    >>> text_columns(CausalGraph({"grade": Categorical(("01", "02")), "n": Categorical((1, 2))}))
    ['grade']
    """
    return [v for v, t in graph.variables.items() if t.kind == "categorical" and t.categories
            and all(isinstance(c, str) for c in t.categories)]


def _dtype_state(col: pd.Series, vtype: VariableType) -> dict:
    """The JSON-serializable dtype of a discrete column, for :meth:`Codec.restore`. A category
    dtype also gets the declared categories; a binary column of neither bools nor numbers gets
    ``levels``, its own values for 0 and 1."""
    state = {"dtype": str(col.dtype)}
    is_category = isinstance(col.dtype, pd.CategoricalDtype)
    if vtype.kind == "binary" and not pd.api.types.is_numeric_dtype(col.dtype):
        seen = col.cat.categories if is_category else pd.unique(col.dropna())
        state["levels"] = _binary_levels([_plain(v) for v in seen])
    if is_category:
        cats = [_plain(c) for c in col.cat.categories]
        extra = vtype.categories if vtype.kind == "categorical" else state.get("levels", [])
        cats += [c for c in extra if c is not None and c not in cats]
        state.update(dtype="category", dtype_categories=cats, ordered=bool(col.cat.ordered))
    return state


def _to01(values: np.ndarray) -> np.ndarray:
    """Binary values as floats, 0/1 where they read as such (bools, numbers, "True"/"False",
    "yes"/"no")."""
    if values.dtype == bool:
        return values.astype(np.float64)
    # as a bool column prints (e.g. a CLI --do smoker=True), and as clinical forms write it
    words = {"true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}
    series = pd.Series(values).map(lambda v: words.get(v.strip().lower(), v) if isinstance(v, str) else v)
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)


def _binary_levels(seen: list) -> list:
    """``[value for 0, value for 1]`` among ``seen``; one not seen is inferred from the other
    where it can be (``True`` -> ``False``, ``"1"`` -> ``"0"``, ``"TRUE"`` -> ``"FALSE"``, ``"Yes"`` ->
    ``"No"``), else None."""
    levels = [None, None]
    for v, code in zip(seen, _to01(np.asarray(seen, dtype=object))):
        if code in (0.0, 1.0) and levels[int(code)] is None:
            levels[int(code)] = v
    for code in (0, 1):
        if levels[code] is None and levels[1 - code] is not None:
            levels[code] = _other_level(levels[1 - code], code)
    return levels


def _other_level(v: Any, code: int) -> Any:
    if isinstance(v, bool):
        return bool(code)
    if isinstance(v, (int, float)):
        return type(v)(code)
    word = v.strip().lower() if isinstance(v, str) else None
    if word in ("0", "1"):
        return str(code)
    for pair in (("false", "true"), ("no", "yes")):
        if word in pair:
            word = pair[code]
            return word.upper() if v.isupper() else word.capitalize() if v[:1].isupper() else word
    return None


def _table(data) -> pd.DataFrame:
    if isinstance(data, Cohort):
        return data.table
    if isinstance(data, pd.DataFrame):
        return data
    raise DataError(f"expected a pandas DataFrame or a medcausal Cohort, got {type(data).__name__}")


def _missing(cols: list[str], available: list[str], what: str = "column") -> None:
    missing = [c for c in cols if c not in available]
    labels = [a for a in available if not isinstance(a, str) and str(a) in missing]
    if labels:  # pd.DataFrame(array) has integer column labels; variable names are text
        raise DataError(f"the {what}(s) {labels[:5]} are labelled by {type(labels[0]).__name__}s, and variable "
                        f"names are text ({str(labels[0])!r}): rename them, e.g. df.columns = df.columns.astype(str)")
    if missing:
        hints = []
        for c in missing:
            close = difflib.get_close_matches(str(c), [str(a) for a in available], n=1)
            hints.append(f"{c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise DataError(f"missing {what}(s) {', '.join(hints)}; available: {list(available)}")


def _numeric(df: pd.DataFrame, cols: list[str], name: str) -> np.ndarray:
    out = np.empty((len(df), len(cols)), dtype=np.float64)
    for j, c in enumerate(cols):
        col = df[c]
        if col.dtype == bool:
            col = col.astype(float)
        num = pd.to_numeric(col, errors="coerce")
        bad = num.isna() & col.notna()
        if bad.any():
            examples = col[bad].astype(str).unique()[:3].tolist()
            raise DataError(f"column {c!r} (variable {name!r}) has {int(bad.sum())} non-numeric "
                            f"value(s), e.g. {examples}")
        arr = num.to_numpy(dtype=np.float64)
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        if n_nan or n_inf:
            raise DataError(f"column {c!r} (variable {name!r}) has {n_nan} NaN and {n_inf} infinite "
                            "value(s); drop or impute them before fitting or querying")
        out[:, j] = arr
    return out


def _model_scale(x: np.ndarray, vtype: VariableType, where) -> np.ndarray:
    """Raw continuous values on the scale the model works on: their log for a positive
    variable (a DataError, naming ``where(column index)``, for values <= 0), else as they are."""
    if not vtype.positive:
        return x
    bad = x <= 0
    if bad.any():
        j = int(np.flatnonzero(bad.any(0))[0])
        raise DataError(f"{where(j)} is declared positive but has {int(bad[:, j].sum())} value(s) <= 0, e.g. "
                        f"{pd.unique(x[bad[:, j], j])[:3].tolist()}; fix them, or declare it without positive")
    return np.log(x)


@dataclass
class Codec:
    """How one variable is encoded; ``state`` is JSON-serializable and saved with the model."""

    name: str
    vtype: VariableType
    state: dict = field(default_factory=dict)

    # -- fitting -----------------------------------------------------------
    @classmethod
    def fit(cls, name: str, vtype: VariableType, data) -> "Codec":
        kind = vtype.kind
        if kind == "continuous":
            cols = columns_of(name, vtype)
            x = _numeric(_table(data), cols, name)
            t = _model_scale(x, vtype, lambda j: f"column {cols[j]!r} (variable {name!r})")
            scale = t.std(0)
            return cls(name, vtype, {"loc": t.mean(0).tolist(),
                                     "scale": np.where(scale > 0, scale, 1.0).tolist(),
                                     "min": x.min(0).tolist(), "max": x.max(0).tolist()})
        if kind == "categorical" and vtype.categories is None:
            col = _table(data)[name]
            if col.isna().any():
                raise DataError(f"column {name!r} has {int(col.isna().sum())} missing value(s)")
            cats = sorted({_plain(v) for v in pd.unique(col)}, key=lambda v: (str(type(v)), v))
            if len(cats) < 2:
                raise DataError(f"categorical column {name!r} has a single value {cats}; "
                                "declare its categories or drop the variable")
            vtype = Categorical(tuple(_plain(c) for c in cats))
        table = _table(data) if isinstance(data, (pd.DataFrame, Cohort)) else None
        if table is None or name not in table.columns:
            return cls(name, vtype, {})
        return cls(name, vtype, _dtype_state(table[name], vtype))

    def restore(self, values: np.ndarray):
        """Decoded discrete values in the dtype of the column the model was fitted on (bool,
        int, pandas categorical with its categories and order; a binary column's own values for
        0/1, e.g. ``"True"``/``"False"``); as they are for other kinds and for model files written
        before the dtype was recorded. A value that has no place there is a DataError, never NaN."""
        dtype = self.state.get("dtype")
        if dtype is None or self.vtype.kind not in ("binary", "categorical"):
            return values
        levels = self.state.get("levels")
        if levels is None and dtype == "category" and self.vtype.kind == "binary":
            levels = _binary_levels(self.state["dtype_categories"])  # files written before "levels"
        if levels is not None:  # binary: 0/1 -> the training column's own values
            codes = np.asarray(values).astype(np.int64)
            for code in (0, 1):
                if levels[code] is None and (codes == code).any():
                    raise DataError(f"variable {self.name!r}: the training column has no value for "
                                    f"{code} (its values read as {levels}); refit on a column that has both")
            values = np.asarray(levels, dtype=object)[codes]
        if dtype == "category":
            cats = self.state["dtype_categories"]
            out = pd.Categorical(values, categories=cats, ordered=bool(self.state.get("ordered", False)))
            lost = out.isna() & ~pd.isna(values)
            if lost.any():
                unknown = pd.unique(np.asarray(values)[lost])[:5].tolist()
                raise DataError(f"variable {self.name!r}: value(s) {unknown} are not among the categories "
                                f"{cats} of its training column; refit the model to write them")
            return out
        if dtype.startswith("datetime64"):  # ISO strings (or, in older files, integer nanoseconds)
            return pd.Series(pd.to_datetime(list(values))).astype(dtype).to_numpy()
        try:
            target = pd.api.types.pandas_dtype(dtype)
            if isinstance(target, pd.api.extensions.ExtensionDtype):  # "boolean", "Int64", "string"
                return pd.array(np.asarray(values).tolist(), dtype=target)
            return np.asarray(values).astype(target)
        except (TypeError, ValueError):
            return values

    # -- encoding ------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        kind = self.vtype.kind
        if kind == "continuous":
            return self.vtype.dim
        if kind == "binary":
            return 1
        if kind == "categorical":
            return len(self.vtype.categories)
        raise DataError(f"variable {self.name!r} of kind {kind!r} cannot be a parent")

    def encode(self, data) -> torch.Tensor:
        kind, name = self.vtype.kind, self.name
        if kind in ("image", "expression"):
            if not isinstance(data, Cohort) or name not in data.arrays:
                raise DataError(f"variable {name!r} ({kind}) must be an array in a Cohort's .arrays")
            arr = np.asarray(data.arrays[name], dtype=np.float32)
            if not np.isfinite(arr).all():
                raise DataError(f"array {name!r} has {int((~np.isfinite(arr)).sum())} non-finite value(s)")
            return torch.from_numpy(arr)
        table = _table(data)
        cols = columns_of(name, self.vtype)
        _missing(cols, list(table.columns))
        raw = table[cols] if kind == "continuous" else table[name].to_numpy()
        return torch.as_tensor(self.encode_values(raw, _from=f"column {name!r}"), dtype=torch.float32)

    def encode_values(self, values: Any, _from: str | None = None) -> np.ndarray:
        """Encode raw values (a column, an array, or intervention values) to ``[n, d]``."""
        kind, name = self.vtype.kind, self.name
        where = _from or f"variable {name!r}"
        if kind == "continuous":
            cols = columns_of(name, self.vtype)
            if not isinstance(values, pd.DataFrame):
                arr = np.asarray(values)
                if arr.reshape(len(arr), -1).shape[1] != len(cols):
                    raise DataError(f"{where} needs {len(cols)} value(s) per row, got shape {arr.shape}")
                values = pd.DataFrame(arr.reshape(len(arr), -1), columns=cols)
            x = _model_scale(_numeric(values, cols, name), self.vtype,
                             lambda j: (f"column {cols[j]!r} (variable {name!r})" if len(cols) > 1
                                        else _from or f"variable {name!r}"))
            return (x - np.asarray(self.state["loc"])) / np.asarray(self.state["scale"])
        values = np.asarray(values)
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        elif values.ndim > 1:
            raise DataError(f"{where} needs 1 value per row, got shape {values.shape}")
        values = values.reshape(-1)
        if kind == "binary":
            num = _to01(values)
            bad = ~np.isin(num, [0.0, 1.0])
            if bad.any():
                missing = pd.isna(values[bad])
                what = ([f"{int(missing.sum())} missing value(s)"] if missing.any() else []) + (
                    [f"{int((~missing).sum())} value(s) other than 0/1, e.g. "
                     f"{pd.unique(values[bad][~missing])[:3].tolist()}"] if (~missing).any() else [])
                levels = pd.unique(values[~pd.isna(values)])
                hint = (f"; a column of two other values {levels.tolist()} is categorical: declare it "
                        f"{{'type': 'categorical'}}, or map it to 0/1" if len(levels) == 2 and (~missing).any()
                        else "")
                raise DataError(f"{where} is binary but has {' and '.join(what)}{hint}")
            return num.astype(np.float64)[:, None]
        if kind == "categorical":
            cats = list(self.vtype.categories)
            lookup = {c: i for i, c in enumerate(cats)}
            lookup.update({str(c): i for i, c in enumerate(cats)})
            if any(isinstance(c, int) for c in cats) and self.state.get("dtype", "").startswith("datetime64"):
                lookup.update({_plain(pd.Timestamp(c)): i for i, c in enumerate(cats)})  # older files: ns
            idx = np.array([lookup.get(_plain(v), lookup.get(str(v), -1)) for v in values])
            if (idx < 0).any() and self.state.get("dtype", "").startswith("datetime64"):
                # dates read back from a CSV ("2022-01-15") or typed on the command line
                for i in np.flatnonzero(idx < 0):
                    with contextlib.suppress(TypeError, ValueError):
                        idx[i] = lookup.get(_plain(pd.Timestamp(_plain(values[i]))), -1)
            if (idx < 0).any():
                unseen = pd.unique(values[idx < 0])[:5].tolist()
                raise DataError(f"{where} has {int((idx < 0).sum())} value(s) in categories not seen "
                                f"at fit: {unseen}; known categories: {cats}")
            return idx.astype(np.float64)[:, None]
        raise DataError(f"variable {name!r} of kind {kind!r} has no scalar encoding")

    def features(self, value: torch.Tensor) -> torch.Tensor:
        """The encoding of this variable as its children's input."""
        if self.vtype.kind == "categorical":
            return torch.nn.functional.one_hot(value.long().squeeze(-1), self.feature_dim).to(value.dtype)
        if self.vtype.kind in ("continuous", "binary"):
            return value
        raise DataError(f"variable {self.name!r} of kind {self.vtype.kind!r} cannot be a parent")

    def decode(self, value: torch.Tensor) -> np.ndarray:
        """Back to the data's units: ``[n, dim]`` for continuous, ``[n]`` for discrete, arrays as is."""
        v = value.detach().cpu().numpy()
        kind = self.vtype.kind
        if kind == "continuous":
            x = v.astype(np.float64) * np.asarray(self.state["scale"]) + np.asarray(self.state["loc"])
            return np.exp(x) if self.vtype.positive else x
        if kind == "binary":
            return v[:, 0].round().astype(np.int64)
        if kind == "categorical":
            return np.asarray(self.vtype.categories, dtype=object)[v[:, 0].round().astype(int)]
        return v

    def observed(self, data) -> np.ndarray:
        """This variable's own values in ``data``, exactly, in the shape :meth:`decode` returns."""
        kind = self.vtype.kind
        if kind in ("image", "expression"):
            return np.asarray(data.arrays[self.name])
        table = _table(data)
        if kind == "continuous":
            return table[columns_of(self.name, self.vtype)].to_numpy(dtype=np.float64)
        return table[self.name].to_numpy()

    def check_support(self, values: np.ndarray) -> None:
        """Warn when continuous intervention values leave the range seen at fit."""
        if self.vtype.kind != "continuous":
            return
        x = np.asarray(values, dtype=float).reshape(len(values), -1)
        lo, hi = np.asarray(self.state["min"]), np.asarray(self.state["max"])
        outside = ((x < lo) | (x > hi)).any(1)
        if outside.any():
            warn(f"do({self.name}): {int(outside.sum())} value(s) outside the range seen at "
                          f"fit [{lo.min():.4g}, {hi.max():.4g}]; the mechanisms extrapolate there",
                          OutOfSupportWarning)

    def to_dict(self) -> dict:
        return {"type": self.vtype.to_dict(), "state": self.state}

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> "Codec":
        from ..graph import as_type
        codec = cls(name, as_type(d["type"], name), dict(d.get("state", {})))
        missing = [k for k in ("loc", "scale", "min", "max") if k not in codec.state] \
            if codec.vtype.kind == "continuous" else []
        if missing:
            raise ValueError(f"the codec of {name!r} lacks {missing}")
        return codec


def _plain(v: Any) -> Any:
    """numpy scalars to Python scalars and dates/times to ISO strings, so categories are
    JSON-serializable and a date matches whatever type it is given as."""
    if isinstance(v, (np.datetime64, datetime.date)):  # datetime and pd.Timestamp included
        return pd.Timestamp(v).isoformat()
    return v.item() if isinstance(v, np.generic) else v


def _each(names, work) -> dict:
    """``{name: work(name)}``, with the DataErrors of every name raised together (a table with
    problems in three columns says so at once, not one fit at a time)."""
    out, problems = {}, []
    for name in names:
        try:
            out[name] = work(name)
        except DataError as e:
            problems.append(str(e))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} variables cannot be read:\n  - " + "\n  - ".join(problems))
    return out


def fit_codecs(data, graph: CausalGraph) -> dict[str, Codec]:
    check_columns(data, graph)

    def fit(name):
        return Codec.fit(name, graph.variables[name], data)

    def fit_and_check(name):
        codec = fit(name)
        if codec.vtype.kind not in ("image", "expression"):
            codec.encode(data)
        return codec
    try:
        return _each(graph.variables, fit)
    except DataError:  # name every problem at once: the values of the columns that did fit are checked too
        _each(graph.variables, fit_and_check)
        raise


def check_columns(data, graph: CausalGraph, names=None) -> None:
    """Raise one error naming every missing column/array of the variables ``names``."""
    table = _table(data)
    names = list(graph.variables) if names is None else list(names)
    cols = [c for n in names if graph.variables[n].kind not in ("image", "expression")
            for c in columns_of(n, graph.variables[n])]
    _missing(cols, list(table.columns))
    repeated = sorted({c for c in cols if (table.columns == c).sum() > 1})
    if repeated:
        raise DataError(f"column(s) {repeated} appear more than once in the table; keep one of each")
    arrays = [n for n in names if graph.variables[n].kind in ("image", "expression")]
    if arrays:
        available = list(data.arrays) if isinstance(data, Cohort) else []
        _missing(arrays, available, what="array")


def encode(data, graph: CausalGraph, codecs: Mapping[str, Codec], names=None) -> dict[str, torch.Tensor]:
    """Encode the variables ``names`` (default: all) of ``data`` to tensors."""
    names = list(graph.variables) if names is None else list(names)
    check_columns(data, graph, names)
    return _each(names, lambda n: codecs[n].encode(data))


def intervention_values(codec: Codec, raw: np.ndarray) -> torch.Tensor:
    """Encode intervention values, with errors and support warnings that name the variable."""
    try:
        enc = codec.encode_values(raw)
    except DataError as e:
        raise InterventionError(f"do({codec.name}=...): {e}") from None
    codec.check_support(raw)
    return torch.as_tensor(enc, dtype=torch.float32)


def decode(tensors: Mapping[str, torch.Tensor], graph: CausalGraph, codecs: Mapping[str, Codec],
           like=None, n: int | None = None, exact: Mapping[str, np.ndarray] | None = None):
    """Tensors back to the container kind of ``like`` (a DataFrame or a Cohort).

    Columns of ``like`` that are not variables are kept as they are; its index is kept.
    ``exact`` gives raw values (e.g. intervention values) written as they are, so that
    ``do(x=0.1)`` reads back 0.1 and not its float32 round trip.
    """
    n = n if n is not None else len(next(iter(tensors.values())))
    table = _table(like).copy() if like is not None else pd.DataFrame(index=pd.RangeIndex(n))
    arrays = dict(like.arrays) if isinstance(like, Cohort) else {}
    for name in graph.variables:
        if name not in tensors:
            continue
        values = codecs[name].decode(tensors[name])
        if exact and name in exact and graph.variables[name].kind == "continuous":
            values = np.asarray(exact[name], dtype=np.float64)
        if graph.variables[name].kind in ("image", "expression"):
            arrays[name] = values
            continue
        if graph.variables[name].kind != "continuous":
            table[name] = codecs[name].restore(values)
            continue
        values = values.reshape(n, -1)
        for j, c in enumerate(columns_of(name, graph.variables[name])):
            table[c] = values[:, j]
    if isinstance(like, Cohort) or arrays:
        if isinstance(like, Cohort):
            return Cohort(table, arrays, id_column=like.id_column, meta=like.meta)
        return Cohort(table, arrays, id_column="id")
    return table
