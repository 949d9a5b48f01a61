"""The one training loop every mechanism is trained with.

``train(module, tensors, config)`` minimizes ``module(batch).mean()`` where ``batch``
is a dict of row-aligned tensors: minibatches, a validation split (random, or the rows
``val_rows`` names) with early stopping
(the best weights are restored, per part: see below), a learning rate halved on plateaus
of the validation loss (per part: see below), a progress bar
on a terminal, and data-parallel training when launched under ``torchrun``
(gloo on CPU, nccl on GPU): every rank holds the same data and the same seed, takes
its share of each minibatch, and DDP averages the gradients; the training loss, where it
decides (no validation split), is the ranks' mean, so all ranks take the same steps and
end with identical weights.

A module whose loss is a sum of independent parts (disjoint parameters, one loss term
each, as the mechanisms of a causal model) can say so with ``part_losses(batch) ->
{name: per-row loss}`` and ``parts() -> {name: submodule}``. Each part then keeps the
weights of its own best validation epoch, has its own learning rate, halved on plateaus of
its own validation loss, and training stops when no part has improved for ``patience``
epochs: a part whose validation loss is noisy no longer picks the epoch (or the learning
rate) for all the others. A part left out of ``parts()`` (a mechanism with
``select_by_validation = False``) keeps its last weights and has no say in stopping (such
parts share one learning rate, on their summed validation loss);
with no parts at all, training runs to ``max_epochs``/``max_steps``. Without a validation
split (``val_fraction=0`` or under 20 rows) the total training loss stands in for every
part's validation loss. Submodules with an ``after_optimizer_step()`` method (weight
averaging) have it called after every step. A module with ``start_from_data(tensors, rows)``
gets the training rows once before the first step (a data-dependent start, e.g. a
categorical's base rates); the private loop never calls it.

>>> import torch
>>> from torch import nn
>>> class Mean(nn.Module):
...     def __init__(self):
...         super().__init__(); self.mu = nn.Parameter(torch.zeros(1))
...     def forward(self, batch):
...         return (batch["x"] - self.mu).pow(2).squeeze(-1)
>>> m = Mean()
>>> result = train(m, {"x": torch.full((100, 1), 3.0)}, TrainConfig(max_epochs=300, lr=0.05, verbose=False))
>>> round(m.mu.item(), 2)
3.0
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import pickle
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import MedCausalError


@dataclass
class TrainConfig:
    """Settings of :func:`train`. ``max_steps`` (if set) stops before ``max_epochs``."""

    max_epochs: int = 200
    max_steps: int | None = None
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    patience: int = 20
    grad_clip: float | None = 10.0
    # A gradient norm over this many times its recent median (or not finite): skip the batch if
    # it is as far out at the earlier weights, else undo the update before it and go on with no
    # momentum and half the learning rate (None: off); see _SpikeGuard.
    spike_guard: float | None = 50.0
    seed: int = 0
    verbose: bool | None = None  # None: a progress bar only when stderr is a terminal
    device: str = "cpu"
    # Rows (indices into the tensors) that form the validation set, e.g. a declared split;
    # the other rows train. None: a random ``val_fraction`` of the rows.
    val_rows: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("max_epochs", "batch_size", "patience", "max_steps", "seed"):
            v = getattr(self, name)
            if name == "max_steps" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise MedCausalError(f"{name} must be an integer, got {v!r}")
            if name != "seed" and v < 1:
                raise MedCausalError(f"{name} must be >= 1, got {v}")
        if not -2**63 <= self.seed < 2**64:
            raise MedCausalError(f"seed must be in [-2**63, 2**64) (torch's seed range), got {self.seed}")
        for name in ("lr", "weight_decay", "val_fraction", "grad_clip", "spike_guard"):
            v = getattr(self, name)
            optional = name in ("grad_clip", "spike_guard")
            if (not optional or v is not None) and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise MedCausalError(f"{name} must be a number, got {v!r}")
        try:  # "cuda:0" or torch.device("cuda", 0): kept as its name, which the model file can hold
            self.device = str(torch.device(self.device))
        except (TypeError, RuntimeError) as e:
            raise MedCausalError(f"device must name a torch device (e.g. 'cpu', 'cuda'), got {self.device!r}: "
                                 f"{e}") from None
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise MedCausalError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.weight_decay < math.inf:
            raise MedCausalError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not 0.0 < self.grad_clip < math.inf:
            raise MedCausalError(f"grad_clip must be a finite number > 0 (None: no clipping), got {self.grad_clip}")
        if self.spike_guard is not None and not 1.0 < self.spike_guard < math.inf:
            raise MedCausalError(f"spike_guard must be a finite number > 1 (None: off), got {self.spike_guard}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise MedCausalError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_rows is not None:
            try:
                self.val_rows = tuple(int(i) for i in self.val_rows)
            except (TypeError, ValueError):
                raise MedCausalError(f"val_rows must be row indices (integers), got {self.val_rows!r}") from None


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    world_size: int = 1
    rolled_back: int = 0  # updates undone by the spike guard (TrainConfig.spike_guard)
    skipped_batches: int = 0  # batches it skipped as out of line (not the update's doing)
    best_epochs: dict[str, int] = field(default_factory=dict)  # per part, when the module has parts

    def to_dict(self) -> dict:
        return asdict(self)


def distributed_setup(device: str = "cpu") -> tuple[int, int]:
    """(rank, world size) of the process group: the caller's if it made one (``mp.spawn`` and
    ``init_process_group``, say), else one made here under torchrun; (0, 1) otherwise."""
    if not torch.distributed.is_available():
        return 0, 1
    if not torch.distributed.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        cuda = str(device).startswith("cuda")
        if cuda and torch.device(device).index is None and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU a rank ("cuda" means the current one)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def ranks() -> tuple[int, int]:
    """(rank, world size) of the process group (:func:`distributed_setup`), else (0, 1)."""
    return distributed_setup("cpu")


_GLOO: list = []  # the process group for the ranks' small messages (created once, by every rank)


def message_group():
    """The default process group if it is gloo, else (nccl, after a GPU fit) a gloo group, so that
    the object messages stay on the CPU."""
    if torch.distributed.get_backend() == "gloo":
        return None
    if not _GLOO:
        _GLOO.append(torch.distributed.new_group(backend="gloo"))
    return _GLOO[0]


def on_rank0(job):
    """``job()`` run on rank 0 alone, its result (or its exception) on every rank; ``job()`` itself
    without torchrun. A failure on rank 0 thus stops every rank rather than leave them waiting."""
    rank, world = ranks()
    if world == 1:
        return job()
    box = [None]
    if rank == 0:
        try:
            box = [(job(), None)]
        except Exception as e:
            box = [(None, portable_error(e))]
    torch.distributed.broadcast_object_list(box, src=0, group=message_group())
    result, error = box[0]
    if error is not None:
        raise error
    return result


def portable_error(error: Exception) -> Exception:
    """``error`` if it can be sent to the other ranks (pickled), else a MedCausalError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return MedCausalError(f"{type(error).__name__}: {error}")


