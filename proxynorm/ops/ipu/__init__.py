"""The IPU ops: PopART custom ops for PopTorch, in one library.

GroupNorm + affine + activation + Proxy Norm as one op, and a differentiable sum over
groups of IPU replicas (what sync_batch shares its statistics with).

Build (Poplar SDK hosts only, SDK environment enabled): `make custom_ops`, or
`make -C proxynorm/ops/ipu`, writes proxynorm/ops/ipu/build/libproxynorm_ipu.so. In a PopTorch model:
    from proxynorm.ops import ipu
    out = ipu.group_norm_proxy_act(x, groups, weight, bias, proxy_mean, proxy_rstd, "relu", eps)
    total = ipu.replica_all_reduce_sum(t, group_size)   # 0 = all replicas
proxy_mean = m and proxy_rstd = 1 / sqrt(v + 0.03) come from proxynorm.proxy.proxy_stats, left in
PyTorch: PopTorch traces them and PopART's autograd carries their gradients to the parameters.
The library loads on first use (or load()). This module imports without poptorch or torch;
is_built() says whether the library exists. tests/test_ipu_op.py checks the ops on the IPU
Model (and the all-reduce across two replicas on IPU hardware).
"""
import ctypes
import os

DOMAIN = "ai.graphcore.proxynorm"
OP_TYPE = "GroupNormProxyAct"
DOMAIN_VERSION = 1
ACTS = ("relu", "silu", "gelu", "identity")
ALL_REDUCE_OP_TYPE = "ReplicaAllReduceSum"
ALL_REDUCE_DTYPES = ("torch.float32", "torch.float16")

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


def replica_all_reduce_sum(t, group_size=0):
    """The sum of t over this replica's group of IPU replicas, with a gradient.

    Groups are `group_size` consecutive replicas (0 = all); under poprun replicas are
    numbered across instances. The gradient of the sum is the sum of the gradients (the
    same all-reduce of the incoming gradient): every replica of a group gets the gradient
    of every group member's loss, as torch.distributed all-reduce with autograd gives
    (proxynorm.norms.AllReduceSum). PopART's own ReplicatedAllReduce drops its gradient at
    SDK 3.0-3.4, hence this op (replica_all_reduce.cpp).

    t is float32 or float16, any shape; group_size must divide the replicas (checked when
    PopART builds the graph). Only valid while PopTorch traces a model
    (poptorch.custom_op); returns a tensor like t. Without replication it is a copy of t.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise ValueError(f"group_size must be an int >= 0 (0 = all replicas), got {group_size!r}")
    if str(t.dtype) not in ALL_REDUCE_DTYPES:
        raise ValueError(f"replica_all_reduce_sum takes float32 or float16, got {t.dtype}")
    load()
    import poptorch

    outputs = poptorch.custom_op([t], ALL_REDUCE_OP_TYPE, DOMAIN, DOMAIN_VERSION,
                                 example_outputs=[t], attributes={"group_size": group_size})
    return outputs[0]
