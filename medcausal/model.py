"""``CausalModel``: a causal graph plus one fitted mechanism per variable.

It trains the mechanisms (one loop, :mod:`medcausal.train`) and answers the three rungs
of Pearl's ladder in topological order: ``sample`` (observational), ``sample(do=...)``
(interventional) and ``counterfactual`` (abduction -> action -> prediction).

>>> import medcausal as mc
>>> sim = mc.synthetic.scm("chain")
>>> model = mc.CausalModel(sim.graph).fit(sim.sample(500, seed=0), max_epochs=5, verbose=False)
>>> cf = model.counterfactual(sim.sample(3, seed=1), do={"x1": 1.0})
>>> cf["x1"].tolist()
[1.0, 1.0, 1.0]
"""

from __future__ import annotations

import functools
import numbers
import os

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import __version__
from .adapters import tabular
from .cohort import Cohort
from .errors import (CapabilityError, DataError, GraphError, InterventionError, MedCausalError,
                     ModelFileError, NotFittedError)
from .graph import CausalGraph
from .interventions import is_vector_value, parse_do
from .io import load_model_file, save_model_file, weights_digest
from .mechanisms import Mechanism, registry
from .mechanisms.base import RowNoise
from .train import TrainConfig, TrainResult, forked_rng, seed_rng, train

FORMAT = "medcausal-model"
FORMAT_VERSION = 2  # 2: diffusion mechanisms also store averaged weights (ema.*); 1 still loads
_QUERY_ROWS = 8192  # rows per slice in log_prob


def _key(name: str) -> str:
    """A variable name as a ModuleDict key: no dots, not empty, not a ModuleDict attribute
    (a variable named ``type`` or ``train``); names that were already keys stay as they were."""
    key = name.replace(".", "\u00b7")
    return "\u00b7" + key if not key or hasattr(_EMPTY_MODULE_DICT, key) else key


_EMPTY_MODULE_DICT = nn.ModuleDict()  # its attributes (class and instance: training, _modules) are taken


def _saved_choice(choice, state: Mapping, prefix: str):
    """A saved mechanism choice, completed by its mechanism from the weights where an older file
    lacks a setting whose default changed (e.g. hvae's ``pose_warp``)."""
    if not isinstance(choice, Mapping) or choice.get("name") not in registry.available():
        return choice  # short forms and unknown names: the constructor says what is wrong
    name = choice["name"]
    return {"name": name, **registry.get(name).saved_hparams({k: v for k, v in choice.items() if k != "name"},
                                                             state, prefix)}


def _check_keys(graph: CausalGraph) -> None:
    """Two variables must not share a key, nor one take the key of another's parents (``x|pa``)."""
    owner: dict[str, str] = {}
    for name in graph.variables:
        for k in (_key(name), _key(name) + "|pa"):
            if k in owner:
                raise GraphError(f"variables {owner[k]!r} and {name!r} cannot both be in one model "
                                 f"(their internal names clash: {k!r}); rename one")
            owner[k] = name


class _JointLoss(nn.Module):
    """Sum of every mechanism's per-row loss: the one objective the loop minimizes.

    The mechanisms are its parts (disjoint parameters, one loss term each), so the loop
    keeps each mechanism's weights from its own best validation epoch.
    """

    def __init__(self, mechanisms: nn.ModuleDict):
        super().__init__()
        self.mechanisms = mechanisms

    def parts(self) -> dict[str, nn.Module]:
        """The mechanisms that keep their best validation epoch (``select_by_validation``)."""
        return {k: m for k, m in self.mechanisms.items() if m.select_by_validation}

    def part_losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: m.loss(batch[k], batch[k + "|pa"]) for k, m in self.mechanisms.items()}

    def start_from_data(self, tensors: Mapping[str, torch.Tensor], rows: torch.Tensor) -> None:
        for k, m in self.mechanisms.items():
            if type(m).start_from_data is not Mechanism.start_from_data:  # only those that use it see a copy
                m.start_from_data(tensors[k][rows], tensors[k + "|pa"][rows])

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.part_losses(batch).values())