def gather_ranks(value) -> list:
    """Every rank's ``value``, in rank order (torch.distributed.all_gather_object)."""
    out = [None] * ranks()[1]
    torch.distributed.all_gather_object(out, value, group=message_group())
    return out


def _split(n: int, config: TrainConfig, generator: torch.Generator):
    """Training and validation rows: the given ``val_rows``, or a random ``val_fraction``."""
    if config.val_rows is not None:
        val = torch.tensor(config.val_rows, dtype=torch.long)
        if len(val) and (int(val.min()) < 0 or int(val.max()) >= n):
            raise MedCausalError(f"val_rows must index the {n} rows, got values in [{int(val.min())}, "
                                 f"{int(val.max())}]")
        if len(set(config.val_rows)) != len(val):
            raise MedCausalError("val_rows holds a row more than once")
        keep = torch.ones(n, dtype=torch.bool)
        keep[val] = False
        if not keep.any():
            raise MedCausalError(f"val_rows takes all {n} rows: none are left to train on")
        return torch.nonzero(keep).squeeze(1), val
    perm = torch.randperm(n, generator=generator)
    n_val = int(round(n * config.val_fraction)) if n >= 20 else 0
    if n_val >= n:
        raise MedCausalError(f"val_fraction={config.val_fraction} of {n} rows leaves none to train on; "
                             f"lower val_fraction")
    return perm[n_val:], perm[:n_val]


