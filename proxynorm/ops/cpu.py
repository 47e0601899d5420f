"""The fused CPU ops from Python: loading and the fake kernels.

`torch.ops.proxynorm.group_norm_proxy_act(x, groups, weight, bias, proxy_mean, proxy_rstd,
act, eps) -> (out, mean, rstd)` computes, with mean and rstd GroupNorm's (N, groups)
statistics, out = (act(weight * (x - mean) * rstd + bias) - proxy_mean) * proxy_rstd.
Its backward saves only x, the (N, groups) statistics and per-channel vectors, and
recomputes the elementwise chain. The per-channel vectors are float32 (float64 for float64
x); out has x's dtype and is contiguous.

`torch.ops.proxynorm.proxy_stats(weight, bias, proxy_weight, proxy_bias, quantiles, act,
proxy_eps) -> (mean, rstd)` computes proxynorm.proxy.proxy_stats's per-channel proxy mean and
rstd = 1 / sqrt(var + proxy_eps) of its population variance var in one pass per channel;
its backward recomputes the (C, n) proxy, so autograd keeps only (C,) vectors (at a small
micro-batch the proxy would outweigh the activations).

The C++ holds the kernels, the schemas and the autograd of both ops (a Python autograd
node per call would cost more than a small layer's kernels); the fake kernels (for
torch.compile) are registered here, as in PyTorch's custom operator tutorial. Neither
backward is differentiable: a double backward through them raises.
"""
import logging

import torch

DTYPES = (torch.float32, torch.float64, torch.bfloat16)

_loaded = None


def load():
    """Whether the op is registered; builds it (once per torch and sources, see build.py)
    and loads it on first use. Where it cannot be built (no compiler, torch < 2.4) one
    warning line says why, once per process, and the callers use the eager path."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _load():
    from proxynorm.ops import build

    try:
        library = build.build()
    except build.BuildError as error:
        logging.getLogger(__name__).warning(
            "the fused Proxy Norm CPU op is not available (%s); using the eager path", error)
        return False
    torch.ops.load_library(library)
    _register()
    return True


def group_norm_proxy_act(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps):
    """The op's output alone; differentiable with respect to x and the four vectors."""
    return torch.ops.proxynorm.group_norm_proxy_act(
        x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps)[0]


def proxy_stats(weight, bias, proxy_weight, proxy_bias, quantiles, act, proxy_eps):
    """(mean, 1 / sqrt(var + proxy_eps)) of act(weight * (proxy_bias + (1 + proxy_weight) * u)
    + bias) over the quantiles u, per channel; all inputs float32 or all float64;
    differentiable with respect to the four (C,) parameters."""
    return torch.ops.proxynorm.proxy_stats(weight, bias, proxy_weight, proxy_bias, quantiles,
                                           act, proxy_eps)


def _statistics_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_forward(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps):
    stats = (x.shape[0], groups)
    dtype = _statistics_dtype(x)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(stats, dtype=dtype), x.new_empty(stats, dtype=dtype))


def _fake_backward(grad_out, x, weight, bias, proxy_mean, proxy_rstd, mean, rstd, groups,
                   act):
    channels = (x.shape[1],)
    dtype = _statistics_dtype(x)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            *(x.new_empty(channels, dtype=dtype) for _ in range(4)))


def _fake_proxy_stats(weight, bias, proxy_weight, proxy_bias, quantiles, act, proxy_eps):
    return torch.empty_like(weight), torch.empty_like(weight)


def _fake_proxy_stats_backward(grad_mean, grad_rstd, weight, bias, proxy_weight, proxy_bias,
                               quantiles, mean, rstd, act):
    return tuple(torch.empty_like(weight) for _ in range(4))


def _register():
    torch.library.register_fake("proxynorm::group_norm_proxy_act", _fake_forward)
    torch.library.register_fake("proxynorm::group_norm_proxy_act_backward", _fake_backward)
    torch.library.register_fake("proxynorm::proxy_stats", _fake_proxy_stats)
    torch.library.register_fake("proxynorm::proxy_stats_backward", _fake_proxy_stats_backward)
