"""Proxy Norm's maths, written once (Labatie et al., NeurIPS 2021).

The proxy of a channel is a Gaussian pushed through the same affine and activation as the
real activations: Ytilde_ci = proxy_bias_c + (1 + proxy_weight_c) * u_i, with u_i the n
fixed mid-point quantiles of N(0, 1). Its mean m_c and population variance v_c normalise
the real post-activation z: out = (z - m_c) / sqrt(v_c + proxy_eps). The statistics depend
on parameters only, so a sample's output never depends on its batch mates.
"""
from statistics import NormalDist

import torch
import torch.nn.functional as F

NUM_PROXY_SAMPLES = 200
PROXY_EPS = 0.03

_quantile_cache = {}


def statistics_dtype(dtype):
    """float32 at least, so half/bfloat16 training keeps float32 statistics."""
    return torch.promote_types(dtype, torch.float32)


def proxy_quantiles(num_samples=NUM_PROXY_SAMPLES, device="cpu", dtype=torch.float32):
    """u_i = Phi^-1((i + 1/2) / n), i = 0..n-1: fixed, never resampled.

    Computed once on the host in Python floats (statistics.NormalDist, no torch op: under
    PopTorch's tracer a factory call without a device makes an IPU tensor, which a cache
    must not keep, poptorch python/_poplar_executor.py; and aten::erfinv has no PopTorch
    handler), kept as a CPU float64 tensor and cached per (n, device, dtype) for CPU and
    CUDA. Other devices (PopTorch's IPU) get a fresh copy per call, which a traced graph
    sees as an n-value constant. Only plain tensors are cached: inside torch.export (and
    the ONNX exporter that runs it) factory calls make fake tensors, which the graph keeps
    as a constant but a later eager call must never get back.
    """
    device = torch.device(device)
    table = _quantile_cache.get(num_samples)
    if table is None:
        table = _cache(num_samples, torch.tensor(_normal_quantiles(num_samples),
                                                 dtype=torch.float64, device="cpu"))
    if device.type not in ("cpu", "cuda"):
        return table.to(device=device, dtype=dtype)
    key = (num_samples, device, dtype)
    if key not in _quantile_cache:
        return _cache(key, table.to(device=device, dtype=dtype))
    return _quantile_cache[key]


def _normal_quantiles(num_samples):
    """The quantiles as Python floats; Dynamo cannot trace NormalDist (a C builtin), so
    torch.compile(fullgraph=True) and strict torch.export need the table made beforehand:
    GroupNormProxyAct makes its own when it is built."""
    normal = NormalDist()
    return [normal.inv_cdf((i + 0.5) / num_samples) for i in range(num_samples)]


def _cache(key, table):
    if type(table) is torch.Tensor:  # not a FakeTensor or another tracing subclass
        _quantile_cache[key] = table
    return table


def proxy_stats(weight, bias, proxy_weight, proxy_bias, act, num_samples=NUM_PROXY_SAMPLES):
    """Per-channel mean and population variance of act(weight * Ytilde + bias).

    Returns two (C,) tensors in float32, or float64 when the parameters are float64;
    differentiable with respect to all four parameters.
    """
    dtype = statistics_dtype(weight.dtype)
    weight, bias, proxy_weight, proxy_bias = (
        p.to(dtype)[:, None] for p in (weight, bias, proxy_weight, proxy_bias))
    u = proxy_quantiles(num_samples, weight.device, dtype)
    proxy = act(weight * (proxy_bias + (1.0 + proxy_weight) * u) + bias)  # (C, n)
    mean = proxy.mean(dim=1)
    var = (proxy - mean[:, None]).square().mean(dim=1)
    return mean, var


def proxy_norm_act(x, groups, weight, bias, proxy_weight, proxy_bias, act, eps=1e-5,
                   proxy_eps=PROXY_EPS, num_samples=NUM_PROXY_SAMPLES):
    """GroupNorm (no affine of its own) -> affine -> act -> proxy normalisation.

    x is (N, C, *spatial); groups=1 is the LayerNorm of CNNs. The chain runs in float32
    at least and the result comes back in x's dtype.
    """
    dtype = statistics_dtype(x.dtype)
    z = act(F.group_norm(x.to(dtype), groups, weight.to(dtype), bias.to(dtype), eps))
    mean, var = proxy_stats(weight, bias, proxy_weight, proxy_bias, act, num_samples)
    channel = (1, -1) + (1,) * (x.dim() - 2)
    out = (z - mean.to(dtype).view(channel)) * torch.rsqrt(var.to(dtype) + proxy_eps).view(channel)
    return out.to(x.dtype)
