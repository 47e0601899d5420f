"""The fused CPU ops from Python: loading, autograd and the fake kernels.

`torch.ops.proxynorm.group_norm_proxy_act(x, groups, weight, bias, proxy_mean, proxy_rstd,
act, eps) -> (out, mean, rstd)` computes, with mean and rstd GroupNorm's (N, groups)
statistics, out = (act(weight * (x - mean) * rstd + bias) - proxy_mean) * proxy_rstd.
Its backward saves only x, the (N, groups) statistics and per-channel vectors, and
recomputes the elementwise chain. The per-channel vectors are float32 (float64 for float64
x); out has x's dtype and is contiguous.

`torch.ops.proxynorm.proxy_stats(weight, bias, proxy_weight, proxy_bias, quantiles, act)
-> (mean, var)` computes models.proxy.proxy_stats's per-channel proxy mean and population
variance in one pass per channel; its backward recomputes the (C, n) proxy, so autograd
keeps only (C,) vectors (at a small micro-batch the proxy would outweigh the activations).

The C++ holds the kernels and the schemas; the autograd formulas and the fake kernels
(for torch.compile) are registered here, as in PyTorch's custom operator tutorial.
"""
import logging
import os

import torch

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "libproxynorm_cpu.so")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)

_loaded = None


def load():
    """Whether the op is registered; loads it on first use. A missing build logs one
    warning line (once per process) and the callers fall back to the eager path."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _load():
    if not hasattr(torch.library, "register_autograd"):
        reason = f"needs torch >= 2.4, this is {torch.__version__}"
    elif not os.path.exists(LIBRARY):
        reason = f"{os.path.relpath(LIBRARY)} is missing (run `make custom_ops`)"
    else:
        torch.ops.load_library(LIBRARY)
        _register()
        return True
    logging.getLogger(__name__).warning(
        "the fused Proxy Norm CPU op is not available (%s); using the eager path", reason)
    return False


def group_norm_proxy_act(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps):
    """The op's output alone; differentiable with respect to x and the four vectors."""
    return torch.ops.proxynorm.group_norm_proxy_act(
        x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps)[0]


def proxy_stats(weight, bias, proxy_weight, proxy_bias, quantiles, act):
    """(mean, var) of act(weight * (proxy_bias + (1 + proxy_weight) * u) + bias) over the
    quantiles u, per channel; all inputs float32 or all float64; differentiable with respect
    to the four (C,) parameters."""
    return torch.ops.proxynorm.proxy_stats(weight, bias, proxy_weight, proxy_bias, quantiles,
                                           act)


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


def _fake_proxy_stats(weight, bias, proxy_weight, proxy_bias, quantiles, act):
    return torch.empty_like(weight), torch.empty_like(weight)


def _fake_proxy_stats_backward(grad_mean, grad_var, weight, bias, proxy_weight, proxy_bias,
                               quantiles, mean, act):
    return tuple(torch.empty_like(weight) for _ in range(4))


def _setup_context(ctx, inputs, output):
    x, groups, weight, bias, proxy_mean, proxy_rstd, act, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, proxy_mean, proxy_rstd, mean, rstd)
    ctx.groups, ctx.act = groups, act
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, bias, proxy_mean, proxy_rstd, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias, grad_proxy_mean, grad_proxy_rstd = (
        torch.ops.proxynorm.group_norm_proxy_act_backward(
            grad_out, x, weight, bias, proxy_mean, proxy_rstd, mean, rstd, ctx.groups,
            ctx.act))
    return grad_x, None, grad_weight, grad_bias, grad_proxy_mean, grad_proxy_rstd, None, None


def _setup_proxy_stats_context(ctx, inputs, output):
    *parameters, quantiles, act = inputs
    ctx.save_for_backward(*parameters, quantiles, output[0])
    ctx.act = act


def _proxy_stats_backward(ctx, grad_mean, grad_var):
    *parameters, quantiles, mean = ctx.saved_tensors
    grads = torch.ops.proxynorm.proxy_stats_backward(grad_mean, grad_var, *parameters,
                                                     quantiles, mean, ctx.act)
    return (*grads, None, None)


def _register():
    torch.library.register_fake("proxynorm::group_norm_proxy_act", _fake_forward)
    torch.library.register_fake("proxynorm::group_norm_proxy_act_backward", _fake_backward)
    torch.library.register_fake("proxynorm::proxy_stats", _fake_proxy_stats)
    torch.library.register_fake("proxynorm::proxy_stats_backward", _fake_proxy_stats_backward)
    torch.library.register_autograd(
        "proxynorm::group_norm_proxy_act", _backward, setup_context=_setup_context)
    torch.library.register_autograd(
        "proxynorm::proxy_stats", _proxy_stats_backward, setup_context=_setup_proxy_stats_context)
