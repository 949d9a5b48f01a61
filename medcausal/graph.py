"""The typed causal graph: variables with types, and the edges between them.

>>> import medcausal as mc
>>> g = mc.CausalGraph({"age": "continuous", "sex": "binary", "bp": "continuous"},
...                    edges=[("age", "bp"), ("sex", "bp")])
>>> g.parents("bp")
('age', 'sex')
>>> g.topological_order
('age', 'sex', 'bp')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import networkx as nx

from .errors import GraphError


def _whole(value: Any, what: str) -> int:
    """``value`` as a positive int (``2.0`` and ``"2"`` too, as JSON or TOML may give them)."""
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not number.is_integer() or number < 1:
        raise GraphError(f"{what} must be a whole number >= 1, got {value!r}")
    return int(number)


@dataclass(frozen=True)
class Continuous:
    """A real-valued variable; ``dim > 1`` makes it a vector (columns ``name[0]``, ...).

    ``positive=True`` declares values above zero (a lab value, a duration, a volume): the
    model works on their logarithm, so whatever it samples or predicts is positive, and a
    noise that scales with the value is additive there. Values <= 0 are refused, in the
    data and in interventions. In a recipe: ``crp = { type = "continuous", positive = true }``.

    >>> Continuous(positive=True)
    Continuous(dim=1, positive=True)
    """

    dim: int = 1
    positive: bool = False
    kind = "continuous"

    def __post_init__(self):
        object.__setattr__(self, "dim", _whole(self.dim, "Continuous dim"))
        if not isinstance(self.positive, bool):
            raise GraphError(f"Continuous positive must be true or false, got {self.positive!r}")

    def __repr__(self) -> str:
        return f"Continuous(dim={self.dim}" + (", positive=True)" if self.positive else ")")

    def to_dict(self) -> dict:
        return {"type": "continuous", "dim": self.dim, **({"positive": True} if self.positive else {})}


@dataclass(frozen=True)
class Binary:
    """A 0/1 variable (``True``/``False`` accepted)."""

    kind = "binary"

    def to_dict(self) -> dict:
        return {"type": "binary"}


@dataclass(frozen=True)
class Categorical:
    """A variable taking one of ``categories``; if omitted they are learned at fit."""

    categories: tuple | None = None
    kind = "categorical"

    def __post_init__(self):
        if self.categories is not None:
            if isinstance(self.categories, (str, bytes)):  # tuple("ab") would be ('a', 'b')
                raise GraphError(f"categories must be a list of values, got the string {self.categories!r}")
            if isinstance(self.categories, (set, frozenset)):  # their order differs between processes
                raise GraphError(f"categories must be an ordered list (their order fixes the one-hot "
                                 f"columns), got a set: {sorted(map(str, self.categories))}")
            cats = tuple(self.categories)
            if len(cats) < 2:
                raise GraphError(f"a categorical variable needs >= 2 categories, got {cats}")
            if len(set(cats)) != len(cats):
                raise GraphError(f"duplicate categories in {cats}")
            object.__setattr__(self, "categories", cats)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"type": "categorical"}
        if self.categories is not None:
            d["categories"] = list(self.categories)
        return d


@dataclass(frozen=True)
class Image:
    """An image variable of shape ``(channels, *spatial)`` (MONAI's channel-first)."""

    shape: tuple
    kind = "image"

    def __post_init__(self):
        try:
            shape = tuple(_whole(s, "an image size") for s in self.shape)
        except (TypeError, GraphError):
            shape = ()
        if len(shape) not in (3, 4):
            raise GraphError(f"Image shape must be (C, H, W) or (C, D, H, W) positive integers, "
                             f"got {self.shape!r}")
        object.__setattr__(self, "shape", shape)

    def to_dict(self) -> dict:
        return {"type": "image", "shape": list(self.shape)}


@dataclass(frozen=True)
class Expression:
    """A gene-expression count vector over ``n_genes`` genes."""

    n_genes: int
    kind = "expression"

    def __post_init__(self):
        object.__setattr__(self, "n_genes", _whole(self.n_genes, "Expression n_genes"))

    def to_dict(self) -> dict:
        return {"type": "expression", "n_genes": self.n_genes}


VariableType = Continuous | Binary | Categorical | Image | Expression
SCALAR_KINDS = ("continuous", "binary", "categorical")


def as_type(spec: Any, name: str = "?") -> VariableType:
    """Turn ``"continuous"``, ``{"type": "categorical", ...}`` or a type object into a type.

    >>> as_type({"type": "categorical", "categories": ["a", "b"]})
    Categorical(categories=('a', 'b'))
    """
    if isinstance(spec, (Continuous, Binary, Categorical, Image, Expression)):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise GraphError(f"variable {name!r}: cannot read type {spec!r}; use one of "
                         "'continuous', 'binary', 'categorical', mc.Image(shape), mc.Expression(n)")
    kind = str(spec["type"]).lower()
    args = {k: v for k, v in spec.items() if k != "type"}
    classes = {"continuous": Continuous, "binary": Binary, "categorical": Categorical,
               "image": Image, "expression": Expression}
    if kind not in classes:
        raise GraphError(f"variable {name!r}: unknown type {spec['type']!r}; "
                         f"known types: {sorted(classes)}")
    try:
        return classes[kind](**args)
    except GraphError as e:
        raise GraphError(f"variable {name!r}: {e}") from None
    except (TypeError, ValueError) as e:
        raise GraphError(f"variable {name!r}: bad arguments for type {kind!r}: {e}") from None


def table_columns(name: str, vtype: VariableType) -> list[str]:
    """The table columns that hold variable ``name``: ``[name]``, or ``name[0]``,
    ``name[1]``, ... for a continuous vector.

    >>> table_columns("z", Continuous(dim=2))
    ['z[0]', 'z[1]']
    """
    if vtype.kind == "continuous" and vtype.dim > 1:
        return [f"{name}[{i}]" for i in range(vtype.dim)]
    return [name]


class CausalGraph:
    """Variables with types and the directed acyclic edges between them.

    Validated at construction: every edge names known variables, no self-loops,
    no duplicate names, no cycles; errors name the culprit.
    """

    def __init__(self, variables: Mapping[str, Any] | Iterable[tuple[str, Any]],
                 edges: Iterable[tuple[str, str]] = ()):
        items = list(variables.items()) if isinstance(variables, Mapping) else list(variables)
        if not all(isinstance(i, (tuple, list)) and len(i) == 2 for i in items):
            raise GraphError("variables must be a dict {name: type} or (name, type) pairs, "
                             f"got {variables!r}")
        items = [(str(n), t) for n, t in items]  # keys as the names edges and columns are matched by
        names = [n for n, _ in items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise GraphError(f"duplicate variable name(s): {dupes}")
        if not names:
            raise GraphError("a causal graph needs at least one variable")
        self.variables: dict[str, VariableType] = {n: as_type(t, n) for n, t in items}
        owner: dict[str, str] = {}
        for n, t in self.variables.items():  # a vector's "v[0]" and a variable named "v[0]"
            for col in table_columns(n, t):
                if col in owner:
                    raise GraphError(f"variables {owner[col]!r} and {n!r} would both be the table column "
                                     f"{col!r}; rename one")
                owner[col] = n
        edge_list = []
        for e in edges:
            if isinstance(e, (str, bytes)) or not hasattr(e, "__len__") or len(e) != 2:
                raise GraphError(f"an edge is a (parent, child) pair, got {e!r}")
            p, c = str(e[0]), str(e[1])
            for v in (p, c):
                if v not in self.variables:
                    raise GraphError(f"edge ({p!r}, {c!r}) names unknown variable {v!r}; "
                                     f"known: {names}")
            if p == c:
                raise GraphError(f"self-loop on variable {p!r}")
            if (p, c) not in edge_list:
                edge_list.append((p, c))
        self.edges: tuple[tuple[str, str], ...] = tuple(edge_list)
        g = nx.DiGraph()
        g.add_nodes_from(names)
        g.add_edges_from(self.edges)
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            path = " -> ".join([cycle[0][0]] + [c for _, c in cycle])
            raise GraphError(f"the graph has a cycle: {path}")
        self._g = g
        order = {n: i for i, n in enumerate(names)}
        self.topological_order: tuple[str, ...] = tuple(
            nx.lexicographical_topological_sort(g, key=order.__getitem__))
        self._parents = {n: tuple(sorted(g.predecessors(n), key=order.__getitem__)) for n in names}

    def parents(self, name: str) -> tuple[str, ...]:
        """Parents of ``name`` in declaration order."""
        self._check(name)
        return self._parents[name]

    def children(self, name: str) -> tuple[str, ...]:
        self._check(name)
        return tuple(c for c in self.topological_order if name in self._parents[c])

    def descendants(self, name: str) -> set[str]:
        self._check(name)
        return set(nx.descendants(self._g, name))

    def ancestors(self, name: str) -> set[str]:
        self._check(name)
        return set(nx.ancestors(self._g, name))

    @property
    def roots(self) -> tuple[str, ...]:
        return tuple(n for n in self.topological_order if not self._parents[n])

    def to_networkx(self) -> nx.DiGraph:
        return self._g.copy()

    def to_dict(self) -> dict:
        return {"variables": {n: t.to_dict() for n, t in self.variables.items()},
                "edges": [list(e) for e in self.edges]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "CausalGraph":
        if not isinstance(d, Mapping) or "variables" not in d:
            raise GraphError(f"a graph dict needs a 'variables' key, got {d!r}")
        return cls(d["variables"], edges=[tuple(e) for e in d.get("edges", [])])

    def _check(self, name: str) -> None:
        if name not in self.variables:
            raise GraphError(f"unknown variable {name!r}; known: {list(self.variables)}")

    def __contains__(self, name: object) -> bool:
        return name in self.variables

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CausalGraph) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        vs = ", ".join(f"{n}: {t.kind}" for n, t in self.variables.items())
        es = ", ".join(f"{p}->{c}" for p, c in self.edges)
        return f"CausalGraph({{{vs}}}, edges=[{es}])"
