"""``flow``: a conditional normalizing flow (zuko's neural spline flow) per variable.

Deep structural causal model mechanism (Pawlowski, Castro & Glocker, NeurIPS 2020):
``x = f(u; pa)`` with ``u ~ N(0, I)`` and ``f`` invertible and monotone, conditioned on the
parents: a conditional affine map (an unbounded location-scale step, so values far in the
tails still move with the parents) followed by rational-quadratic spline transforms
(zuko's NSF, which shape the distribution inside [-5, 5] and are the identity outside). Abduction is the exact inverse ``u = f^-1(x; pa)``,
so counterfactuals are exact wherever the true mechanism is monotone in its noise.

>>> import torch
>>> from medcausal.graph import Continuous
>>> m = FlowMechanism(Continuous(), parents=2)
>>> pa, x = torch.randn(4, 2), torch.randn(4, 1)
>>> torch.allclose(m.sample(pa, noise=m.abduct(x, pa)), x, atol=1e-4)
True
"""

from __future__ import annotations

import torch
import zuko

from .base import Mechanism, randn
from .registry import register


@register
class FlowMechanism(Mechanism):
    name = "flow"
    abduction = "exact"
    supports = ("continuous",)

    def __init__(self, variable, parents, transforms: int = 2,
                 hidden: tuple[int, ...] | list[int] = (64, 64), bins: int = 8):
        super().__init__(variable, parents, transforms=transforms, hidden=list(hidden), bins=bins)
        self.dim = variable.dim
        affine = zuko.flows.MAF(features=self.dim, context=self.parent_dim, transforms=1,
                                hidden_features=tuple(hidden))
        splines = zuko.flows.NSF(features=self.dim, context=self.parent_dim, transforms=transforms,
                                 hidden_features=tuple(hidden), bins=bins)
        self.flow = zuko.flows.Flow([*affine.transform.transforms, *splines.transform.transforms],
                                    splines.base)
        self._start_near_identity()

    def _start_near_identity(self, scale: float = 0.01) -> None:
        """Shrink each spline's output layer, so training starts near the identity map.

        Data are standardized, so the identity is already a good fit; zuko's random
        initialization starts several nats away from it and costs many epochs.
        """
        with torch.no_grad():
            for t in self.flow.transform.transforms:
                linears = [m for m in t.modules() if isinstance(m, torch.nn.Linear)]
                params = linears[-1].parameters() if linears else t.parameters()
                for p in params:
                    p.mul_(scale)

    def _dist(self, parents: torch.Tensor):
        return self.flow(parents) if self.parent_dim else self.flow()

    def log_prob(self, value, parents):
        lp = self._dist(parents).log_prob(value)
        return lp.expand(value.shape[0]) if lp.dim() == 0 else lp

    def noise_like(self, n, generator=None):
        return randn((n, self.dim), generator)

    def abduct(self, value, parents, generator=None):
        return self._dist(parents).transform(value)

    def sample(self, parents, noise=None, generator=None):
        if noise is None:
            noise = self.noise_like(parents.shape[0], generator).to(parents)
        return self._dist(parents).transform.inv(noise)
