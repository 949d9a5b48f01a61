"""The one training loop every mechanism is trained with.

``train(module, tensors, config)`` minimizes ``module(batch).mean()`` where ``batch``
is a dict of row-aligned tensors: minibatches, a validation split with early stopping
(the best weights are restored), a learning rate halved on plateaus, a progress bar
on a terminal, and data-parallel training when launched under ``torchrun``
(gloo on CPU, nccl on GPU): every rank holds the same data and the same seed, takes
its share of each minibatch, and DDP averages the gradients, so all ranks end with
identical weights.

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

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
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
    seed: int = 0
    verbose: bool | None = None  # None: a progress bar only when stderr is a terminal
    device: str = "cpu"

    def __post_init__(self):
        if self.max_epochs < 1 or self.batch_size < 1:
            raise MedCausalError("max_epochs and batch_size must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise MedCausalError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    world_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def distributed_setup(device: str = "cpu") -> tuple[int, int]:
    """(rank, world size); initializes torch.distributed when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _split(n: int, val_fraction: float, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator)
    n_val = int(round(n * val_fraction)) if n >= 20 else 0
    return perm[n_val:], perm[:n_val]


def _evaluate(module: nn.Module, tensors, idx, batch_size: int, seed: int = 0) -> float:
    # Common random numbers: stochastic losses (ELBOs, denoising) draw the same noise at every
    # epoch, so the early-stopping comparison sees the model change, not the draw.
    total, count = 0.0, 0
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(idx), 4 * batch_size):
            b = idx[start:start + 4 * batch_size]
            total += module({k: v[b] for k, v in tensors.items()}).sum().item()
            count += len(b)
    return total / max(count, 1)


def train(module: nn.Module, tensors: Mapping[str, torch.Tensor], config: TrainConfig | None = None,
          on_epoch: Callable[[dict], None] | None = None, privacy=None) -> TrainResult:
    """Train ``module`` (its forward maps a batch dict to per-row losses) in place.

    ``privacy`` (a plan from :func:`medcausal.privacy.engine.prepare`) trains with DP-SGD
    instead: see :func:`_train_private`.
    """
    config = config or TrainConfig()
    n = len(next(iter(tensors.values())))
    if n == 0:
        raise MedCausalError("no rows to train on")
    if privacy is not None:
        return _train_private(module, tensors, config, privacy, on_epoch)
    rank, world = distributed_setup(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    train_idx, val_idx = _split(n, config.val_fraction, gen)
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
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5,
                                                       patience=max(1, config.patience // 3))
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
    best_state, bad_epochs, t0 = None, 0, time.perf_counter()
    module.train()
    for epoch in range(config.max_epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        running = 0.0
        for s in range(steps_per_epoch):
            rows = order[s * batch:(s + 1) * batch][rank::world]
            loss = net({k: v[rows] for k, v in tensors.items()}).mean()
            if not torch.isfinite(loss):
                raise MedCausalError(f"training diverged at epoch {epoch}, step {result.steps}: loss is "
                                     f"{loss.item()}; lower lr= or check the data's scale")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            running += loss.item()
            result.steps += 1
            if bar is not None:
                bar.update(1)
            if result.steps >= total:
                break
        module.eval()
        val = _evaluate(module, tensors, val_idx, batch, config.seed) if len(val_idx) else running / (s + 1)
        module.train()
        record = {"epoch": epoch, "train_loss": running / (s + 1), "val_loss": val,
                  "lr": opt.param_groups[0]["lr"]}
        result.history.append(record)
        if bar is not None:
            bar.set_postfix(val=f"{val:.4f}")
        if on_epoch is not None:
            on_epoch(record)
        sched.step(val)
        if val < result.best_val_loss - 1e-6:
            result.best_val_loss, result.best_epoch, bad_epochs = val, epoch, 0
            best_state = copy.deepcopy(module.state_dict())
        else:
            bad_epochs += 1
        if result.steps >= total:
            break
        if bad_epochs >= config.patience:
            result.stopped_early = True
            break
    if bar is not None:
        bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _train_private(module: nn.Module, tensors: Mapping[str, torch.Tensor], config: TrainConfig, plan,
                   on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """DP-SGD (Opacus): Poisson-sampled logical batches of records, split into physical batches
    by Opacus's BatchMemoryManager; per-record gradients clipped to ``max_grad_norm``, Gaussian
    noise added, and the accountant stepped by the DP optimizer at every logical step.

    Differences from the non-private loop, each because it would read private data outside
    the accountant: every record trains (no validation split, no early stopping, no
    plateau schedule, the last weights are kept) and no loss value is recorded.
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    _, world = distributed_setup(config.device)
    if world > 1:
        raise MedCausalError("private training under torchrun (Opacus DPDDP) is not supported yet; "
                             "train on one process")
    device = torch.device(config.device)
    module.to(device)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    result = TrainResult(world_size=1, best_val_loss=None)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return result
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    session = plan.attach(module, opt, tensors)
    show = config.verbose if config.verbose is not None else sys.stderr.isatty()
    bar = None
    if show:
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
