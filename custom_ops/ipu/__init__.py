"""The IPU op: GroupNorm + affine + activation + Proxy Norm as one PopART custom op.

Build (Poplar SDK hosts only, SDK environment enabled): `make custom_ops`, or
`make -C custom_ops/ipu`, writes custom_ops/ipu/build/libproxynorm_ipu.so. In a PopTorch model:
    from custom_ops import ipu
    out = ipu.group_norm_proxy_act(x, groups, weight, bias, proxy_mean, proxy_rstd, "relu", eps)
proxy_mean = m and proxy_rstd = 1 / sqrt(v + 0.03) come from models.proxy.proxy_stats, left in
PyTorch: PopTorch traces them and PopART's autograd carries their gradients to the parameters.
The library loads on first use (or load()). This module imports without poptorch or torch;
is_built() says whether the library exists. tests/test_ipu_op.py checks the op on the IPU Model.
"""
import ctypes
import os

DOMAIN = "ai.graphcore.proxynorm"
OP_TYPE = "GroupNormProxyAct"
DOMAIN_VERSION = 1
ACTS = ("relu", "silu", "gelu", "identity")

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build",
                       "libproxynorm_ipu.so")

_loaded = False


def is_built():
    """Whether the PopART library has been built (it needs the Poplar SDK)."""
    return os.path.isfile(LIBRARY)


def load():
    """Load the library once, which registers the op with PopART; returns its path."""
    global _loaded
    if not _loaded:
        if not is_built():
            raise RuntimeError(
                f"IPU op library {LIBRARY} is not built: run `make custom_ops` on a Poplar SDK host")
        ctypes.cdll.LoadLibrary(LIBRARY)
        _loaded = True
    return LIBRARY


def group_norm_proxy_act(x, groups, weight, bias, proxy_mean, proxy_rstd, act="relu",
                         eps=1e-5):
    """(act(weight * GroupNorm(x, groups, eps) + bias) - proxy_mean) * proxy_rstd on the IPU.

    x is (N, C, *spatial), float32 or float16; weight, bias, proxy_mean and proxy_rstd are
    (C,). GroupNorm has no affine of its own; its statistics are float32. Only valid while
    PopTorch traces a model (poptorch.custom_op); returns a tensor like x.
    """
    if act not in ACTS:
        raise ValueError(f"unknown activation '{act}'; valid names: {', '.join(ACTS)}")
    if x.dim() < 2:
        raise ValueError(f"x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    groups = int(groups)
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"groups={groups} must divide the {x.shape[1]} channels")
    load()
    import poptorch

    # One output: the grad op recomputes the (N, G) statistics from x (proxynorm_ipu.cpp)
    outputs = poptorch.custom_op([x, weight, bias, proxy_mean, proxy_rstd], OP_TYPE, DOMAIN,
                                 DOMAIN_VERSION, example_outputs=[x],
                                 attributes={"groups": groups, "act": act,
                                             "epsilon": float(eps)})
    return outputs[0]