def _check_tensors(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The tensors, row-aligned and finite, floating ones in the module's ``dtype``; else an error naming one."""
    if not tensors:
        raise MedCausalError("no tensors to train on: give a dict of row-aligned tensors")
    n = len(next(iter(tensors.values())))
    out = {}
    for k, v in tensors.items():
        if len(v) != n:
            raise MedCausalError(f"tensor {k!r} has {len(v)} rows, the others {n}: tensors must be row-aligned")
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            if not torch.isfinite(v).all():
                raise MedCausalError(f"tensor {k!r} holds NaN or infinite values; remove or impute them")
            if dtype is not None:
                v = v.to(dtype)
        out[k] = v
    return out


def _nonfinite_parts(module: nn.Module, batch) -> list[str]:
    """The parts whose loss on ``batch`` is not finite (for the divergence error)."""
    if not hasattr(module, "part_losses"):
        return []
    with torch.no_grad():
        return [k for k, v in module.part_losses(batch).items() if not torch.isfinite(v).all()]


def _part_losses(module: nn.Module, batch) -> dict[str, torch.Tensor]:
    return module.part_losses(batch) if hasattr(module, "part_losses") else {"": module(batch)}


class _Plateau:
    """``ReduceLROnPlateau`` (halve after ``patience`` epochs without a relative improvement of
    1e-4) for one parameter group of an optimizer."""

    def __init__(self, group: dict, patience: int, factor: float = 0.5):
        self.group, self.patience, self.factor = group, patience, factor
        self.best, self.bad = math.inf, 0

    def step(self, value: float) -> None:
        if value < self.best * (1.0 - 1e-4):
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad > self.patience:
            new = self.group["lr"] * self.factor
            if self.group["lr"] - new > 1e-8:
                self.group["lr"] = new
            self.bad = 0


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # older torch
        for d, t in zip(dst, src):
            d.copy_(t)


def _part_label(key: str) -> str | None:
    """A part's name as the user wrote it: CausalModel keys its parts by variable name with "."
    written "\u00b7" (a ModuleDict key); ``None`` for a module without parts and for the rest."""
    return None if key in ("", "\0rest") else key.replace("\u00b7", ".")


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


class _SpikeGuard:
    """Undo the update that threw the weights off a cliff, and step more carefully there.

    Each optimizer step is checked before it is taken. When a parameter group's gradient norm
    is over ``factor`` times the median of its last ``window`` accepted norms (after
    ``warmup`` of them), or is not finite, the batch's gradient is computed again at the
    weights before the previous update:

    - still as far out: the batch is out of line (outlying rows), and it is skipped;
    - back in line: the previous update threw the weights off a cliff. The weights, their
      buffers (e.g. averaged weights) and the optimizer's state stay as they were before it,
      this batch is skipped, and the group that spiked loses its momentum and goes on with
      half its learning rate (a backtracking step: the schedule goes on from there).

    Skipped batches count as steps. VDVAE (Child 2021) skips spiking updates only; but a cliff
    shows one update *after* the ordinary-sized step that went over it (Adam moving a wide
    layer coherently: an hvae's posterior jumped so, and its KL term went from 10 to 1e6
    nats), so skipping alone leaves the network where it fell, and restoring alone lets the
    same step fall again.

    A loss that is not finite counts as a spike of every group (in one process; under DDP it
    stops training as before). The copy of the training state (weights, averaged weights,
    optimizer moments) doubles its memory; the module's buffers must change in place (as
    ``+=``, ``copy_`` and ``lerp_`` do), not be reassigned. Never used by private training:
    the norm of the un-noised gradient is not private.
    """

    def __init__(self, module: nn.Module, opt: torch.optim.Optimizer, factor: float, window: int = 100,
                 warmup: int = 20, limit: int = 25, names: list[str] | None = None):
        self.module, self.opt = module, opt
        self.names = [_part_label(n) for n in (names or [])]  # to name the part that diverged
        self.factor, self.window, self.warmup, self.limit = factor, window, warmup, limit
        self.norms: list[list[float]] = [[] for _ in opt.param_groups]
        self.live: list[torch.Tensor] = []
        self.saved: list[torch.Tensor] = []
        self.with_state: set[int] = set()  # ids of the parameters that had optimizer state when saved
        self.in_a_row = 0

    def _state(self) -> list[torch.Tensor]:
        """Every tensor an update changes, the live ones: the module's state (weights, averaged
        weights) and the optimizer's per-parameter state."""
        state = list(self.module.state_dict(keep_vars=True).values())
        for group in self.opt.param_groups:
            for p in group["params"]:
                state += [v for v in self.opt.state.get(p, {}).values() if torch.is_tensor(v)]
        return state

    @torch.no_grad()
    def save(self) -> None:
        if len(self.opt.state) != len(self.with_state) or not self.live:  # new optimizer state: list again
            self.live = self._state()
            self.saved = [t.detach().clone() for t in self.live]
            self.with_state = {id(p) for p in self.opt.state}
        else:
            _copy_all(self.saved, self.live)

    def _norms(self) -> list[float]:
        per_group = [[p.grad for p in g["params"] if p.grad is not None] for g in self.opt.param_groups]
        found = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()
                 for grads in per_group if grads]
        values = iter(torch.stack(found).tolist() if found else [])  # one device sync
        return [next(values) if grads else 0.0 for grads in per_group]

    def _spiked(self, norms: list[float]) -> list[bool]:
        return [not math.isfinite(n) or (len(seen) >= self.warmup and n > self.factor * _median(seen) > 0)
                for n, seen in zip(norms, self.norms)]

    def check(self, regrad: Callable[[], None], overflowed: bool = False) -> str | None:
        """``None``: take this step. ``"batch"``: skip this batch, whose gradient is as far out at
        the weights before the previous update (rows out of line, not a cliff). ``"update"``: the
        previous update was undone. ``regrad()`` recomputes this batch's gradients.
        ``overflowed``: the batch's loss was not finite (no gradients): every group spiked."""
        norms = [math.nan] * len(self.norms) if overflowed else self._norms()
        spiked = self._spiked(norms)
        if not any(spiked):
            self.in_a_row = 0
            for n, seen in zip(norms, self.norms):
                seen.append(n)
                del seen[:-self.window]
            return None
        self.in_a_row += 1
        if not self.saved or self.in_a_row > self.limit:
            where = ", ".join(repr(n) for n, hit in zip(self.names, spiked) if hit and n)
            raise MedCausalError("training diverged: " + (
                "a non-finite gradient before the first update" if not self.saved else
                f"{self.limit} gradients in a row over {self.factor:g}x their recent median norm") +
                (f" (of {where})" if where else "") + "; lower lr= or check the data for rows far out of line")
        with torch.no_grad():
            now = [t.detach().clone() for t in self.live]
            _copy_all(self.live, self.saved)
        self.opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            regrad()
        if any(a and b for a, b in zip(spiked, self._spiked(self._norms()))):
            with torch.no_grad():  # as far out before that update: the batch, not the update
                _copy_all(self.live, now)
            return "batch"
        for p in [p for p in self.opt.state if id(p) not in self.with_state]:  # made by the undone update
            del self.opt.state[p]
        for group, hit in zip(self.opt.param_groups, spiked):
            if hit:  # momentum would repeat the fall, and the weights are where steps this size fall
                group["lr"] *= 0.5
                for p in group["params"]:
                    if "exp_avg" in self.opt.state.get(p, {}):
                        self.opt.state[p]["exp_avg"].zero_()
        return "update"


