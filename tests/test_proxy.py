"""proxynorm/proxy.py against independent formulas (stdlib quantiles, closed-form moments)."""
import math

import pytest
import torch
import torch.nn.functional as F

from proxynorm.norms import get_norm_act
from proxynorm.proxy import PROXY_EPS, proxy_quantiles, proxy_stats


def test_quantiles_match_the_normal_inverse_cdf():
    """Against torch's erfinv in float64: Phi^-1(p) = sqrt(2) erfinv(2p - 1)."""
    n = 200
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    expected = math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)
    u = proxy_quantiles(n, dtype=torch.float64)
    torch.testing.assert_close(u, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(u, -u.flip(0), rtol=0, atol=1e-13)  # symmetric about 0


def test_quantiles_are_cached_per_device_and_dtype():
    assert proxy_quantiles(200, "cpu", torch.float32) is proxy_quantiles(200, "cpu", torch.float32)
    assert proxy_quantiles(200, "cpu", torch.float64).dtype == torch.float64
    assert proxy_quantiles(50, "cpu", torch.float32).shape == (50,)


def test_identity_proxy_moments_are_the_affine_of_the_quantiles():
    # With phi = identity, m = gamma beta~ + beta and v = gamma^2 (1 + gamma~)^2 var(u).
    g = torch.Generator().manual_seed(0)
    w, b, pw, pb = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(4))
    mean, var = proxy_stats(w, b, pw, pb, lambda t: t)
    u = proxy_quantiles(200, dtype=torch.float64)
    torch.testing.assert_close(mean, w * pb + b, rtol=0, atol=1e-12)
    torch.testing.assert_close(var, (w * (1 + pw)) ** 2 * u.var(unbiased=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stats_are_float32_at_least(dtype):
    params = [p.to(dtype) for p in (torch.randn(4), torch.randn(4), torch.randn(4), torch.randn(4))]
    mean, var = proxy_stats(*params, torch.relu)
    assert mean.dtype == var.dtype == torch.float32
    # the same as computing from the (rounded) parameters in float32 from the start
    ref_mean, ref_var = proxy_stats(*[p.float() for p in params], torch.relu)
    assert torch.equal(mean, ref_mean) and torch.equal(var, ref_var)


def test_proxy_norm_at_init_centres_and_scales_a_gaussian():
    """GroupNorm-normalised Gaussian input -> per channel mean ~0, variance ~v/(v+0.03).

    v is the proxy's relu variance at init. Tolerances: each channel holds 32*32*32 =
    32,768 samples, so sampling noise on a channel mean is ~0.6/sqrt(32768)/0.6 = 0.006
    (bound 0.03 = 5 sigma) and on a variance ~1.2% (bound 6%). The channel average
    removes most noise and leaves the one systematic effect: 200 mid-point quantiles
    hold 0.64% less variance than N(0, 1), so the real z varies ~0.8% more than the
    proxy predicts (bound 1.5%).
    """
    torch.manual_seed(0)
    layer = get_norm_act("group_pn", 32, act="relu", groups=8)
    x = torch.randn(32, 32, 32, 32) * 3.0 + 1.0
    with torch.no_grad():
        out = layer(x)
    mean = out.mean(dim=(0, 2, 3))
    var = out.var(dim=(0, 2, 3), unbiased=False)
    _, v = proxy_stats(*(torch.ones(1), torch.zeros(1), torch.zeros(1), torch.zeros(1)), F.relu)
    # the proxy's v is close to relu(N(0,1))'s closed-form variance 1/2 - 1/(2 pi)
    assert abs(v.item() - (0.5 - 1 / (2 * math.pi))) < 0.005
    expected = v.item() / (v.item() + PROXY_EPS)
    assert mean.abs().max() < 0.03
    assert ((var / expected - 1).abs().max()) < 0.06
    assert abs(var.mean().item() / expected - 1) < 0.015


def test_quantiles_are_cached_only_on_cpu_and_cuda():
    """A traced device (PopTorch's IPU) must get a fresh table per call, never a cached one."""
    first = proxy_quantiles(200, "cpu", torch.float32)
    assert proxy_quantiles(200, "cpu", torch.float32) is first
    meta = proxy_quantiles(200, "meta", torch.float32)
    assert meta.device.type == "meta"
    assert proxy_quantiles(200, "meta", torch.float32) is not meta


def test_a_layer_first_run_under_another_device_leaves_no_foreign_tensor_cached(monkeypatch):
    """What PopTorch's tracer does to a factory call without a device (it puts the tensor on
    the IPU), torch.device("meta") does here: the table must still be built on the host, so
    the next run, on the CPU, works."""
    from proxynorm import proxy

    monkeypatch.setattr(proxy, "_quantile_cache", {})
    layer = get_norm_act("group_pn", 8, act="relu", groups=2)
    with torch.device("meta"):
        out = layer.to("meta")(torch.randn(2, 8, 4, 4))
    assert out.device.type == "meta"
    assert all(t.device.type == "cpu" for t in proxy._quantile_cache.values())
    layer = get_norm_act("group_pn", 8, act="relu", groups=2)
    assert torch.isfinite(layer(torch.randn(2, 8, 4, 4))).all()
