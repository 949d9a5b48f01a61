"""Cohort recipes: a TOML file naming the data, the variables, the edges and the mechanisms.

```toml
name = "cardio"
edges = [["age", "sbp"], ["bmi", "sbp"]]

[data]
path = "cardio.csv"            # relative to the recipe file; CSV or Parquet

[variables]
age = "continuous"
bmi = "continuous"
sbp = "continuous"

[mechanisms]                   # optional, per variable; defaults by type
sbp = "flow"                   # or { name = "flow", transforms = 4 }

[fit]                          # optional: arguments of CausalModel.fit
seed = 0
max_epochs = 200
```

Scans of one image variable come with the table: ``[data] path = "patients.csv"``,
``images = "scans/"`` (or ``image_column = "scan_path"``), ``id_column = "subject"`` and
``image_options = { intensity = "percentile", on_error = "skip" }`` (keywords of
:func:`medcausal.adapters.load_images`), with ``mri = { type = "image", shape = [1, 64, 64] }``
in ``[variables]``.

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "r.toml"
>>> _ = p.write_text('edges = [["a", "b"]]\\n[data]\\npath = "d.csv"\\n[variables]\\na = "continuous"\\nb = "continuous"\\n')
>>> load_recipe(p).graph().parents("b")
('a',)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import MedCausalError, RecipeError
from .graph import CausalGraph

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Strict):
    """Where the data come from: a table file (``path``) or a ground-truth simulator (``synthetic``)."""

    path: str | None = None
    synthetic: str | None = None      # "triangle", "chain", ... (mc.synthetic.scm) or "brain"
    n: int = Field(5000, ge=2)        # rows drawn from the simulator
    seed: int = 0
    options: dict[str, Any] = {}      # keyword arguments of the simulator, e.g. {additive = false}
    # Scans of the one Image variable (medcausal.adapters.load_images), matched to the rows
    # of ``path`` by ``id_column``: a folder / .npz (``images``) or a column of file paths.
    images: str | None = None
    image_column: str | None = None
    id_column: str = "id"
    image_options: dict[str, Any] = {}  # e.g. {intensity = "percentile", on_error = "skip"}

    def model_post_init(self, _):
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of data.path (a CSV/Parquet file) or data.synthetic (a simulator)")
        if (self.images or self.image_column) and self.path is None:
            raise ValueError("data.images / data.image_column need data.path: the table of patient variables")
        if self.images and self.image_column:
            raise ValueError("give data.images (a folder or .npz) or data.image_column (paths in the table), not both")


class FitSection(_Strict):
    seed: int = 0
    max_epochs: int | None = Field(None, ge=1)  # None: the mechanisms' defaults (see CausalModel.fit)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(512, ge=1)
    lr: float = Field(3e-3, gt=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    patience: int | None = Field(None, ge=1)


class Recipe(_Strict):
    name: str = "cohort"
    data: DataSection
    variables: dict[str, Union[str, dict[str, Any]]]
    edges: list[tuple[str, str]] = []
    mechanisms: dict[str, Union[str, dict[str, Any]]] = {}
    fit: FitSection = FitSection()
    base_dir: Path = Path(".")

    def graph(self) -> CausalGraph:
        return CausalGraph(self.variables, self.edges)

    def data_path(self) -> Path:
        p = Path(self.data.path)
        return p if p.is_absolute() else self.base_dir / p

    def load_data(self):
        """The training data: read from ``data.path`` or drawn from ``data.synthetic``."""
        if self.data.images or self.data.image_column:
            return self._load_images()
        if self.data.path is not None:
            from .adapters.tabular import text_columns
            from .io import read_table
            return read_table(self.data_path(), str_columns=text_columns(self.graph()))
        from . import synthetic
        name = self.data.synthetic
        try:
            if name == "brain":
                sim = synthetic.BrainMRI(**self.data.options)
            else:
                sim = synthetic.scm(name, **self.data.options)
        except (TypeError, MedCausalError) as e:
            raise RecipeError(f"data.options for simulator {name!r}: {e}") from None
        return sim.sample(self.data.n, seed=self.data.seed)


    def _load_images(self):
        from .adapters.images import load_images
        from .graph import Image

        graph = self.graph()
        images = [v for v, t in graph.variables.items() if isinstance(t, Image)]
        if len(images) != 1:
            raise RecipeError(f"data.images needs exactly one image variable in [variables], found {images}")
        name = images[0]
        source = None if self.data.images is None else str(self.base_dir / self.data.images)
        try:
            return load_images(source, table=self.data_path(), id_column=self.data.id_column,
                               shape=graph.variables[name].shape, image_column=self.data.image_column,
                               name=name, **self.data.image_options)
        except TypeError as e:
            raise RecipeError(f"data.image_options: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; errors name the file and the key (or line) at fault."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from None
    try:
        recipe = Recipe(**raw, base_dir=path.parent)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
        raise RecipeError(f"{path}: invalid recipe:\n" + "\n".join(lines)) from None
    except TypeError as e:
        raise RecipeError(f"{path}: invalid recipe: {e}") from None
    try:
        recipe.graph()
    except MedCausalError as e:
        raise RecipeError(f"{path}: [variables]/edges: {e}") from None
    unknown = [v for v in recipe.mechanisms if v not in recipe.variables]
    if unknown:
        raise RecipeError(f"{path}: [mechanisms] names unknown variable(s) {unknown}")
    return recipe