def _param_groups(parts: Mapping[str, nn.Module], params: list) -> dict[str, list]:
    """The trainable parameters by part (each selected part its own group), the rest together."""
    groups, seen = {}, set()
    for name, part in parts.items():
        ps = [p for p in part.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in ps)
        if ps:
            groups[name] = ps
    rest = [p for p in params if id(p) not in seen]
    if rest:
        groups["\0rest"] = rest  # a key no part has
    return groups


def _selected_parts(module: nn.Module) -> dict[str, nn.Module]:
    """The parts whose best validation epoch the loop keeps (see the module docstring)."""
    if hasattr(module, "parts") != hasattr(module, "part_losses"):
        raise MedCausalError(f"{type(module).__name__} must define both parts() and part_losses(), or neither")
    if hasattr(module, "parts"):
        return module.parts()
    return {"": module} if getattr(module, "select_by_validation", True) else {}


def _after_step_hooks(module: nn.Module) -> list[Callable[[], None]]:
    """``after_optimizer_step`` of every submodule that has one (e.g. weight averaging)."""
    return [m.after_optimizer_step for m in module.modules() if hasattr(m, "after_optimizer_step")]


def _accelerator(device) -> tuple[str, int] | None:
    """``(device type, index)`` of an accelerator ``device``; ``None`` for the CPU or a bad name."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return None  # the caller reports the bad device
    if dev.type == "cpu":
        return None
    module = torch.get_device_module(dev.type)
    return dev.type, dev.index if dev.index is not None else getattr(module, "current_device", lambda: 0)()


@contextlib.contextmanager
def forked_rng(device="cpu", seed: int | None = None):
    """Torch's global RNG of the CPU and of a CUDA ``device``, restored after the block: seeding
    inside it (``seed``, or :func:`seed_rng`) leaves the caller's random state as it was (on
    other accelerators, their own RNG stays seeded).

    >>> import torch
    >>> state = torch.get_rng_state()
    >>> with forked_rng(seed=0):
    ...     a = torch.rand(1)
    >>> bool(torch.equal(torch.get_rng_state(), state))
    True
    """
    acc = _accelerator(device)
    # Another accelerator's RNG (e.g. mps) is not forked: fork_rng's per-device API is CUDA's.
    cuda = [acc[1]] if acc is not None and acc[0] == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        if seed is not None:
            seed_rng(seed, device)
        yield


def seed_rng(seed: int, device="cpu") -> None:
    """Seed torch's global RNG of the CPU and of ``device``'s accelerator (no other device's)."""
    torch.default_generator.manual_seed(seed)
    acc = _accelerator(device)
    if acc is not None:
        module = torch.get_device_module(acc[0])
        if hasattr(module, "device"):
            with module.device(acc[1]):
                module.manual_seed(seed)
        else:  # one device (e.g. mps)
            module.manual_seed(seed)


def _evaluate(module: nn.Module, tensors, idx, batch_size: int, seed: int = 0) -> dict[str, float]:
    """Mean validation loss of each part (one part, ``""``, for a module without parts)."""
    # Common random numbers: stochastic losses (ELBOs, denoising) draw the same noise at every
    # epoch, so the early-stopping comparison sees the model change, not the draw.
    totals: dict[str, float] = {}
    device = next(iter(tensors.values())).device
    with torch.no_grad(), forked_rng(device, seed=seed):
        for start in range(0, len(idx), 4 * batch_size):
            b = idx[start:start + 4 * batch_size]
            for name, loss in _part_losses(module, {k: v[b] for k, v in tensors.items()}).items():
                totals[name] = totals.get(name, 0.0) + loss.sum().item()
    return {name: total / max(len(idx), 1) for name, total in totals.items()}


def train(module: nn.Module, tensors: Mapping[str, torch.Tensor], config: TrainConfig | None = None,
          on_epoch: Callable[[dict], None] | None = None, privacy=None) -> TrainResult:
    """Train ``module`` (its forward maps a batch dict to per-row losses) in place.

    ``privacy`` (a plan from :func:`medcausal.privacy.engine.prepare`) trains with DP-SGD
    instead: see :func:`_train_private`.
    """
    config = config or TrainConfig()
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    tensors = _check_tensors(tensors, dtype)
    n = len(next(iter(tensors.values())))
    if n == 0:
        raise MedCausalError("no rows to train on")
    if privacy is not None:
        return _train_private(module, tensors, config, privacy, on_epoch)
    rank, world = distributed_setup(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    train_idx, val_idx = _split(n, config, gen)
    device = torch.device(config.device)
    module.to(device)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    params = [p for p in module.parameters() if p.requires_grad]
    result = TrainResult(world_size=world)
    if not params:
        return result
    net = module
    if world > 1:
        net = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
    if hasattr(module, "start_from_data"):  # a data-dependent start (never under DP: see _train_private)
        with torch.no_grad():
            module.start_from_data(tensors, train_idx)
    parts = _selected_parts(module)
    groups = _param_groups(parts, params)
    opt = torch.optim.Adam([{"params": ps} for ps in groups.values()], lr=config.lr,
                           weight_decay=config.weight_decay)
    # each part's learning rate falls when *its* validation loss stalls: one schedule on the sum let
    # the parts that had converged cut the rate of one still learning (a rare category's base rate)
    plateaus = {name: _Plateau(group, patience=max(1, config.patience // 3))
                for name, group in zip(groups, opt.param_groups)}
    batch = min(config.batch_size, len(train_idx))
    steps_per_epoch = max(1, len(train_idx) // batch)
    total = config.max_epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    show = config.verbose if config.verbose is not None else sys.stderr.isatty()
    bar = None
    if show and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="fit", unit="step", leave=False)
    after_step = _after_step_hooks(module)
    guard = _SpikeGuard(module, opt, config.spike_guard, names=list(groups)) if config.spike_guard else None
    best = {name: (math.inf, 0, None) for name in parts}  # part -> (val loss, epoch, weights)
    bad_epochs, t0 = 0, time.perf_counter()
    module.train()
    for epoch in range(config.max_epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        running, taken, rejected = 0.0, 0, 0.0
        for s in range(steps_per_epoch):
            rows = order[s * batch:(s + 1) * batch][rank::world]
            batch_rows = {k: v[rows] for k, v in tensors.items()}
            loss = net(batch_rows).mean()
            finite = bool(torch.isfinite(loss))
            # the guard takes an overflow in one process only: under DDP a rank's loss is its own,
            # and agreeing on it would take one more collective per step
            if not finite and (guard is None or not guard.saved or world > 1 or guard.in_a_row >= guard.limit):
                where = ", ".join(repr(_part_label(k)) for k in _nonfinite_parts(module, batch_rows))
                raise MedCausalError(f"training diverged at epoch {epoch}, step {result.steps}: loss is "
                                     f"{loss.item()}" + (f" (of {where})" if where else "") +
                                     "; lower lr= or check the data's scale")
            opt.zero_grad(set_to_none=True)
            if finite:
                loss.backward()
            result.steps += 1
            verdict = (guard.check(lambda: net(batch_rows).mean().backward(), overflowed=not finite)
                       if guard is not None else None)
            if verdict is not None:
                result.rolled_back += verdict == "update"
                result.skipped_batches += verdict == "batch"
                rejected += loss.item()
            else:
                if config.grad_clip:
                    nn.utils.clip_grad_norm_(params, config.grad_clip)
                if guard is not None:
                    guard.save()
                opt.step()
                for hook in after_step:
                    hook()
                running += loss.item()
                taken += 1
            if bar is not None:
                bar.update(1)
            if result.steps >= total:
                break
        train_loss = running / taken if taken else rejected / (s + 1)  # an epoch of rejected batches only
        if world > 1:  # the ranks' mean: every rank must take the same decisions (stopping, learning rates)
            mean = torch.tensor([train_loss], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(mean)
            train_loss = mean.item() / world
        if len(val_idx):
            module.eval()
            vals = _evaluate(module, tensors, val_idx, batch, config.seed)
            module.train()
            if epoch == 0 and not set(parts) <= set(vals):
                raise MedCausalError(f"{type(module).__name__}: parts() names {sorted(set(parts) - set(vals))} "
                                     f"that part_losses() does not return ({sorted(vals)})")
        else:  # no validation split: the training loss decides, for every part alike
            vals = {name: train_loss for name in parts}
        val = sum(vals.values()) if len(val_idx) else train_loss
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val,
                  "lr": max(g["lr"] for g in opt.param_groups), "rolled_back": result.rolled_back,
                  "skipped_batches": result.skipped_batches}
        if len(val_idx) and hasattr(module, "part_losses"):
            record["val_parts"] = vals
        if len(plateaus) > 1:
            record["lr_parts"] = {name: group["lr"] for name, group in zip(groups, opt.param_groups)
                                  if name in parts}
        result.history.append(record)
        if bar is not None:
            bar.set_postfix(val=f"{val:.4f}")
        if on_epoch is not None:
            on_epoch(record)
        rest = [v for k, v in vals.items() if k not in parts] if len(val_idx) else []
        for name, plateau in plateaus.items():
            plateau.step(vals[name] if name in parts else (sum(rest) if rest else val))
        improved = False
        for name, part in parts.items():
            if vals[name] < best[name][0] - 1e-6:
                best[name] = (vals[name], epoch, copy.deepcopy(part.state_dict()))
                improved = True
        bad_epochs = 0 if improved or not parts else bad_epochs + 1
        if result.steps >= total:
            break
        if bad_epochs >= config.patience:
            result.stopped_early = True
            break
    if bar is not None:
        bar.close()
    for name, part in parts.items():
        if best[name][2] is not None:
            part.load_state_dict(best[name][2])
    # The validation loss of the weights kept: each selected part's best, the others' last.
    # (A part that never improved on inf, e.g. a NaN loss, kept its last weights too.)
    kept = {name: (best[name][:2] if name in best and best[name][2] is not None else (v, epoch))
            for name, v in vals.items()}
    if len(val_idx):
        result.best_val_loss = sum(v for v, _ in kept.values())
    else:
        result.best_val_loss = min((b[0] for b in best.values()), default=train_loss)
    result.best_epoch = max((e for _, e in kept.values()), default=epoch)
    if hasattr(module, "part_losses"):  # without a validation split: the selected parts only
        result.best_epochs = {name: e for name, (_, e) in kept.items()}
    module.eval()
    result.seconds = time.perf_counter() - t0
    if result.rolled_back + result.skipped_batches > max(5, result.steps // 100) and rank == 0:
        warnings.warn(f"training: of {result.steps} steps, the spike guard skipped {result.skipped_batches} batches "
                      f"whose gradient norm was over {config.spike_guard:g}x the recent median (rows far out of "
                      f"line?) and undid {result.rolled_back} updates after which it was (a learning rate too "
                      f"high?); spike_guard=None trains on every batch as it is", stacklevel=2)
    return result


def train_rounds(module: nn.Module, tensors: Mapping[str, torch.Tensor], config: TrainConfig, rounds: int,
                 after_round: Callable[[int], None] | None = None) -> tuple[TrainResult, int]:
    """:func:`train` run ``rounds`` times, each with a share of ``max_epochs`` and ``max_steps``,
    with ``after_round(r)`` after each run (a refinement of the code, say); returns the
    summed result and the number of runs made (fewer when ``max_steps`` runs out).

    ``history`` numbers epochs across runs and tags each with its ``round``; ``best_val_loss`` is
    the best of any run (a refinement between runs can change what the loss compares).

    >>> import torch
    >>> from torch import nn
    >>> class Mean(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.mu = nn.Parameter(torch.zeros(1))
    ...     def forward(self, batch):
    ...         return (batch["x"] - self.mu).pow(2).squeeze(-1)
    >>> result, runs = train_rounds(Mean(), {"x": torch.ones(40, 1)}, TrainConfig(max_epochs=5, verbose=False), 2)
    >>> runs, [h["round"] for h in result.history], [h["epoch"] for h in result.history]
    (2, [0, 0, 0, 1, 1], [0, 1, 2, 3, 4])
    """
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or not 1 <= rounds <= config.max_epochs:
        raise MedCausalError(f"rounds must be an integer between 1 and max_epochs ({config.max_epochs}), "
                             f"got {rounds!r}")
    total, runs = TrainResult(), 0
    for r in range(rounds):
        epochs = config.max_epochs // rounds + (1 if r < config.max_epochs % rounds else 0)
        left = None if config.max_steps is None else -(-(config.max_steps - total.steps) // (rounds - r))
        if left is not None and left <= 0:
            break
        result = train(module, tensors, replace(config, max_epochs=epochs, max_steps=left))
        runs = r + 1
        offset = len(total.history)
        total.history += [dict(h, epoch=h["epoch"] + offset, round=r) for h in result.history]
        if result.best_val_loss < total.best_val_loss:
            total.best_val_loss, total.best_epoch = result.best_val_loss, offset + result.best_epoch
        total.steps += result.steps
        total.seconds += result.seconds
        total.rolled_back += result.rolled_back
        total.skipped_batches += result.skipped_batches
        total.stopped_early, total.world_size = result.stopped_early, result.world_size
        if after_round is not None:
            after_round(r)
    return total, runs


def _train_private(module: nn.Module, tensors: Mapping[str, torch.Tensor], config: TrainConfig, plan,
                   on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """DP-SGD (Opacus): Poisson-sampled logical batches of records, split into physical batches
    by Opacus's BatchMemoryManager; per-record gradients clipped to ``max_grad_norm``, Gaussian
    noise added, and the accountant stepped by the DP optimizer at every logical step. Under
    ``torchrun`` each rank takes its share of every logical batch, and the ranks take the update
    one process would (Opacus's DPDDP recipe: :meth:`PrivateSession._distribute`).

    Differences from the non-private loop, each because it would read private data outside
    the accountant: every record trains (no validation split, no early stopping, no
    plateau schedule, the last weights are kept) and no loss value is recorded.
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    rank, world = distributed_setup(config.device)
    if config.val_rows is not None:
        raise MedCausalError("private training has no validation set (every record trains under the "
                             "accountant): leave val_rows unset")
    device = torch.device(config.device)
    module.to(device)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    result = TrainResult(world_size=world, best_val_loss=None)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return result
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    session = plan.attach(module, opt, tensors)
    after_step = _after_step_hooks(module)
    show = config.verbose if config.verbose is not None else sys.stderr.isatty()
    bar = None
    if show and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.steps, desc="fit (DP)", unit="step", leave=False)
    t0 = time.perf_counter()
    module.train()
    try:
        with BatchMemoryManager(data_loader=session.loader, max_physical_batch_size=plan.physical_batch_size,
                                optimizer=session.optimizer) as loader:
            for epoch in range(config.max_epochs):
                for (records,) in loader:
                    if session.step(records):
                        for hook in after_step:
                            hook()
                        result.steps += 1
                        if bar is not None:
                            bar.update(1)
                        if result.steps >= plan.steps:
                            break
                record = {"epoch": epoch, "steps": result.steps, "lr": config.lr}
                result.history.append(record)
                result.best_epoch = epoch
                if on_epoch is not None:
                    on_epoch(record)
                if result.steps >= plan.steps:
                    break
    finally:
        session.close()
        if bar is not None:
            bar.close()
    module.eval()
    result.seconds = time.perf_counter() - t0
    return result