class CausalModel:
    """A typed causal graph plus one mechanism per variable.

    ``mechanisms`` picks them: ``None`` (defaults by type: ``flow`` for continuous,
    ``categorical`` for binary/categorical), a name for every variable it supports
    (``mechanisms="additive"``), or a dict per variable whose values are a name or
    ``{"name": "flow", **hyperparameters}``.
    """

    def __init__(self, graph: CausalGraph, mechanisms: str | Mapping[str, Any] | None = None):
        if not isinstance(graph, CausalGraph):
            raise GraphError(f"CausalModel needs a CausalGraph, got {type(graph).__name__}")
        _check_keys(graph)
        self.graph = graph
        self._declared = graph  # as the user wrote it: each fit learns undeclared categories afresh
        self.choices = self._resolve(mechanisms)
        self.codecs: dict[str, tabular.Codec] | None = None
        self.mechanisms: nn.ModuleDict | None = None
        self.fit_info: dict = {}
        self.privacy: dict | None = None  # the DP ledger (medcausal.privacy); None: not private
        self.history: list[dict] = []  # one record per training epoch (see fit)
        self.device = torch.device("cpu")

    # -- construction --------------------------------------------------------
    def _resolve(self, mechanisms) -> dict[str, dict]:
        everywhere = mechanisms if isinstance(mechanisms, str) else None
        per_var = dict(mechanisms) if isinstance(mechanisms, Mapping) else {}
        if mechanisms is not None and everywhere is None and not isinstance(mechanisms, Mapping):
            raise MedCausalError("mechanisms= must be a name or a dict {variable: name or {'name': ...}}")
        unknown = [v for v in per_var if v not in self.graph.variables]
        if unknown:
            raise GraphError(f"mechanisms= names unknown variable(s) {unknown}; "
                             f"known: {list(self.graph.variables)}")
        if everywhere is not None:
            registry.get(everywhere)
        choices = {}
        for name, vtype in self.graph.variables.items():
            spec = per_var.get(name)
            if spec is None and everywhere and vtype.kind in registry.get(everywhere).supports:
                spec = everywhere
            spec = spec or registry.default_for(vtype.kind)
            if not isinstance(spec, (str, Mapping)):
                raise MedCausalError(f"mechanism for {name!r} must be a name or {{'name': ..., **settings}}, "
                                     f"got {spec!r}")
            spec = {"name": spec} if isinstance(spec, str) else dict(spec)
            if "name" not in spec:
                raise MedCausalError(f"mechanism for {name!r} needs a 'name', got {spec}")
            cls = registry.get(spec["name"])
            if vtype.kind not in cls.supports:
                raise MedCausalError(f"mechanism {spec['name']!r} cannot model variable {name!r} of kind "
                                     f"{vtype.kind!r}; it supports {list(cls.supports)}")
            choices[name] = spec
        return choices

    def _build(self) -> None:
        mechs = {}
        for name in self.graph.topological_order:
            parents = {p: self.codecs[p].feature_dim for p in self.graph.parents(name)}
            spec = dict(self.choices[name])
            cls = registry.get(spec.pop("name"))
            try:
                mechs[_key(name)] = cls(self.codecs[name].vtype, parents, **spec)
            except MedCausalError as e:  # same class, the variable named: mechanisms do not know it
                raise type(e)(f"mechanism {cls.name!r} of {name!r}: {e}") from None
            except (TypeError, ValueError) as e:  # e.g. int("x") of a setting given as a string
                raise MedCausalError(f"bad settings for mechanism {cls.name!r} of {name!r}: {e}") from None
        self.mechanisms = nn.ModuleDict(mechs)

    def mechanism(self, name: str) -> Mechanism:
        """The fitted mechanism of variable ``name``."""
        self._require_fit()
        self.graph.parents(name)  # raises on unknown names
        return self.mechanisms[_key(name)]

    @property
    def is_fitted(self) -> bool:
        return self.mechanisms is not None

    def _require_fit(self) -> None:
        if not self.is_fitted:
            raise NotFittedError("this CausalModel is not fitted yet: call .fit(data) first")

    # -- data ----------------------------------------------------------------
    def _parents(self, name: str, values: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        parents = self.graph.parents(name)
        if not parents:
            return torch.zeros(n, 0, device=self.device)
        return torch.cat([self.codecs[p].features(values[p]) for p in parents], dim=-1)

    def _encode(self, data, names=None) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in tabular.encode(data, self.graph, self.codecs, names).items()}

    def _decode(self, values, like=None, n=None, exact=None, from_inputs: bool = False):
        """Decoded outputs; ``attrs["privacy"]`` states the DP model's guarantee and what it covers
        (``from_inputs``: counterfactuals, whose rows reveal the input rows they derive from)."""
        if like is None and self.fit_info.get("data_kind") in ("cohort", "anndata"):
            like = Cohort(pd.DataFrame(index=range(n)))
        out = tabular.decode(values, self.graph, self.codecs, like=like, n=n, exact=exact)
        table = out.table if isinstance(out, Cohort) else out
        ledger = self.dp_ledger()
        table.attrs["privacy"] = None if ledger is None else {
            **{k: ledger[k] for k in ("epsilon", "delta", "privacy_unit")},
            "covers": ("the model's training data only: each row reveals the input row it derives from "
                       "(PRIVACY.md, counterfactuals of training patients)" if from_inputs else
                       "every row (post-processing of the private model)")}
        return out

    def _intervene(self, iv, current: torch.Tensor | None, n: int, exact: dict,
                   observed: np.ndarray | None = None) -> torch.Tensor:
        """Apply one intervention; its raw values go to ``exact`` for the output table.
        ``observed`` (raw values) stands in for ``current`` when given."""
        codec = self.codecs[iv.name]
        if observed is None and current is not None:
            observed = codec.restore(codec.decode(current))
        if observed is not None and codec.vtype.kind == "continuous" and codec.vtype.dim == 1:
            observed = np.asarray(observed).reshape(n)  # a scalar's values as [n], as in the data's column
        raw = iv.apply(observed, n)
        exact[iv.name] = raw
        return tabular.intervention_values(codec, raw).to(self.device)

    def _keep_where_parents_kept(self, name: str, x: torch.Tensor, factual: dict, world: dict, data,
                                 exact: dict) -> torch.Tensor:
        """``x`` with the factual value, exactly, in the rows whose parents all kept their factual
        values (a null intervention upstream, say): with its own noise a unit then takes its own
        value (consistency), which abduction and prediction give back only up to float rounding
        (or, for a lossy abduction such as a VAE's, up to its reconstruction error)."""
        n = len(x)
        kept = torch.ones(n, dtype=torch.bool, device=x.device)
        for p in self.graph.parents(name):
            if world[p] is not factual[p]:
                kept &= (world[p] == factual[p]).reshape(n, -1).all(1)
        if not kept.any():
            return x
        x = torch.where(kept.reshape(n, *[1] * (x.dim() - 1)), factual[name], x)
        codec = self.codecs[name]
        if codec.vtype.kind == "continuous":  # the kept rows read back as the data's own values
            raw = np.array(codec.decode(x), dtype=np.float64).reshape(n, -1)
            rows = kept.cpu().numpy()
            raw[rows] = codec.observed(data).reshape(n, -1)[rows]
            exact[name] = raw
        return x

    def _one_vector_value(self, do, n: int):
        """``do={"v": [a, b]}`` on a 2-vector ``v`` is one value for every row (a per-row spec of
        a vector is [n, dim]), not two per-row values. A DataFrame for a vector is read by its
        columns' names (``v[0]``, ``v[1]``, as in the data), not by their order; its rows by
        position (unlike a per-row ``pd.Series``, aligned by its index)."""
        if not isinstance(do, Mapping):
            return do
        out = dict(do)
        for name, spec in do.items():
            vtype = self.graph.variables.get(name)
            if getattr(vtype, "kind", None) != "continuous" or vtype.dim == 1 or callable(spec):
                continue
            if isinstance(spec, pd.DataFrame):  # rows by position, as any per-row array
                columns = tabular.columns_of(name, vtype)
                if sorted(map(str, spec.columns)) != sorted(columns):
                    raise InterventionError(f"do[{name!r}]: a DataFrame for the {vtype.dim}-vector {name!r} "
                                            f"needs the columns {columns}, got {list(spec.columns)}")
                out[name] = spec.rename(columns=str)[columns]
            elif is_vector_value(name, spec, self.graph.variables):
                out[name] = np.tile(np.asarray(spec, dtype=float)[None], (n, 1))
        return out

    def _to_anndata(self, out: Cohort, like=None):
        """A Cohort result as AnnData, the container the model was given (``like``: its cells)."""
        from .adapters.singlecell import cohort_to_anndata

        gene = next(v for v, t in self.graph.variables.items() if t.kind == "expression")
        adata = cohort_to_anndata(out, expression=gene, var_names=None if like is None else like.var_names)
        if like is not None:
            adata.obs_names = like.obs_names
        return adata

    def _from_anndata(self, data):
        """An AnnData becomes a Cohort: ``.obs`` as the table, its counts (layer ``counts`` if
        present, else ``X``) as the array of the graph's one expression variable."""
        if type(data).__module__.split(".")[0] != "anndata":
            return data
        from .adapters.singlecell import anndata_to_cohort

        genes = [v for v, t in self.graph.variables.items() if t.kind == "expression"]
        if len(genes) != 1:
            raise DataError(f"an AnnData fills the graph's one expression variable; the graph has {genes}")
        layer = "counts" if "counts" in data.layers else None
        return anndata_to_cohort(data, expression=genes[0], layer=layer,
                                 obs_keys=[k for k in data.obs.columns if k in self.graph.variables])

    # -- training ------------------------------------------------------------
    def fit(self, data, *, seed: int = 0, max_epochs: int | None = None, max_steps: int | None = None,
            batch_size: int = 512, lr: float = 3e-3, val_fraction: float = 0.1, patience: int | None = None,
            verbose: bool | None = None, device: str = "cpu", privacy=None,
            on_epoch: Callable[[dict], None] | None = None, spike_guard: float | None = 50.0) -> "CausalModel":
        """Fit every mechanism jointly by maximum likelihood (or its bound); returns ``self``.

        ``data`` is a DataFrame whose columns are the variable names, or a Cohort.
        Each mechanism keeps the weights of its own best validation epoch
        (``fit_info["best_epochs"]``), and training stops when no mechanism's validation
        loss has improved for ``patience`` epochs. Mechanisms whose loss is no guide to
        their counterfactuals (``select_by_validation = False``: ``diffusion``,
        ``image-diffusion``) keep their last, averaged weights and have no say in stopping.
        ``max_epochs`` and ``patience`` default to 200 and 20, or more where a mechanism
        declares it needs longer (its ``fit_defaults``; e.g. ``diffusion``).

        ``on_epoch(record)`` is called after every epoch with that epoch's record of
        ``model.history`` (losses, learning rate, and ``val_parts``: each mechanism's
        validation loss by variable name), e.g. to trace a query's accuracy during training.

        ``spike_guard``: when a mechanism's gradient norm jumps over this many times its recent
        median, the batch is skipped if it is out of line, or else the update before it is
        undone and that mechanism steps more carefully for a while (``fit_info["skipped_batches"]``,
        ``fit_info["rolled_back"]``; ``None``: off; private training never uses it).

        A fit that fails or is interrupted leaves the model as it was (its weights, codecs and
        privacy ledger), never half-trained under the old ledger.

        ``privacy=mc.Privacy(epsilon=..., ...)`` trains every mechanism jointly with DP-SGD
        under one accountant (no validation split, no early stopping); the ledger is
        ``model.privacy``. See ``privacy/PRIVACY.md``.
        """
        kept = {k: getattr(self, k, None) for k in ("codecs", "graph", "mechanisms", "privacy", "fit_info",
                                                    "history", "device")}
        try:
            # Training draws initial weights and the noise of stochastic losses from torch's global
            # RNG, seeded from ``seed``: forked, so the caller's global RNG state is left as it was.
            with forked_rng(device):
                return self._fit(data, seed=seed, max_epochs=max_epochs, max_steps=max_steps,
                                 batch_size=batch_size, lr=lr, val_fraction=val_fraction, patience=patience,
                                 verbose=verbose, device=device, privacy=privacy, on_epoch=on_epoch,
                                 spike_guard=spike_guard)
        except BaseException:  # KeyboardInterrupt too
            for k, v in kept.items():
                setattr(self, k, v)
            raise

    def _fit(self, data, *, seed, max_epochs, max_steps, batch_size, lr, val_fraction, patience, verbose,
             device, privacy, on_epoch, spike_guard) -> "CausalModel":
        if on_epoch is not None and not callable(on_epoch):
            raise MedCausalError(f"fit(on_epoch=...) takes a function of the epoch's record, got "
                                 f"{type(on_epoch).__name__}")
        given = data
        data = self._from_anndata(data)
        from_anndata = data is not given
        if not isinstance(data, (pd.DataFrame, Cohort)):
            raise DataError(f"fit() takes a pandas DataFrame, a medcausal Cohort or an AnnData, "
                            f"got {type(data).__name__}")
        if len(data) < 2:
            raise DataError(f"fit() needs at least 2 rows, got {len(data)}")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise MedCausalError(f"fit(seed=...) must be an integer or None, got {seed!r}")
        seed = int(seed)  # a numpy integer too: torch and the model file's JSON take plain ints
        classes = [registry.get(c["name"]) for c in self.choices.values()]
        if max_epochs is None:
            max_epochs = max(c.fit_defaults.get("max_epochs", 200) for c in classes)
        if patience is None:
            patience = max(c.fit_defaults.get("patience", 20) for c in classes)
        # How the cohort's images were preprocessed (medcausal.adapters.load_images): kept, so
        # scans given to later queries can be preprocessed identically.
        image_specs = {k: v for k, v in (data.meta.get("image_specs") or {}).items()
                       if k in self.graph.variables} if isinstance(data, Cohort) else {}
        # checks the settings before any work (the private plan reads batch_size and the epochs)
        config = TrainConfig(max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                             val_fraction=val_fraction, patience=patience, seed=seed, verbose=verbose,
                             device=device, spike_guard=spike_guard)
        plan = None
        if privacy is not None:
            from .privacy.engine import prepare
            plan = prepare(privacy, data, self._declared,
                           {_key(n): registry.get(c["name"]) for n, c in self.choices.items()},
                           batch_size=batch_size, max_epochs=max_epochs, max_steps=max_steps,
                           device=config.device)
            self.codecs, data = plan.codecs, plan.data  # plan.seed (the DP noise's) is never stored
        else:
            self.codecs = tabular.fit_codecs(data, self._declared)
        self.graph = CausalGraph({n: c.vtype for n, c in self.codecs.items()}, self.graph.edges)
        seed_rng(seed, device)  # the CPU's RNG and the training accelerator's only
        self._build()
        self.device = torch.device(device)
        values = self._encode(data)
        tensors = {}
        for name in self.graph.topological_order:
            tensors[_key(name)] = values[name]
            tensors[_key(name) + "|pa"] = self._parents(name, values, len(data))
        names = {_key(n): n for n in self.graph.variables}

        def epoch_done(record: dict) -> None:  # per-mechanism validation losses by variable name
            for key in ("val_parts", "lr_parts"):
                if key in record:
                    record[key] = {names.get(k, k): v for k, v in record[key].items()}
            if on_epoch is not None:
                on_epoch(record)

        result: TrainResult = train(_JointLoss(self.mechanisms), tensors, config, on_epoch=epoch_done,
                                    privacy=plan)
        with torch.no_grad():
            if plan is not None:
                plan.finalize(self.mechanisms, tensors)  # private versions only, accounted
            else:
                for name in self.graph.topological_order:
                    k = _key(name)
                    self.mechanisms[k].finalize(tensors[k], tensors[k + "|pa"])
        self.privacy = plan.ledger(result.steps) if plan is not None else None
        if self.privacy is not None:  # the ledger describes these weights and no others
            self.privacy["weights_sha256"] = weights_digest(self.mechanisms.state_dict())
        unit_level = plan is not None and plan.privacy.unit_column is not None
        self.fit_info = {"seed": seed, "n_rows": None if unit_level else len(data),  # see PRIVACY.md 3
                         "data_kind": ("anndata" if from_anndata else
                                       "cohort" if isinstance(data, Cohort) else "dataframe"),
                         "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                         "best_epochs": {n: result.best_epochs[_key(n)] for n in self.graph.topological_order
                                         if _key(n) in result.best_epochs},
                         "epochs": len(result.history), "steps": result.steps,
                         # timing is a side channel DP does not cover (PRIVACY.md 3): not kept
                         "seconds": None if plan is not None else round(result.seconds, 3),
                         "stopped_early": result.stopped_early,
                         "world_size": result.world_size,
                         "rolled_back": result.rolled_back,  # updates the spike guard undid
                         "skipped_batches": result.skipped_batches,  # batches it skipped
                         "config": {k: v for k, v in vars(config).items() if k != "verbose"},
                         "image_specs": image_specs}
        self.history = result.history
        return self

    @property
    def image_specs(self) -> dict:
        """``{image variable: preprocessing spec}`` of the cohort the model was fitted on.

        Give it to :func:`medcausal.adapters.load_images` (``spec=model.image_specs["mri"]``)
        so new scans are preprocessed exactly as the training scans were; empty when the
        images did not come through the image adapter.
        """
        return dict(self.fit_info.get("image_specs") or {})

    # -- queries -------------------------------------------------------------
    def sample(self, n: int, do: Mapping[str, Any] | None = None, seed: int | None = None):
        """Draw ``n`` units, optionally under interventions ``do`` (values, arrays or callables).

        Returns the container kind the model was fitted on (DataFrame, Cohort or AnnData).
        """
        self._require_fit()
        if (isinstance(n, (bool, str)) or not isinstance(n, numbers.Real) or not float(n).is_integer()
                or int(n) < 1):
            raise DataError(f"sample() needs a whole number n >= 1, got {n!r}")
        n = int(n)
        ivs = parse_do(self._one_vector_value(do, n), self.graph.variables)
        gen = _generator(seed)
        values: dict[str, torch.Tensor] = {}
        exact: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for name in self.graph.topological_order:
                iv = ivs.get(name)
                if iv is not None and not iv.needs_current:
                    values[name] = self._intervene(iv, None, n, exact)
                    continue
                x = self.mechanism(name).sample(self._parents(name, values, n), generator=gen)
                values[name] = x if iv is None else self._intervene(iv, x, n, exact)
        out = self._decode(values, n=n, exact=exact)
        return self._to_anndata(out) if self.fit_info.get("data_kind") == "anndata" else out

    def counterfactual(self, data, do: Mapping[str, Any], seed: int | None = None):
        """The counterfactual of each given unit under ``do``: same rows, same columns.

        Abduction -> action -> prediction, in topological order. Variables that are not
        descendants of an intervened variable keep their observed values. Discrete
        variables' noise is sampled from its posterior (``seed`` makes that reproducible).
        Those draws are keyed by each unit's label (a DataFrame's index, a cohort's ids, the
        cells' names) and the seed, so a unit's counterfactual is the same asked alone or
        in any batch (:class:`~medcausal.mechanisms.base.RowNoise`). Rows that carry provenance
        columns (those :func:`medcausal.simulate.simulate` writes) get the counterfactual's
        (:func:`~medcausal.simulate.restamp_counterfactual`), so they never describe how the input
        row was made.
        """
        self._require_fit()
        given = data
        data = self._from_anndata(data)
        if not isinstance(data, (pd.DataFrame, Cohort)):
            raise DataError(f"counterfactual() takes a pandas DataFrame, a medcausal Cohort or an AnnData, "
                            f"got {type(data).__name__}")
        index = (data.table if isinstance(data, Cohort) else data).index
        ivs = parse_do(self._one_vector_value(do, len(data)), self.graph.variables, index=index)
        if not ivs:
            raise InterventionError("counterfactual() needs at least one intervention in do=")
        n = len(data)
        if n == 0:
            raise DataError("counterfactual() got no rows: pass at least one unit")
        affected = set(ivs).union(*(self.graph.descendants(v) for v in ivs))
        needed = affected.union(*(self.graph.parents(v) for v in affected))
        order = [v for v in self.graph.topological_order if v in needed]
        factual = self._encode(data, order)
        gen = _generator(seed)
        labels = data.ids if isinstance(data, Cohort) else data.index
        label_keys = functools.cache(lambda: RowNoise.label_keys(labels))  # hashed once, at the first draw
        world = dict(factual)
        exact: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for name in order:
                if name not in affected:
                    continue
                iv = ivs.get(name)
                if iv is not None and not iv.needs_current:
                    world[name] = self._intervene(iv, None, n, exact)
                    continue
                if iv is not None and not self.graph.ancestors(name) & set(ivs):
                    # nothing upstream moved: the value it would have taken is the observed one, exactly
                    world[name] = self._intervene(iv, None, n, exact, observed=self.codecs[name].observed(data))
                    continue
                mech = self.mechanism(name)
                keyed = RowNoise(lambda name=name: RowNoise.for_rows(labels, gen.initial_seed(), stream=name,
                                                                     label_keys=label_keys()).keys, self.device)
                noise = mech.abduct(factual[name], self._parents(name, factual, n), generator=keyed)
                x = mech.sample(self._parents(name, world, n), noise=noise, generator=gen)
                if iv is None:
                    x = self._keep_where_parents_kept(name, x, factual, world, data, exact)
                world[name] = x if iv is None else self._intervene(iv, x, n, exact)
        out = self._decode({k: world[k] for k in affected}, like=data, n=n, exact=exact, from_inputs=True)
        from .simulate import restamp_counterfactual  # a table that tracks provenance keeps tracking it

        restamp_counterfactual(self, out.table if isinstance(out, Cohort) else out, do, seed, labels)
        return self._to_anndata(out, like=given) if given is not data else out

    def log_prob(self, data) -> pd.Series:
        """Per-row log-likelihood of the data (in the data's units), where every mechanism has one."""
        self._require_fit()
        missing = [v for v in self.graph.variables if not self.mechanism(v).has_log_prob]
        if missing:
            raise CapabilityError(f"no exact log-likelihood for variable(s) {missing} "
                                  f"(mechanisms {[self.choices[v]['name'] for v in missing]})")
        values = self._encode(data)
        n = len(data)
        total = torch.zeros(n, device=self.device)
        with torch.no_grad():
            for name in self.graph.topological_order:
                parents = self._parents(name, values, n)
                for i in range(0, n, _QUERY_ROWS):  # in slices: a mechanism's working memory grows per row
                    rows = slice(i, i + _QUERY_ROWS)
                    total[rows] += self.mechanism(name).log_prob(values[name][rows], parents[rows])
                vtype = self.graph.variables[name]
                if vtype.kind == "continuous":  # back to the data's units: the Jacobian of the encoding
                    total -= float(np.log(self.codecs[name].state["scale"]).sum())
                    if vtype.positive:  # and of the log: log x is the encoded value in the codec's units
                        state = self.codecs[name].state
                        log_x = values[name] * torch.as_tensor(state["scale"], dtype=total.dtype,
                                                               device=total.device) + torch.as_tensor(
                            state["loc"], dtype=total.dtype, device=total.device)
                        total -= log_x.sum(1)
        index = data.index if isinstance(data, pd.DataFrame) else None
        return pd.Series(total.cpu().numpy().astype(np.float64), index=index, name="log_prob")

    # -- persistence ---------------------------------------------------------
    def _current_choices(self) -> dict:
        """The mechanism choices with the query-time settings as they are now (``set_knobs``...)."""
        out = {}
        for name, choice in self.choices.items():
            mech = self.mechanisms[_key(name)]
            out[name] = {**choice, **{k: getattr(mech, k) for k in type(mech).query_settings}}
        return out

    def spec(self) -> dict:
        """The JSON-serializable description saved beside the weights."""
        self._require_fit()
        spec = {"format": FORMAT, "format_version": FORMAT_VERSION, "medcausal_version": __version__,
                "graph": self.graph.to_dict(), "mechanisms": self._current_choices(),
                "codecs": {n: c.to_dict() for n, c in self.codecs.items()}, "fit": self.fit_info,
                "privacy": self.privacy, "history": self.history}  # a DP fit's history holds no losses
        if self._declared != self.graph:  # the graph before fit learned categories: a refit learns them afresh
            spec["declared_graph"] = self._declared.to_dict()
        return _jsonable(spec)

    def dp_ledger(self) -> dict | None:
        """The DP ledger while it describes the current weights; None when the model is not
        private or its weights changed after the private fit. The guarantee outputs may state."""
        return self.privacy if self.privacy is not None and self._ledger_matches() else None

    def _ledger_matches(self, state: Mapping | None = None) -> bool:
        """False when the weights changed after the private fit (e.g. a mechanism retrained without
        DP), so the ledger no longer describes them; True otherwise (also for older files)."""
        digest = (self.privacy or {}).get("weights_sha256")
        return digest is None or digest == weights_digest(self.mechanisms.state_dict() if state is None
                                                          else state)

    def save(self, path: str | Path) -> Path:
        """Write weights + JSON spec atomically; load with :meth:`CausalModel.load`.

        A DP model whose weights changed after its private fit is refused: its ledger would
        claim a guarantee for weights it does not describe."""
        self._require_fit()
        state = self.mechanisms.state_dict()
        if not self._ledger_matches(state):
            from .privacy.config import PrivacyError
            raise PrivacyError("the weights changed after the private fit (a mechanism was retrained or "
                               "fine-tuned without privacy=), so the DP ledger no longer describes them; "
                               "refit with privacy=..., or set model.privacy = None to save it as a "
                               "non-private model")
        return save_model_file(path, self.spec(), state)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "CausalModel":
        """Load a model file; opening it never runs code (``torch.load(weights_only=True)``)."""
        path = Path(path)
        spec, state = load_model_file(path, FORMAT, FORMAT_VERSION)
        try:
            choices = {v: _saved_choice(c, state, _key(v) + ".") for v, c in spec["mechanisms"].items()}
            model = cls(CausalGraph.from_dict(spec["graph"]), mechanisms=choices)
            if "declared_graph" in spec:
                model._declared = CausalGraph.from_dict(spec["declared_graph"])
            model.codecs = {n: tabular.Codec.from_dict(n, d) for n, d in spec["codecs"].items()}
            model._build()
            model.mechanisms.load_state_dict(state, strict=True)
        except ModelFileError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"{str(path)!r} is a damaged medcausal model: {type(e).__name__}: {e}") from None
        model.fit_info = spec.get("fit", {})
        model.history = spec.get("history", [])  # files written before it was saved have none
        model.privacy = spec.get("privacy")
        if not model._ledger_matches(state):
            raise ModelFileError(f"{str(path)!r}: its DP ledger was written for other weights than the "
                                 "file holds; the stated guarantee does not apply to them")
        if model.privacy is not None and model.privacy.get("weights_sha256") is not None:
            # The load hooks may upgrade an older file's state (e.g. add a mechanism's buffers), a
            # fixed function of the weights just checked: the ledger now describes the upgraded state.
            model.privacy["weights_sha256"] = weights_digest(model.mechanisms.state_dict())
        model.mechanisms.eval()
        model.device = torch.device(device)
        model.mechanisms.to(model.device)
        return model

    def __repr__(self) -> str:
        mechs = ", ".join(f"{v}: {c['name']}" for v, c in self.choices.items())
        state = "fitted" if self.is_fitted else "not fitted"
        return f"CausalModel({mechs}; {state})"


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    elif isinstance(seed, bool) or not isinstance(seed, numbers.Real) or not float(seed).is_integer():
        raise MedCausalError(f"seed= must be an integer or None, got {seed!r}")
    elif not -2**63 <= int(seed) < 2**64:
        raise MedCausalError(f"seed= must be in [-2**63, 2**64) (torch's seed range), got {seed}")
    else:
        gen.manual_seed(int(seed))
    return gen


def _jsonable(obj):
    """``obj`` with numpy scalars and arrays (e.g. ``batch_size=np.int64(64)``) as plain Python, so
    the spec can be written as JSON."""
    if isinstance(obj, Mapping):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    return obj
