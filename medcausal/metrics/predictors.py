r"""Anti-causal predictors: a small CNN that reads a variable's parents back from images.

Trained by medcausal itself (with the one training loop, :func:`medcausal.train.train`)
on real training images, they serve three purposes:

- **effectiveness** (Monteiro et al., ICLR 2023): does a counterfactual image show the
  intervened value? (:meth:`AntiCausalPredictor.predict` +
  :func:`medcausal.metrics.images.effectiveness`);
- **realism**: their penultimate features (:meth:`AntiCausalPredictor.features`) feed
  the Fréchet distance of :func:`medcausal.metrics.images.feature_frechet_distance`;
- **counterfactual fine-tuning** of ``hvae``/``cvae``: :meth:`AntiCausalPredictor.parent_nll`
  is the frozen predictor's loss on a parent vector in the mechanism's layout.

Each target is ``"continuous"`` (Gaussian head on the standardized value), ``"binary"``
(logistic head) or an int ``k >= 2`` (a categorical with ``k`` classes, softmax head).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = rng.random((64, 1, 16, 16)).astype("float32")
>>> p = AntiCausalPredictor((1, 16, 16), {"mean": "continuous"}, channels=[4, 8])
>>> p = p.fit(x, {"mean": x.mean((1, 2, 3))}, max_epochs=2, verbose=False)
>>> p.predict(x)["mean"].shape, p.features(x).shape
((64,), (64, 32))
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, MedCausalError

__all__ = ["AntiCausalPredictor"]


def _width(kind: Any) -> int:
    if kind in ("continuous", "binary"):
        return 1
    if isinstance(kind, (int, np.integer)) and not isinstance(kind, bool) and kind >= 2:
        return int(kind)
    raise MedCausalError(f"target kind must be 'continuous', 'binary' or an int >= 2 (classes), got {kind!r}")


class AntiCausalPredictor(nn.Module):
    """CNN ``image -> targets``: 3x3 conv + SiLU + 2x2 average pooling per block, global
    average pooling, a ``features``-wide hidden layer (the realism features), one head
    per target.

    ``targets``: ordered dict name -> kind. The order and widths (1, 1, ``k``) define the
    parent-vector layout read by :meth:`parent_nll`.
    """

    def __init__(self, image_shape: tuple[int, ...], targets: Mapping[str, Any],
                 channels: list[int] | tuple[int, ...] = (16, 32, 64, 64), features: int = 32):
        super().__init__()
        if len(image_shape) != 3:
            raise MedCausalError(f"AntiCausalPredictor reads 2D images (C, H, W), got shape {tuple(image_shape)}")
        if not targets:
            raise MedCausalError("AntiCausalPredictor needs at least one target")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.targets = {str(k): (v if isinstance(v, str) else int(v)) for k, v in targets.items()}
        self.widths = {k: _width(v) for k, v in self.targets.items()}
        if min(self.image_shape[1:]) < 2 ** len(channels):
            raise DataError(f"images of {self.image_shape[1]}x{self.image_shape[2]} are too small for "
                            f"{len(channels)} blocks (each halves the size; need at least "
                            f"{2 ** len(channels)}x{2 ** len(channels)}): pass fewer channels=")
        layers: list[nn.Module] = []
        c_in = self.image_shape[0]
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)]
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.hidden = nn.Linear(c_in, features)
        self.heads = nn.ModuleDict({k: nn.Linear(features, w) for k, w in self.widths.items()})
        n_cont = len(self.targets)
        self.register_buffer("loc", torch.zeros(n_cont))
        self.register_buffer("scale", torch.ones(n_cont))

    # -- network ---------------------------------------------------------------
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.hidden(self.conv(x).mean((2, 3))))

    def _outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self._features(x)
        return {k: head(f) for k, head in self.heads.items()}

    def _nll(self, outputs: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for i, (k, kind) in enumerate(self.targets.items()):
            out, v = outputs[k], values[k]
            if kind == "continuous":
                z = (v.reshape(-1) - self.loc[i]) / self.scale[i]
                total = total + 0.5 * (out[:, 0] - z) ** 2
            elif kind == "binary":
                total = total + F.binary_cross_entropy_with_logits(out[:, 0], v.reshape(-1).float(),
                                                                   reduction="none")
            else:
                total = total + F.cross_entropy(out, v.reshape(-1).long(), reduction="none")
        return total

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-row loss of a batch ``{"x": images, name: values...}`` (for the training loop)."""
        return self._nll(self._outputs(batch["x"]), batch)

    # -- data ------------------------------------------------------------------
    def _tensor_images(self, images: Any) -> torch.Tensor:
        try:
            x = images.detach().float() if torch.is_tensor(images) else torch.as_tensor(np.asarray(images, np.float32))
        except (TypeError, ValueError):
            raise DataError("images must be a numeric array or tensor") from None
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise DataError(f"images must be [n, {', '.join(map(str, self.image_shape))}], got {tuple(x.shape)}")
        if len(x) == 0:
            raise DataError("images holds no images (n = 0)")
        if not torch.isfinite(x).all():
            raise DataError(f"images has {int((~torch.isfinite(x)).sum())} non-finite value(s)")
        return x

    def _tensor_values(self, values: Mapping[str, Any], n: int) -> dict[str, torch.Tensor]:
        missing = [k for k in self.targets if k not in values]
        if missing:
            raise DataError(f"missing target value(s) {missing}; have {list(values)}")
        out = {}
        for k, kind in self.targets.items():
            v = np.asarray(values[k])
            if kind not in ("continuous", "binary") and v.ndim == 2:  # one-hot -> index
                v = v.argmax(1)
            v = v.reshape(-1)
            try:
                v = v.astype(np.float64)
            except (TypeError, ValueError):
                raise DataError(f"target {k!r} must be numeric, got dtype {v.dtype}") from None
            if not np.isfinite(v).all():
                raise DataError(f"target {k!r} has {int((~np.isfinite(v)).sum())} missing or infinite value(s)")
            if len(v) != n:
                raise DataError(f"target {k!r} has {len(v)} values for {n} images")
            if kind == "binary" and not np.isin(v, [0, 1]).all():
                raise DataError(f"binary target {k!r} has values other than 0/1")
            if kind not in ("continuous", "binary") and ((v < 0) | (v >= kind)).any():
                raise DataError(f"categorical target {k!r} has labels outside 0..{kind - 1}")
            out[k] = torch.as_tensor(v.astype(np.float32))
        return out

    # -- training and use --------------------------------------------------------
    def fit(self, images: Any, values: Mapping[str, Any], *, max_epochs: int = 30, max_steps: int | None = None,
            batch_size: int = 64, lr: float = 2e-3, patience: int = 5, seed: int = 0,
            verbose: bool | None = None) -> "AntiCausalPredictor":
        """Fit on real images and their targets' values with :func:`medcausal.train.train`;
        returns ``self`` (in eval mode, the best-validation weights kept)."""
        from ..train import TrainConfig, forked_rng, train

        x = self._tensor_images(images)
        vals = self._tensor_values(values, len(x))
        with torch.no_grad():
            for i, (k, kind) in enumerate(self.targets.items()):
                if kind == "continuous":
                    self.loc[i] = vals[k].mean()
                    self.scale[i] = vals[k].std().clamp_min(1e-8)
        config = TrainConfig(max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
                             patience=patience, seed=seed, verbose=verbose)
        with forked_rng(seed=seed):  # the caller's random state is left as it was
            self.fit_result = train(self, {"x": x, **vals}, config)
        self.eval()
        return self

    def _batched(self, images: Any, fn, batch_size: int = 256) -> list:
        x = self._tensor_images(images)
        outs = []
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                outs.append(fn(x[s:s + batch_size]))
        return outs

    def predict(self, images: Any, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Per target: the predicted value (continuous, in the target's units), the
        probability of 1 (binary) or class probabilities ``[n, k]`` (categorical)."""
        parts = self._batched(images, self._outputs, batch_size)
        out = {}
        for i, (k, kind) in enumerate(self.targets.items()):
            o = torch.cat([p[k] for p in parts])
            if kind == "continuous":
                out[k] = (o[:, 0] * self.scale[i] + self.loc[i]).numpy().astype(np.float64)
            elif kind == "binary":
                out[k] = torch.sigmoid(o[:, 0]).numpy().astype(np.float64)
            else:
                out[k] = torch.softmax(o, 1).numpy().astype(np.float64)
        return out

    def features(self, images: Any, batch_size: int = 256) -> np.ndarray:
        """Penultimate-layer features ``[n, features]`` (the realism encoder)."""
        return torch.cat(self._batched(images, self._features, batch_size)).numpy().astype(np.float64)

    def parent_nll(self, images: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """Per-row loss of a parent vector laid out as ``targets`` (widths 1, 1, ``k``
        one-hot), differentiable in ``images``: the counterfactual fine-tuning objective."""
        width = sum(self.widths.values())
        if parents.dim() != 2 or parents.shape[1] != width:
            raise DataError(f"parents must be [n, {width}] laid out as {self.widths}, got {tuple(parents.shape)}")
        values, start = {}, 0
        for k, w in self.widths.items():
            block = parents[:, start:start + w]
            values[k] = block[:, 0] if w == 1 else block.argmax(1)
            start += w
        return self._nll(self._outputs(images), values)
