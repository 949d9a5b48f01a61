"""The one mechanism interface: the distribution of a variable given its parents.

A mechanism sees tensors only, already encoded by the model's adapter:

- ``value``: the variable, float ``[n, *event_shape]`` (continuous variables are
  standardized; binary/categorical are the category index as float ``[n, 1]``);
- ``parents``: the parents' features concatenated in the order of ``parent_dims``
  (a dict parent name -> feature width given at construction), float ``[n, parent_dim]``
  (``parent_dim`` may be 0 for a root). ``parent_slice(name)`` finds one parent in it.

Three verbs, plus training:

- ``sample(parents, noise=None, generator=None)``: draw (or, given ``noise``, compute) values;
- ``abduct(value, parents, generator=None) -> noise``: the unit's exogenous noise;
- ``loss(value, parents) -> [n]``: per-row training loss (NLL or negative ELBO);
- ``log_prob(value, parents) -> [n]`` where the mechanism has an exact likelihood.

``sample(parents, noise=abduct(value, parents))`` returns ``value``: exactly for
``abduction = "exact"``, within a stated tolerance otherwise.

A mechanism draws random numbers through :func:`rand` and :func:`randn`: the ``generator``
of ``abduct`` may be a :class:`RowNoise` (each row's draws keyed by the unit), so that a
unit's abducted noise never depends on the other rows of a query.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..errors import CapabilityError, MedCausalError
from ..graph import VariableType

ABDUCTION_KINDS = ("exact", "deterministic-approximate", "amortized", "sampled")


class Mechanism(nn.Module):
    """Base class; subclasses set ``name``, ``abduction`` and ``supports``.

    ``parents`` is a dict parent name -> feature width (or just the total width, for
    tests and standalone use). ``hparams`` are the keyword arguments of ``__init__``
    beyond ``variable`` and ``parents``; they are stored in the model file's JSON
    spec, so they must be JSON-serializable.
    """

    name: ClassVar[str] = ""
    abduction: ClassVar[str] = "exact"
    supports: ClassVar[tuple[str, ...]] = ()  # variable kinds: "continuous", "binary", ...
    has_log_prob: ClassVar[bool] = True
    # |sample(pa, abduct(x, pa)) - x| stays below this (standardized units); the contract test checks it.
    reconstruction_tolerance: ClassVar[float] = 1e-4
    # Training lengths this mechanism needs when the user gives none (``max_epochs``,
    # ``patience``); CausalModel.fit takes the largest over the model's mechanisms.
    fit_defaults: ClassVar[dict] = {}
    # True: the training loop keeps the weights of this mechanism's best validation epoch.
    # False: it keeps the last (averaged) weights and this mechanism's validation loss does
    # not decide when training stops (for losses that stop tracking query quality, e.g.
    # denoising losses; see ``diffusion``).
    select_by_validation: ClassVar[bool] = True
    # Hyperparameters a user may change after fit, read at query time (e.g. image-diffusion's
    # ``depth``): the model file saves their current values, not the constructor's.
    query_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, variable: VariableType, parents: Mapping[str, int] | int, **hparams: Any):
        super().__init__()
        self.variable = variable
        if isinstance(parents, Mapping):
            self.parent_dims = {str(k): int(v) for k, v in parents.items()}
        else:
            self.parent_dims = {f"pa{i}": 1 for i in range(int(parents))}
        self.parent_dim = sum(self.parent_dims.values())
        self.hparams = dict(hparams)

    @classmethod
    def saved_hparams(cls, hparams: dict, state: Mapping[str, Any], prefix: str) -> dict:
        """The hyperparameters to rebuild a saved mechanism with, from the saved choice and its
        weights (``state``, keys under ``prefix``): a mechanism whose default changed reads what an
        older file, written without that key, was built with."""
        return hparams

    def parent_slice(self, name: str) -> slice:
        """Where parent ``name``'s features sit in the ``parents`` tensor."""
        start = 0
        for k, width in self.parent_dims.items():
            if k == name:
                return slice(start, start + width)
            start += width
        raise KeyError(f"{name!r} is not a parent; parents: {list(self.parent_dims)}")

    # -- the three verbs -------------------------------------------------
    def sample(self, parents: torch.Tensor, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def abduct(self, value: torch.Tensor, parents: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, value: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Per-row training loss; the default is the negative log-likelihood."""
        return -self.log_prob(value, parents)

    def log_prob(self, value: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        raise CapabilityError(f"mechanism {self.name!r} has no exact log-likelihood")

    # -- optional hooks --------------------------------------------------
    def start_from_data(self, value: torch.Tensor, parents: torch.Tensor) -> None:
        """Called once before ordinary (non-private) training with the training rows: a
        data-dependent starting point (e.g. a categorical's base rates). Never under DP, where
        it would release the rows' statistics unprotected."""

    def finalize(self, value: torch.Tensor, parents: torch.Tensor) -> None:
        """Called once after training with (a sample of) the training data."""

    def _dtype(self) -> torch.dtype:
        """The dtype of the weights (inputs of another dtype are converted to it)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def _cast(self, *tensors):
        """The tensors in the weights' dtype (``None`` passes through): a float32 model takes
        float64 values and parents."""
        dtype = self._dtype()
        return tuple(None if t is None else t.to(dtype) for t in tensors)

    def noise_like(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fresh noise for ``n`` rows from the mechanism's noise prior."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"variable={self.variable.kind}, parent_dim={self.parent_dim}, abduction={self.abduction}"


class AveragedWeights:
    """Mixin for a mechanism whose network is ``self.net``: an exponential moving average of
    its weights, with warm-up (decay ``min(ema_decay, (1 + k) / (10 + k))`` at update ``k``).

    The training loop calls :meth:`after_optimizer_step` after every optimizer step (private
    training included: averaging DP weights is post-processing). ``_run(*args)`` calls the
    network with the averaged weights unless ``use_ema`` is off or ``ema=False``.
    """

    def _init_ema(self, decay: float, use_ema: bool) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise MedCausalError(f"{self.name}: ema_decay must be in [0, 1), got {decay}")
        self.ema_decay, self.use_ema = float(decay), bool(use_ema)
        self.ema = nn.Module()
        for name, p in self.net.named_parameters():
            self.ema.register_buffer(name.replace(".", "__"), p.detach().clone())
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self._register_load_state_dict_pre_hook(self._fill_missing_ema)

    def _fill_missing_ema(self, state_dict, prefix, *args) -> None:
        # A model file written before this mechanism averaged its weights: the average
        # starts from the saved weights, so queries answer exactly as they did.
        if prefix + "ema_steps" in state_dict:
            return
        for name, _ in self.net.named_parameters():
            if prefix + "net." + name in state_dict:
                state_dict.setdefault(prefix + "ema." + name.replace(".", "__"), state_dict[prefix + "net." + name])
        state_dict[prefix + "ema_steps"] = torch.zeros((), dtype=torch.long)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.ema_steps += 1
        k = float(self.ema_steps)
        d = min(self.ema_decay, (1.0 + k) / (10.0 + k))
        params = list(self.net.named_parameters())
        avg = [self.ema.get_buffer(name.replace(".", "__")) for name, _ in params]
        torch._foreach_lerp_(avg, [p.detach() for _, p in params], 1.0 - d)

    @torch.no_grad()
    def restart_average(self) -> None:
        """Continue training from the weights queries use: the live network takes the averaged
        weights (when averaging is on) and the average restarts its warm-up, so that it
        follows the new training rather than staying near the old weights."""
        if self.use_ema:
            for name, p in self.net.named_parameters():
                p.copy_(self.ema.get_buffer(name.replace(".", "__")))
        self.ema_steps.zero_()

    def ema_parameters(self) -> dict[str, torch.Tensor]:
        """The averaged weights, by the network's parameter names."""
        return {name: self.ema.get_buffer(name.replace(".", "__")) for name, _ in self.net.named_parameters()}

    def _run(self, *args, ema: bool | None = None, **kwargs):
        if self.use_ema if ema is None else ema:
            return torch.func.functional_call(self.net, self.ema_parameters(), args, kwargs)
        return self.net(*args, **kwargs)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward, gradient times ``-scale`` backward (Ganin & Lempitsky 2015): the
    adversarial games of ``fcr`` and ``hvae`` run inside the one training loop through it.

    >>> x = torch.ones(2, requires_grad=True)
    >>> grad_reverse(x, 2.0).sum().backward(); x.grad.tolist()
    [-2.0, -2.0]
    """
    return _GradReverse.apply(x, float(scale))


class RowNoise:
    """Random draws keyed by row: row ``i``'s values depend on ``keys[i]`` and on the order of
    the draws only, never on the other rows. ``CausalModel.counterfactual`` passes one as the
    ``generator`` of abduction, so a unit's counterfactual is the same asked alone or with others.

    ``keys``: one uint64 per row (:meth:`for_rows` makes them from row labels and a seed), or a
    function that makes them, called at the first draw (a mechanism that draws nothing costs
    nothing). Values are made on the CPU (``device`` moves them).

    >>> import numpy as np
    >>> whole = RowNoise(np.array([7, 8, 9], dtype=np.uint64)).uniform((3, 2))
    >>> alone = RowNoise(np.array([8], dtype=np.uint64)).uniform((1, 2))
    >>> torch.equal(whole[1:2], alone)
    True
    """

    _CHUNK = 4096  # rows per block of hashing (bounds the temporaries of a wide draw)

    def __init__(self, keys, device: torch.device | str = "cpu"):
        self._keys = keys
        self.device = torch.device(device)
        self.draws = 0

    @property
    def keys(self) -> "np.ndarray":
        import numpy as np

        if callable(self._keys):
            self._keys = self._keys()
        return np.asarray(self._keys, dtype=np.uint64)

    @staticmethod
    def label_text(labels) -> "np.ndarray":
        """Each row label as the text its noise is keyed by: the same whatever the container's
        dtype (``5``, ``np.int64(5)``, ``5.0`` and ``"5"`` alike; other values by their ``str``)."""
        import numbers

        import numpy as np
        import pandas as pd

        labels = pd.Index(labels)
        if labels.dtype.kind in "iu":
            return labels.astype(str).to_numpy(dtype=object)

        def canonical(v) -> str:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
                return str(v)
            return str(int(v)) if float(v).is_integer() else repr(float(v))
        return np.array([canonical(v) for v in labels], dtype=object)

    @staticmethod
    def label_keys(labels) -> "np.ndarray":
        """One uint64 per row label (:meth:`label_text`); a label seen again gets another key (its
        occurrence counts)."""
        import numpy as np
        import pandas as pd

        from ..synthetic.tabular import _mix64

        text = RowNoise.label_text(labels)
        base = pd.util.hash_array(text, categorize=False)  # fixed hash key: the same on every machine
        codes = pd.factorize(text)[0]
        occurrence = pd.Series(codes).groupby(codes).cumcount().to_numpy()
        with np.errstate(over="ignore"):
            return _mix64(base + occurrence.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))

    @classmethod
    def for_rows(cls, labels, seed: int, stream: str = "", device: torch.device | str = "cpu",
                 label_keys=None) -> "RowNoise":
        """Keys from row labels (a DataFrame's index, a cohort's ids; or their ``label_keys``,
        computed once for many streams), a seed and a stream name (e.g. the variable)."""
        import numpy as np
        import pandas as pd

        from ..synthetic.tabular import _mix64

        base = cls.label_keys(labels) if label_keys is None else label_keys
        salt = pd.util.hash_array(np.array([f"{int(seed)}/{stream}"], dtype=object), categorize=False)[0]
        with np.errstate(over="ignore"):
            return cls(_mix64(base ^ salt), device)

    def uniform(self, shape) -> torch.Tensor:
        """Float64 uniforms in (0, 1), ``shape[0]`` = the number of rows."""
        import numpy as np

        from ..synthetic.tabular import _hash_uniform

        shape = tuple(int(s) for s in shape)
        keys = self.keys
        if not shape or shape[0] != len(keys):
            raise MedCausalError(f"RowNoise has {len(keys)} rows; asked for shape {shape}")
        width = int(np.prod(shape[1:], dtype=np.int64))
        counters = (np.uint64(self.draws) << np.uint64(40)) + np.arange(width, dtype=np.uint64)
        self.draws += 1
        out = np.empty((shape[0], width), dtype=np.float64)
        for start in range(0, shape[0], self._CHUNK):
            rows = slice(start, start + self._CHUNK)
            out[rows] = _hash_uniform(keys[rows, None], counters[None, :])
        return torch.from_numpy(out.reshape(shape)).to(self.device)

    def normal(self, shape) -> torch.Tensor:
        """Float64 standard normals (the normal quantiles of :meth:`uniform`)."""
        from scipy.special import ndtri

        return torch.from_numpy(ndtri(self.uniform(shape).cpu().numpy())).to(self.device)


def rand(shape, generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.rand`` with an optional generator, or a :class:`RowNoise`'s uniforms."""
    if isinstance(generator, RowNoise):
        return generator.uniform(shape).to(dtype=dtype)
    return torch.rand(shape, generator=generator, dtype=dtype)


def randn(shape, generator: torch.Generator | RowNoise | None, like: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.randn`` on the device/dtype of ``like`` with an optional generator (or a
    :class:`RowNoise`'s normals)."""
    if isinstance(generator, RowNoise):
        out = generator.normal(shape)
        return out.float() if like is None else out.to(device=like.device, dtype=like.dtype)
    kw = {} if like is None else {"device": like.device, "dtype": like.dtype}
    if generator is not None:
        kw["device"] = generator.device
    out = torch.randn(shape, generator=generator, **kw)
    return out if like is None else out.to(like.device)


def check_count(setting: str, value, minimum: int = 1) -> int:
    """``value`` as an int; an error naming ``setting`` if it is not an integer (TypeError) or is
    below ``minimum`` (MedCausalError). CausalModel adds the variable's name to either.

    >>> check_count("bins", 0)
    Traceback (most recent call last):
    ...
    medcausal.errors.MedCausalError: bins must be >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{setting} must be an integer, got {value!r}")
    if value < minimum:
        raise MedCausalError(f"{setting} must be >= {minimum}, got {value}")
    return int(value)


def mlp(n_in: int, n_out: int, hidden: tuple[int, ...] = (64, 64), act=nn.SiLU) -> nn.Sequential:
    """A small MLP; with ``n_in == 0`` it learns a constant (bias-only) output."""
    for width in hidden:
        check_count("hidden widths", width)
    layers: list[nn.Module] = []
    if n_in == 0:
        return nn.Sequential(_Constant(n_out))
    dims = (n_in, *hidden)
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), act()]
    layers.append(nn.Linear(dims[-1], n_out))
    return nn.Sequential(*layers)


class _Constant(nn.Module):
    def __init__(self, n_out: int):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], -1)


class StandaloneLoss(nn.Module):
    """One mechanism as the training loop's module: a batch ``{"x", "pa"}`` -> per-row losses.

    For fitting a mechanism on its own (outside a CausalModel) with :func:`medcausal.train.train`.
    """

    def __init__(self, mech: Mechanism):
        super().__init__()
        self.mech = mech

    def parts(self) -> dict[str, nn.Module]:
        """The mechanism, unless it keeps its last weights (``select_by_validation``)."""
        return {"": self.mech} if self.mech.select_by_validation else {}

    def part_losses(self, batch) -> dict[str, torch.Tensor]:
        return {"": self.mech.loss(batch["x"], batch["pa"])}

    def forward(self, batch):
        return self.part_losses(batch)[""]
