"""``flow``'s own pieces (the shared behaviour is in test_contract.py)."""

import pytest
import torch
from zuko.transforms import MonotonicRQSTransform

from medcausal.graph import Continuous
from medcausal.mechanisms.flow import FlowMechanism, _RQS


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_fast_spline_is_zukos_spline(scale):
    # Same knots and same map, forward and inverse, as zuko's class; large raw parameters
    # exercise zuko's squashing (the reason exp without max-subtraction is safe).
    g = torch.Generator().manual_seed(0)
    w, h, d = (scale * torch.randn(500, 1, k, generator=g) for k in (8, 8, 7))
    ours, zukos = _RQS(w, h, d), MonotonicRQSTransform(w, h, d)
    for name in ("horizontal", "vertical"):
        torch.testing.assert_close(getattr(ours, name), getattr(zukos, name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.derivatives, zukos.derivatives, atol=1e-5, rtol=1e-5)
    x = 6.0 * torch.randn(500, 1, generator=g)  # inside and outside the [-5, 5] spline domain
    torch.testing.assert_close(ours(x), zukos(x), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.inv(x), zukos.inv(x), atol=1e-4, rtol=1e-5)
    # Log-determinants reach ~20 in near-degenerate bins at scale 30: float32 rounding, relative.
    torch.testing.assert_close(ours.call_and_ladj(x)[1], zukos.call_and_ladj(x)[1], atol=1e-4, rtol=1e-4)


def test_a_mechanism_setting_of_the_wrong_type_is_named():
    with pytest.raises(TypeError, match="bins"):
        FlowMechanism(Continuous(), parents=1, bins=2.5)
