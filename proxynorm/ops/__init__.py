"""Fused GroupNorm + affine + activation + Proxy Norm: a CPU op, a GPU op and an IPU op.

`fused_op(x)` picks the op that computes a Proxy Norm layer for input x: the IPU op while
PopTorch traces a model for the IPU, the CPU op (when built; `make custom_ops`) for CPU
inputs, the GPU op (Triton kernels, compiled on first use) for CUDA inputs of its dtypes,
else None and the layer runs the eager PyTorch expression of the same maths (on CUDA also
while torch.compile traces: Inductor fuses that expression itself). While a model is
exported or traced (`exporting()`: torch.export, either torch.onnx exporter, torch.jit.trace)
it is None on every device but the IPU: the graph then holds only standard ops, which ONNX
and other runtimes know, instead of proxynorm ops that only this package can run.
`fused_proxy_stats(op)` is the proxy-statistics op that goes with it: the CPU one beside
the CPU op, the GPU one (one Triton kernel each way, not a dozen PyTorch ops) beside the
GPU op; None beside the IPU op, where they stay PyTorch ops that PopTorch traces and
PopART differentiates.
PROXYNORM_FUSED=0 in the environment forces the eager path everywhere.
"""
import logging
import os
import sys

import torch

from proxynorm.ops import cpu, gpu, ipu

_warned_ipu = False


def fused_enabled():
    return os.environ.get("PROXYNORM_FUSED", "1") != "0"


def tracing_for_ipu():
    """Whether PopTorch is tracing a model for the IPU now (the layers then emit IPU ops)."""
    poptorch = sys.modules.get("poptorch")  # only a program that imported it runs on IPUs
    return poptorch is not None and poptorch.isRunningOnIpu()


def exporting():
    """Whether a model is being exported or traced into a graph for another runtime now.

    torch.compiler.is_exporting() (torch >= 2.6; looked up with getattr, as torch 2.0,
    PopTorch's pin, lacks it) is True inside torch.export.export, strict or not, and so
    inside the dynamo-based torch.onnx exporter (torch 2.14's default), which runs it;
    torch.compile alone leaves it False. (On torch 2.4 and 2.5, which have the CPU op but
    not this flag, torch.export keeps the op: export there with PROXYNORM_FUSED=0.) torch.jit.is_tracing() is True inside
    torch.jit.trace and so inside the TorchScript-based exporter (dynamo=False), which
    traces the model with it, on every torch. torch.onnx.is_in_onnx_export() would add
    nothing to these two (both exporters reach the layers only through them) and costs
    about 2 us a call (it imports inside), which a small layer's forward would pay. Dynamo
    evaluates both as constants, so torch.compile(fullgraph=True) traces through this.
    """
    if torch.jit.is_tracing():
        return True
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return is_exporting is not None and is_exporting()


def fused_op(x):
    """op(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps) -> out, or None."""
    if not fused_enabled():
        return None
    if tracing_for_ipu():
        return ipu.group_norm_proxy_act if ipu_op_built() else None
    if exporting():
        return None
    if x.device.type == "cpu" and x.dtype in cpu.DTYPES and cpu.load():
        return cpu.group_norm_proxy_act
    if x.device.type == "cuda" and x.dtype in gpu.DTYPES and gpu.available():
        # under torch.compile Inductor writes its own fused kernels from the eager
        # expression; the op's autograd.Function would only break its graph
        return None if gpu.compiling() else gpu.group_norm_proxy_act
    return None


def fused_proxy_stats(op):
    """stats(weight, bias, proxy_weight, proxy_bias, quantiles, act, proxy_eps) -> (mean,
    rstd), rstd = 1 / sqrt(var + proxy_eps), the op's proxy_mean and proxy_rstd, to go with
    the norm-act op `op` from fused_op, or None."""
    if op is cpu.group_norm_proxy_act:
        return cpu.proxy_stats
    return gpu.proxy_stats if op is gpu.group_norm_proxy_act else None


def ipu_op_built():
    """Whether the IPU op is built; logs one warning line, once, when it is not."""
    global _warned_ipu
    if not ipu.is_built() and not _warned_ipu:
        _warned_ipu = True
        logging.getLogger(__name__).warning(
            "the fused Proxy Norm IPU op is not built (%s is missing; run `make custom_ops` "
            "on a Poplar SDK host); using the eager path", os.path.relpath(ipu.LIBRARY))
    return ipu.is_built()
