"""The fused GPU op from Python: the Triton kernels (proxynorm/ops/gpu_kernels.py) and autograd.

`group_norm_proxy_act(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps) -> out`
computes what the CPU op does (proxynorm/ops/cpu.py), with mean and rstd GroupNorm's
(N, groups) statistics: out = (act(weight * (x - mean) * rstd + bias) - proxy_mean)
* proxy_rstd. Its backward saves only x, the (N, groups) statistics and the per-channel
vectors, and recomputes the elementwise chain. x is float32, bfloat16 or float16 (the
chain runs in float32; float64 stays on the eager path), the per-channel vectors float32;
out has x's dtype and layout when x is contiguous or channels_last (read and written in
place, no transposing copy), else it is contiguous. `proxy_stats(weight, bias,
proxy_weight, proxy_bias, quantiles, act, proxy_eps) -> (proxy_mean, proxy_rstd)` is the
statistics op that goes with it (ops.fused_proxy_stats), as the CPU op's; the two make a layer's training step 8
kernel launches and 2 additions autograd makes (benchmarks/dispatches.py counts them).

Triton is imported on first use, so this module imports on hosts without it (PopTorch's
torch 2.0 stack); `available()` says whether the kernels can run. TRITON_INTERPRET=1 in the
environment before Triton is first imported runs them on CPU tensors in Triton's
interpreter (the tests): Triton decorates its own tl.sum and tl.sigmoid as kernels on import.
"""
import contextlib
import importlib
import logging
import os

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTS = ("identity", "relu", "silu", "gelu")
MAX_BLOCK = 2048  # values per program; a power of two, as tl.arange needs

# Triton's NVIDIA targets (its README: compute capability 8.0 and newer); an older GPU
# would fail in the first compile, inside a training step
MIN_CAPABILITY = (8, 0)

_triton_problem = None  # why Triton cannot run the kernels, "" when it can; found once
_device_supported = {}  # CUDA device index -> whether Triton targets it; found once each


def available(device=None):
    """Whether the kernels can run: Triton >= 3 imports and there is TRITON_INTERPRET=1 or
    a CUDA GPU Triton targets (`device`, default the current one: an NVIDIA GPU of compute
    capability >= MIN_CAPABILITY, or an AMD GPU under ROCm). A GPU host without Triton,
    and each GPU it cannot target, logs one warning line, once."""
    if not (interpreting() or torch.cuda.is_available()):
        return False
    global _triton_problem
    if _triton_problem is None:
        _triton_problem = _find_triton_problem()
        if _triton_problem:
            _warn(_triton_problem)
    if _triton_problem:
        return False
    return interpreting() or _targets(device)


def _warn(problem):
    logging.getLogger(__name__).warning(
        "the fused Proxy Norm GPU op is not available (%s); using the eager path", problem)


