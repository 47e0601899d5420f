"""Fused GroupNorm + affine + activation + Proxy Norm: a CPU op and an IPU op.

`fused_op(x)` picks the op that computes a Proxy Norm layer for input x: the IPU op while
PopTorch traces a model for the IPU, the CPU op (when built; `make custom_ops`) for CPU
inputs, else None and the layer runs the eager PyTorch expression of the same maths.
PROXYNORM_FUSED=0 in the environment forces the eager path everywhere.
"""
import os
import sys

from custom_ops import cpu


def fused_enabled():
    return os.environ.get("PROXYNORM_FUSED", "1") != "0"


def fused_op(x):
    """op(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps) -> out, or None."""
    if not fused_enabled():
        return None
    poptorch = sys.modules.get("poptorch")  # only a program that imported it runs on IPUs
    if poptorch is not None and poptorch.isRunningOnIpu():
        from custom_ops import ipu

        return ipu.group_norm_proxy_act
    if x.device.type == "cpu" and x.dtype in cpu.DTYPES and cpu.load():
        return cpu.group_norm_proxy_act
    return None
