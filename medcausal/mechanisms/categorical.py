"""``categorical``: binary and categorical variables as a Gumbel-max SCM.

``x = argmax_k(logits_k(pa) + g_k)`` with ``g_k`` i.i.d. standard Gumbel (the
Gumbel-max SCM of Oberst & Sontag, ICML 2019, as used by DSCM). The noise is not
point-identified from ``x``: abduction *samples* it from its posterior given the
observed category (top-down Gumbel sampling, Maddison et al. 2014), so counterfactuals
of discrete variables are random; pass a ``generator`` (``seed=`` at the model) to
make them reproducible. The posterior keeps the observed category under the observed
parents, so null interventions return the input exactly.

>>> import torch
>>> from medcausal.graph import Categorical
>>> m = CategoricalMechanism(Categorical(("a", "b", "c")), parents=1)
>>> pa, x = torch.randn(5, 1), torch.tensor([[0.], [2.], [1.], [1.], [0.]])
>>> bool((m.sample(pa, noise=m.abduct(x, pa)) == x).all())
True
"""

from __future__ import annotations

import torch

from ..errors import DataError
from .base import Mechanism, mlp, rand
from .registry import register


def n_categories(variable) -> int:
    if variable.kind == "binary":
        return 2
    if variable.categories is None:
        raise ValueError("categorical variable has no categories yet (they are learned at fit)")
    return len(variable.categories)


def _gumbel(shape, generator, like):
    u = rand(shape, generator).to(like)
    return -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7)))


@register
class CategoricalMechanism(Mechanism):
    name = "categorical"
    abduction = "sampled"
    supports = ("binary", "categorical")

    def __init__(self, variable, parents, hidden: tuple[int, ...] | list[int] = (64, 64)):
        super().__init__(variable, parents, hidden=list(hidden))
        self.k = n_categories(variable)
        self.net = mlp(self.parent_dim, self.k, tuple(hidden))

    def logits(self, parents):
        return torch.log_softmax(self.net(parents), dim=-1)

    def start_from_data(self, value, parents):
        """Start the output at the base rates (add-1/2 smoothed): a root's logits otherwise start
        uniform, and a rare category can stay far from its rate when the learning rate falls
        before its few gradient steps get there."""
        counts = torch.bincount(self._index(value).reshape(-1), minlength=self.k).to(self._dtype())
        last = self.net[-1]
        with torch.no_grad():
            bias = last.value if hasattr(last, "value") else last.bias
            bias.copy_(torch.log((counts + 0.5) / (counts.sum() + 0.5 * self.k)))

    def _index(self, value):
        """``value`` as category indices, or a DataError if one lies outside the categories."""
        k = value.long()
        outside = (k < 0) | (k >= self.k)
        if outside.any():
            raise DataError(f"{self.name}: category index {int(k[outside][0])} is outside the variable's "
                            f"{self.k} categories (0..{self.k - 1})")
        return k

    def log_prob(self, value, parents):
        # no range check up front: it is data-dependent control flow, which the per-record
        # gradients of DP training (torch.func.vmap) cannot trace; gather's own error is rare
        try:
            return self.logits(*self._cast(parents)).gather(-1, value.long()).squeeze(-1)
        except (RuntimeError, IndexError):
            self._index(value)  # a DataError naming the index, when that was the cause
            raise

    def noise_like(self, n, generator=None):
        return _gumbel((n, self.k), generator, torch.zeros(()))

    def sample(self, parents, noise=None, generator=None):
        parents, noise = self._cast(parents, noise)
        logits = self.logits(parents)
        if noise is None:
            noise = _gumbel(logits.shape, generator, logits)
        return (logits + noise).argmax(-1, keepdim=True).to(logits.dtype)

    def abduct(self, value, parents, generator=None):
        k = self._index(value)
        logits = self.logits(*self._cast(parents))
        # The max of the perturbed logits is Gumbel(logsumexp(logits)) and sits at k;
        # every other perturbed logit is Gumbel(logit_i) truncated below that max.
        top = torch.logsumexp(logits, -1, keepdim=True) + _gumbel((*logits.shape[:-1], 1), generator, logits)
        others = logits + _gumbel(logits.shape, generator, logits)
        truncated = -torch.logaddexp(-top, -others)
        perturbed = truncated.scatter(-1, k, top)
        return perturbed - logits