def _targets(device):
    index = torch.device("cuda" if device is None else device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _device_supported:
        capability = tuple(torch.cuda.get_device_capability(index))
        _device_supported[index] = bool(torch.version.hip) or capability >= MIN_CAPABILITY
        if not _device_supported[index]:
            _warn(f"cuda:{index} has compute capability {capability[0]}.{capability[1]}, "
                  f"Triton needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
    return _device_supported[index]


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compiling():
    """Whether torch.compile is tracing now (torch.compiler.is_compiling from torch 2.3)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _find_triton_problem():
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    if int(triton.__version__.split(".")[0]) < 3:  # tl.math.erf, tl.sqrt_rn, tl.div_rn
        return f"needs Triton >= 3, this is {triton.__version__}"
    return ""


def _kernels():
    return importlib.import_module("proxynorm.ops.gpu_kernels")


def group_norm_proxy_act(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps):
    """The op's output; differentiable with respect to x and the four vectors."""
    _check_input(x, groups, act, weight=weight, bias=bias, proxy_mean=proxy_mean,
                 proxy_rstd=proxy_rstd)
    # the kernels read vectors as contiguous; a strided one (a view of every other value)
    # is copied here, where autograd still sees the copy
    weight, bias, proxy_mean, proxy_rstd = (
        v if v.is_contiguous() else v.contiguous() for v in (weight, bias, proxy_mean, proxy_rstd))
    return GroupNormProxyActFunction.apply(x, groups, weight, bias, proxy_mean, proxy_rstd,
                                           act, eps)


def _check_input(x, groups, act, **vectors):
    """One line naming the bad input, as the CPU op's checks; the kernels would read out
    of bounds instead."""
    if act not in ACTS:
        raise ValueError(f"proxynorm: unknown activation '{act}'; valid names: "
                         f"{', '.join(ACTS)}")
    if x.dim() < 2 or x.dtype not in DTYPES:
        raise ValueError(f"proxynorm: x must be a float32, bfloat16 or float16 (N, C, *spatial) "
                         f"tensor, got {x.dtype} {tuple(x.shape)}")
    channels = x.shape[1]
    if groups <= 0 or channels % groups:
        raise ValueError(f"proxynorm: {channels} channels are not divisible by {groups} groups")
    for name, v in vectors.items():
        if v.shape != (channels,) or v.dtype != torch.float32 or v.device != x.device:
            raise ValueError(f"proxynorm: {name} must be a ({channels},) float32 tensor on "
                             f"{x.device}, got {v.dtype} {tuple(v.shape)} on {v.device}")


class GroupNormProxyActFunction(torch.autograd.Function):
    """Autograd for the kernels; keeps x, not the normalised or activated tensors."""

    @staticmethod
    def forward(ctx, x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps):
        if _channels_last(x) is None:
            x = x.contiguous()
        out, mean, rstd = _forward(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps)
        ctx.save_for_backward(x, weight, bias, proxy_mean, proxy_rstd, mean, rstd)
        ctx.groups, ctx.act = groups, act
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_x, *grad_vectors = _backward(grad_out, *ctx.saved_tensors, ctx.groups, ctx.act,
                                          ctx.needs_input_grad[0])
        return (grad_x, None, *grad_vectors, None, None)


def _on_device(x):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _power_of_two_at_least(n):
    return 1 << max(n - 1, 0).bit_length()


def _group_chunks(group_size):
    """(values per program, programs per group) of the kernels that walk a group's values."""
    block = min(_power_of_two_at_least(group_size), MAX_BLOCK)
    return block, -(-group_size // block)


def _channels_last(x):
    """The channels_last memory format x is in (whose layout the kernels read and write as
    (N, *spatial, C), with no transposing copy), or None: contiguous NCHW, or another
    layout, which is copied to NCHW."""
    if x.is_contiguous():
        return None
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return fmt if fmt is not None and x.is_contiguous(memory_format=fmt) else None


def _row_tiles(rows, spatial):
    """(BLOCK_ROWS, BLOCK_S, tile columns per row) of the row-tile kernels: tiles of about
    MAX_BLOCK values, many short rows (7x7, 1x1) or parts of long ones."""
    block_s = min(_power_of_two_at_least(spatial), MAX_BLOCK // 2)
    block_rows = min(_power_of_two_at_least(rows), MAX_BLOCK // block_s)
    return block_rows, block_s, -(-spatial // block_s)


def _forward(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps):
    """Kernels 1-3 of gpu_kernels: chunk moments, group moments, the output."""
    n, channels = x.shape[:2]
    out = torch.empty_like(x)
    mean = x.new_empty((n, groups), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return out, mean, rstd
    kernels = _kernels()
    channels_per_group = channels // groups
    spatial = x.numel() // (n * channels)
    group_size = channels_per_group * spatial
    block, chunks_per_group = _group_chunks(group_size)
    chunk_mean = x.new_empty((n * groups, chunks_per_group), dtype=torch.float32)
    chunk_m2 = torch.empty_like(chunk_mean)
    rows = n * channels
    block_rows, block_s, columns = _row_tiles(rows, spatial)
    last = _channels_last(x) is not None  # out = empty_like(x) is in x's format
    with _on_device(x):
        kernels.chunk_moments_kernel[(n * groups * chunks_per_group,)](
            x, chunk_mean, chunk_m2, group_size, chunks_per_group, groups, channels_per_group,
            CHANNELS_LAST=last, BLOCK=block)
        kernels.group_moments_kernel[(n * groups,)](
            chunk_mean, chunk_m2, mean, rstd, group_size, chunks_per_group, eps, CHUNK=block,
            BLOCK=min(_power_of_two_at_least(chunks_per_group), MAX_BLOCK))
        kernels.forward_kernel[(-(-rows // block_rows) * columns,)](
            x, weight, bias, proxy_mean, proxy_rstd, mean, rstd, out, rows, channels,
            channels_per_group, spatial, columns, ACT=act, CHANNELS_LAST=last,
            BLOCK_ROWS=block_rows,
            BLOCK_S=block_s)
    return out, mean, rstd


def _backward(grad_out, x, weight, bias, proxy_mean, proxy_rstd, mean, rstd, groups, act,
              needs_grad_x=True):
    """The CPU op's backward_kernel, step for step, in three launches: per-row sums over
    row tiles; those added up in a fixed order (no atomics: deterministic) into the four
    vectors' gradients and per-(sample, group) coefficients; grad_x (not computed, and
    None, when x needs no gradient, as a network's first layer's input)."""
    n, channels = x.shape[:2]
    grad_x = torch.empty_like(x) if needs_grad_x else None
    if x.numel() == 0:
        return (grad_x, *(torch.zeros_like(weight) for _ in range(4)))
    kernels = _kernels()
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    fmt = _channels_last(x)  # grad_out and grad_x in x's layout, whichever it is
    last = fmt is not None
    grad_out = grad_out.contiguous(memory_format=fmt or torch.contiguous_format)
    channels_per_group = channels // groups
    spatial = x.numel() // (n * channels)
    rows = n * channels
    block_rows, block_s, columns = _row_tiles(rows, spatial)
    tiles = -(-rows // block_rows) * columns
    sums = x.new_empty((4, columns, rows), dtype=torch.float32)
    grad_vectors = x.new_empty((4, channels), dtype=torch.float32)
    coefficients = x.new_empty((2, n * groups), dtype=torch.float32)
    block_c = min(_power_of_two_at_least(channels), 128)
    block_n = min(_power_of_two_at_least(n), MAX_BLOCK // 4 // block_c)
    channel_programs = -(-channels // block_c)
    with _on_device(x):
        kernels.row_sums_kernel[(tiles,)](
            grad_out, x, weight, bias, mean, rstd, sums, rows, channels, channels_per_group,
            spatial, columns, ACT=act, CHANNELS_LAST=last, BLOCK_ROWS=block_rows,
            BLOCK_S=block_s)
        kernels.backward_sums_kernel[(channel_programs + (n * groups if needs_grad_x else 0),)](
            sums, weight, proxy_mean, proxy_rstd, rstd, *grad_vectors, *coefficients, n,
            channels, groups, channels_per_group, columns, channels_per_group * spatial,
            channel_programs, BLOCK_N=max(block_n, 1), BLOCK_C=block_c)
        if needs_grad_x:
            kernels.grad_x_kernel[(tiles,)](
                grad_out, x, weight, bias, proxy_rstd, mean, rstd, *coefficients, grad_x,
                rows, channels, channels_per_group, spatial, columns, ACT=act,
                CHANNELS_LAST=last,
                BLOCK_ROWS=block_rows, BLOCK_S=block_s)
    return (grad_x, *grad_vectors)


def proxy_stats(weight, bias, proxy_weight, proxy_bias, quantiles, act, proxy_eps):
    """The proxy statistics that go with group_norm_proxy_act, as proxynorm/proxy.py's
    proxy_stats: (mean, rstd) of act(weight * (proxy_bias + (1 + proxy_weight) u) + bias)
    over the quantiles u, rstd = 1 / sqrt(var + proxy_eps); one kernel each way (the
    backward recomputes the C x n proxy instead of keeping it), differentiable with
    respect to the four (C,) float32 vectors."""
    channels = weight.shape[0]
    if act not in ACTS:
        raise ValueError(f"proxynorm: unknown activation '{act}'; valid names: "
                         f"{', '.join(ACTS)}")
    vectors = dict(weight=weight, bias=bias, proxy_weight=proxy_weight, proxy_bias=proxy_bias,
                   quantiles=quantiles)
    for name, v in vectors.items():
        size = quantiles.shape[0] if name == "quantiles" else channels
        if v.shape != (size,) or v.dtype != torch.float32 or v.device != weight.device:
            raise ValueError(f"proxynorm: {name} must be a ({size},) float32 tensor on "
                             f"{weight.device}, got {v.dtype} {tuple(v.shape)} on {v.device}")
    return ProxyStatsFunction.apply(
        *(v if v.is_contiguous() else v.contiguous() for v in vectors.values()), act,
        proxy_eps)


def _proxy_blocks(channels, num_samples):
    block_q = _power_of_two_at_least(num_samples)
    block_c = max(1, min(_power_of_two_at_least(channels), MAX_BLOCK // block_q))
    return dict(BLOCK_C=block_c, BLOCK_Q=block_q), (-(-channels // block_c),)


class ProxyStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, proxy_weight, proxy_bias, quantiles, act, proxy_eps):
        mean, rstd = torch.empty_like(weight), torch.empty_like(weight)
        ctx.save_for_backward(weight, bias, proxy_weight, proxy_bias, quantiles)
        ctx.act, ctx.proxy_eps = act, proxy_eps
        channels, num_samples = weight.shape[0], quantiles.shape[0]
        if channels:
            blocks, grid = _proxy_blocks(channels, num_samples)
            with _on_device(weight):
                _kernels().proxy_stats_kernel[grid](
                    weight, bias, proxy_weight, proxy_bias, quantiles, mean, rstd, channels,
                    num_samples, proxy_eps, ACT=act, **blocks)
        return mean, rstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_rstd):
        weight, bias, proxy_weight, proxy_bias, quantiles = ctx.saved_tensors
        grad_mean = torch.zeros_like(weight) if grad_mean is None else grad_mean.contiguous()
        grad_rstd = torch.zeros_like(weight) if grad_rstd is None else grad_rstd.contiguous()
        grads = weight.new_empty((4,) + weight.shape)
        channels, num_samples = weight.shape[0], quantiles.shape[0]
        if channels:
            blocks, grid = _proxy_blocks(channels, num_samples)
            with _on_device(weight):
                _kernels().proxy_stats_backward_kernel[grid](
                    grad_mean, grad_rstd, weight, bias, proxy_weight, proxy_bias, quantiles,
                    *grads, channels, num_samples, ctx.proxy_eps, ACT=ctx.act, **blocks)
        return (*grads, None, None, None)
