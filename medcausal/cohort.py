"""``Cohort``: scalar variables in a table plus high-dimensional arrays, aligned by row.

``meta`` holds JSON-serializable facts about the whole cohort that row slicing keeps:
the adapters put the preprocessing of each array there (``meta["image_specs"]``, which
a fitted model stores so later queries preprocess identically) and what they skipped.

>>> import numpy as np, pandas as pd
>>> c = Cohort(pd.DataFrame({"age": [60.0, 70.0, 80.0]}), {"mri": np.zeros((3, 1, 8, 8))},
...            meta={"source": "demo"})
>>> len(c), c[1:].table["id"].tolist(), c[[0, 2]].arrays["mri"].shape, c[1:].meta
(3, [1, 2], (2, 1, 8, 8), {'source': 'demo'})
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .errors import DataError


class Cohort:
    """A table of scalar variables (with an id column) plus arrays whose first axis is the row."""

    def __init__(self, table: pd.DataFrame, arrays: Mapping[str, np.ndarray] | None = None,
                 id_column: str = "id", meta: Mapping | None = None):
        if not isinstance(table, pd.DataFrame):
            raise DataError(f"Cohort.table must be a pandas DataFrame, got {type(table).__name__}")
        # an index named like the id column holds the ids: keep it as that column; another
        # named index (e.g. "subject") is data too: kept as a column of its name, never dropped
        name = table.index.name
        keep_index = name is not None and name not in table.columns and (name == id_column or name != "index")
        table = table.reset_index(drop=not keep_index)
        if id_column not in table.columns:
            table.insert(0, id_column, np.arange(len(table)))
        self.table = table
        self.id_column = id_column
        self.meta: dict = copy.deepcopy(dict(meta or {}))  # its own: editing it leaves the source's alone
        self.arrays: dict[str, np.ndarray] = {}
        for name, arr in (arrays or {}).items():
            arr = np.asarray(arr)
            if arr.ndim == 0 or arr.shape[0] != len(table):
                raise DataError(f"Cohort array {name!r} has {arr.shape[0] if arr.ndim else 0} rows; "
                                f"the table has {len(table)}")
            if name in table.columns:
                raise DataError(f"{name!r} is both a table column and an array")
            self.arrays[name] = arr

    @property
    def ids(self) -> np.ndarray:
        return self.table[self.id_column].to_numpy()

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, rows) -> "Cohort":
        if isinstance(rows, slice):
            idx = np.arange(len(self))[rows]
        else:
            idx = np.atleast_1d(np.asarray(rows))
            if idx.size == 0:
                idx = idx.astype(int)
            if idx.dtype.kind not in "biu":
                raise DataError(f"a Cohort is indexed by row positions, a slice or a boolean mask, "
                                f"got {rows!r}")
            if idx.dtype == bool:
                if idx.shape[0] != len(self):
                    raise DataError(f"boolean mask has {idx.shape[0]} entries for {len(self)} rows")
                idx = np.flatnonzero(idx)
        return Cohort(self.table.iloc[idx], {k: v[idx] for k, v in self.arrays.items()},
                      id_column=self.id_column, meta=self.meta)

    def copy(self) -> "Cohort":
        return Cohort(self.table.copy(), {k: v.copy() for k, v in self.arrays.items()},
                      id_column=self.id_column, meta=self.meta)

    def to_anndata(self, expression: str = "expression", layer: str = "counts", var_names=None):
        """This cohort as AnnData (scverse): the table as ``.obs``, the ``expression`` array as
        counts in ``X`` and ``layers[layer]``, other arrays in ``.obsm``."""
        from .adapters.singlecell import cohort_to_anndata
        return cohort_to_anndata(self, expression=expression, layer=layer, var_names=var_names)

    @classmethod
    def from_anndata(cls, adata, expression: str = "expression", layer: str | None = "counts") -> "Cohort":
        """A Cohort from AnnData: ``.obs`` as the table, the counts as the ``expression`` array."""
        from .adapters.singlecell import anndata_to_cohort
        return anndata_to_cohort(adata, expression=expression, layer=layer)

    def write(self, path: str | os.PathLike, image_format: str = "nifti") -> Path:
        """Write this cohort to ``path`` (every file atomically); :meth:`read` reads it back.

        ``.csv``/``.parquet``: the table, with each image array written one file per row
        (``image_format`` ``"nifti"`` or ``"png"``) into ``<stem>_<name>/`` beside it and named
        in the table's ``<name>_path`` column. ``.h5ad``: a cohort with an expression array, as
        AnnData. A sidecar ``<file>.json``, written last, keeps the array shapes, the column
        types and ``meta``.

        >>> import tempfile, numpy as np, pandas as pd
        >>> c = Cohort(pd.DataFrame({"age": [60.0, 70.0]}), {"mri": np.ones((2, 1, 4, 4), np.float32)})
        >>> back = Cohort.read(c.write(tempfile.mkdtemp() + "/cohort.csv"))
        >>> back.table.equals(c.table), bool((back.arrays["mri"] == c.arrays["mri"]).all())
        (True, True)
        """
        from .io import atomic_write
        from .simulate import _write_output

        path = Path(path)
        _write_output(self, path, image_format)
        sidecar = {"format": "medcausal-cohort", "version": 1, "id_column": self.id_column,
                   "dtypes": {str(c): str(t) for c, t in self.table.dtypes.items()},
                   "arrays": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in self.arrays.items()},
                   "meta": self.meta}
        with atomic_write(path.with_name(path.name + ".json")) as tmp:
            Path(tmp).write_text(json.dumps(sidecar, indent=1, default=str))
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Cohort":
        """Read a cohort written by :meth:`write` (scans as written: no resizing or rescaling)."""
        from .errors import DataError
        from .io import read_table

        path = Path(path)
        sidecar_path = path.with_name(path.name + ".json")
        if path.suffix.lower() == ".h5ad":
            from .adapters.singlecell import read_h5ad
            cohort = cls.from_anndata(read_h5ad(path))
            if sidecar_path.is_file():
                side = cls._sidecar(sidecar_path)
                cohort.meta = side["meta"]
                cohort.arrays = {k: a.astype(side["arrays"].get(k, {}).get("dtype", a.dtype), copy=False)
                                 for k, a in cohort.arrays.items()}
            return cohort
        if not sidecar_path.is_file():
            raise DataError(f"{str(path)!r} has no {sidecar_path.name} beside it: not written by Cohort.write "
                            "(read a table with pandas, scans with medcausal.adapters.load_images)")
        from .adapters.images import image_transform_spec, load_images

        side = cls._sidecar(sidecar_path)
        dtypes = side["dtypes"]
        text = [c for c, t in dtypes.items() if t in ("object", "string", "str")]
        table = read_table(path, str_columns=text)
        missing = [c for c in [*dtypes, *(f"{k}_path" for k in side["arrays"])] if c not in table.columns]
        if missing:
            raise DataError(f"{str(path)!r} lacks the column(s) {missing} its sidecar lists")
        arrays = {}
        for name, info in side["arrays"].items():
            spec = image_transform_spec(info["shape"], orientation=None, intensity=None, resize="none")
            files = pd.DataFrame({"_row": range(len(table)),  # paths relative to the table's folder
                                  f"{name}_path": [str(path.parent / f) for f in table[f"{name}_path"]]})
            if f"{name}_scale" in table.columns:  # a PNG's intensity factor
                files[f"{name}_scale"] = table[f"{name}_scale"].to_numpy()
            scans = load_images(None, table=files, id_column="_row", image_column=f"{name}_path", name=name,
                                spec=spec, progress=False)
            arrays[name] = scans.arrays[name].astype(info["dtype"], copy=False)
        table = table[list(dtypes)]
        for c, t in dtypes.items():
            if t not in ("object", "str") and str(table[c].dtype) != t:
                try:
                    table[c] = table[c].astype(t)
                except (TypeError, ValueError) as e:
                    raise DataError(f"{str(path)!r}: column {c!r} does not read back as {t}: {e}") from e
        return cls(table, arrays, id_column=side["id_column"], meta=side["meta"])

    @staticmethod
    def _sidecar(path: Path) -> dict:
        from .errors import DataError

        try:
            side = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {str(path)!r}: {e}") from e
        if side.get("format") != "medcausal-cohort":
            raise DataError(f"{str(path)!r} is not a medcausal cohort sidecar")
        return side

    def __repr__(self) -> str:
        arrays = ", ".join(f"{k}{tuple(v.shape[1:])}" for k, v in self.arrays.items())
        return f"Cohort(n={len(self)}, columns={list(self.table.columns)}, arrays=[{arrays}])"
