"""Normalisation + activation layers, one module per method, built by name.

`get_norm_act` is the only place that knows every norm (timm's norm-act pattern): models
ask for a name from `NORMS` and never import a class. Each layer normalises, applies its
affine and then its activation; `apply_act=False` gives the variant for positions that no
activation follows (the last norm of a residual branch). A `drop` module (timm's
`drop_layer`, e.g. DropBlock) goes where timm's BatchNormAct2d applies it: between the
affine and the activation, except in Proxy Norm layers, whose activation must follow the
affine directly (the proxy models exactly that): there it is applied to the layer's output.

Statistics domains, which is what the comparison is about:
  batch        each replica's micro-batch (BatchNorm on a replicated IPU pod)
  sync_batch   the micro-batches of `bn_group_size` replicas together (0 = all)
  the rest     one sample: a sample's output never depends on its batch mates

This module must also run on torch 2.0 (PopTorch's pin): no newer torch API here.
"""
from collections import Counter, OrderedDict
from typing import NamedTuple, Optional

import torch
from torch import nn

from proxynorm import ops
from proxynorm.activations import FUSED_ACTS, check_act, get_act, unknown_name_error
from proxynorm.proxy import (NUM_PROXY_SAMPLES, PROXY_EPS, proxy_norm_act, proxy_quantiles,
                          proxy_stats, statistics_dtype)

DEFAULT_GROUPS = 32


class NormKind(NamedTuple):
    """What a norm is; every module asks this rather than testing names.

    batch_statistics: statistics over the samples of a (micro-)batch, with running
        statistics for eval (the BatchNorms); the others are per sample.
    synchronised: those statistics cover the micro-batches of several replicas.
    proxy: Proxy Norm follows the activation (it needs one: without, the scale-only norm).
    groups: how the channels are grouped: "any" (the `groups` argument), 1 (all channels),
        "channels" (each its own), or None (no grouping: BatchNorm, none).
    """
    batch_statistics: bool = False
    synchronised: bool = False
    proxy: bool = False
    groups: object = None


NORM_KINDS = {
    "batch": NormKind(batch_statistics=True),
    "sync_batch": NormKind(batch_statistics=True, synchronised=True),
    "group": NormKind(groups="any"),
    "layer": NormKind(groups=1),
    "instance": NormKind(groups="channels"),
    "group_pn": NormKind(proxy=True, groups="any"),
    "layer_pn": NormKind(proxy=True, groups=1),
    "none": NormKind(),
}
NORMS = tuple(NORM_KINDS)
BATCH_INDEPENDENT = tuple(name for name, kind in NORM_KINDS.items() if not kind.batch_statistics)


def norm_kind(name):
    """The NormKind of norm `name`; a ValueError naming close names for an unknown one."""
    if name not in NORM_KINDS:
        raise unknown_name_error("norm", name, NORMS)
    return NORM_KINDS[name]
DEFAULT_EPS = 1e-5


def check_input(module, x, num_channels):
    if not 3 <= x.dim() <= 5:
        raise ValueError(
            f"{type(module).__name__} expects a 3-D, 4-D or 5-D input (N, C, *spatial), "
            f"got a {x.dim()}-D input of shape {tuple(x.shape)}")
    if x.shape[1] != num_channels:
        raise ValueError(
            f"{type(module).__name__} expects {num_channels} channels in dim 1, "
            f"got an input of shape {tuple(x.shape)}")


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm + activation, with statistics over each replica micro-batch.

    The batch may hold `stats_chunks` replica micro-batches side by side (the PyTorch
    engine emulates replicas in one forward). Each chunk is normalised with its own
    statistics, exactly as separate BatchNorm calls would, and the running statistics
    are updated once with the chunk average.

    `bn_group_size` replicas share statistics (1 = none: plain per-replica BatchNorm;
    0 = all). In one process, consecutive chunks are grouped by it. Across processes
    (torchrun, one replica each) the statistics cover the given `process_group`, whose
    sums are all-reduced with autograd so gradients reach every replica's input; the
    engine builds groups of bn_group_size processes. Eval uses the running statistics.
    The state_dict is a BatchNorm's.

    A BatchNorm2d, so that PopTorch lets the forward update the running statistics: it
    exempts from its check that buffers keep their address only instances of
    nn.BatchNorm1d/2d/3d (BUFFERS_CAN_CHANGE, poptorch python/_impl.py).
    """

    def __init__(self, num_channels, eps=DEFAULT_EPS, momentum=0.1, act="relu",
                 apply_act=True, stats_chunks=1, bn_group_size=1, process_group=None, drop=None):
        super().__init__(num_channels, eps=eps, momentum=momentum)
        self.drop = drop  # None or a module, registered before `act` as in timm's tree
        self.act = get_act(act) if apply_act else nn.Identity()
        self.stats_chunks = stats_chunks
        self.bn_group_size = bn_group_size
        self.process_group = process_group

    def _check_input_dim(self, x):
        check_input(self, x, self.num_features)

    def _num_stats_groups(self, batch_size):
        """How many independent statistics groups the local batch holds."""
        chunks, group = self.stats_chunks, self.bn_group_size
        if self.process_group is not None and chunks != 1:
            raise ValueError(
                f"with a process_group each process holds one replica, got stats_chunks={chunks}")
        if chunks < 1 or batch_size % chunks:
            raise ValueError(
                f"a batch of {batch_size} samples cannot be split into stats_chunks={chunks} "
                f"equal replica micro-batches")
        if group < 0:
            raise ValueError(f"bn_group_size must be >= 0 (0 = all replicas), got {group}")
        if group == 0 or group >= chunks:
            return 1
        if chunks % group:
            raise ValueError(f"bn_group_size={group} does not divide stats_chunks={chunks}")
        return chunks // group

    def forward(self, x):
        num_groups = self._num_stats_groups(x.shape[0]) if self.training else 1
        if num_groups > 1 or (self.training and self.process_group is not None):
            self._check_input_dim(x)
            x = self._grouped_batch_norm(x, num_groups)
        else:
            x = super().forward(x)
        return self._drop_act(x)

    def _drop_act(self, x):
        return self.act(x if self.drop is None else self.drop(x))

    def _grouped_batch_norm(self, x, num_groups):
        dtype = statistics_dtype(x.dtype)
        xg = x.to(dtype).reshape(num_groups, x.shape[0] // num_groups, self.num_features, -1)
        count = xg.shape[1] * xg.shape[3]
        if count < 2 and self.process_group is None:
            raise ValueError(
                f"BatchNorm needs more than 1 value per channel when training, got input "
                f"of shape {tuple(x.shape)} split into {num_groups} statistics groups")
        mean = xg.mean(dim=(1, 3))  # (groups, C)
        var = (xg - mean[:, None, :, None]).square().mean(dim=(1, 3))
        if self.process_group is not None:
            mean, var, count = all_reduce_moments(mean, var, count, self.process_group)
        self._update_running_stats(mean, var, count)
        scale = torch.rsqrt(var + self.eps) * self.weight.to(dtype)
        # centre first: x * scale + (bias - mean * scale) cancels when |mean| >> std
        y = (xg - mean[:, None, :, None]) * scale[:, None, :, None] + self.bias.to(dtype)[:, None]
        return y.reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count):
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1)
        self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.mean(0).to(self.running_var.dtype), factor)


class SyncBatchNormAct(BatchNormAct):
    """BatchNorm + activation with statistics shared by `bn_group_size` replicas (0 = all).

    On CPU/GPU it is BatchNormAct (replica chunks in one process, or a torchrun process
    group). On IPUs each replica is its own copy of the graph holding one micro-batch, and
    `ipu_group_size` (the PopTorch engine builds the layer with it) is the number of
    replicas that share statistics, 0 = all, 1 = none (the default: plain per-replica
    BatchNorm, PopART's own op). While PopTorch
    traces a training graph with ipu_group_size != 1, the layer computes float32 moments
    of its micro-batch, sums them over the group with one differentiable all-reduce
    (ops.ipu.replica_all_reduce_sum: its gradient is the all-reduce of the
    gradient, so each replica's input gets the gradient of every group member's loss),
    normalises with the group's mean and variance and updates the running statistics
    from them: every replica of a group then holds the same running statistics.
    """

    def __init__(self, num_channels, eps=DEFAULT_EPS, momentum=0.1, act="relu",
                 apply_act=True, stats_chunks=1, bn_group_size=0, process_group=None, drop=None,
                 ipu_group_size=1):
        super().__init__(num_channels, eps, momentum, act, apply_act, stats_chunks,
                         bn_group_size, process_group, drop)
        self.ipu_group_size = ipu_group_size

    def forward(self, x):
        if self.training and self.ipu_group_size != 1 and ops.tracing_for_ipu():
            self._check_input_dim(x)
            return self._drop_act(self._ipu_sync_batch_norm(x))
        return super().forward(x)

    def _ipu_sync_batch_norm(self, x):
        """BatchNorm of x with the statistics of this replica's group, while PopTorch traces.

        float32 throughout (the IPU has no float64). Each replica sends (count, count * d,
        M2 + count * d^2) per channel, d = its mean minus a shift K common to the group (the
        running mean, which every replica of the group holds identically) and M2 its sum of
        squares about its own mean: the group's variance is then E[(x-K)^2] - E[x-K]^2,
        which cancels only in (mean - K)^2, small once the running mean has settled (a
        first step from K = 0 loses float32 digits as (mean / std)^2). One all-reduce call
        per layer and micro-batch forward, and one for its gradient in the backward;
        recomputation keeps its output instead of repeating it. Only ops that PopTorch 3.x
        lowers (no lerp_) and in-place updates of buffers by copy_.
        """
        import poptorch

        if self.stats_chunks != 1 or self.process_group is not None:
            raise ValueError("on IPUs each replica holds one micro-batch: stats_chunks must "
                             "be 1 and there is no process_group")
        n = x.numel() // self.num_features  # values per channel in this micro-batch
        xf = x.float().reshape(x.shape[0], self.num_features, -1)
        shift = self.running_mean.detach().float().clone()  # read before the update below
        mean = xf.mean(dim=(0, 2))
        m2 = (xf - mean[None, :, None]).square().sum(dim=(0, 2))
        d = mean - shift
        local = torch.stack([torch.full_like(d, float(n)), d * n, m2 + d * d * n])
        total = ops.ipu.replica_all_reduce_sum(local, self.ipu_group_size)
        total = poptorch.recomputationCheckpoint(total)
        count, sum_d, sum_d2 = total.unbind(0)
        mean_d = sum_d / count
        var = (sum_d2 / count - mean_d * mean_d).clamp_min(0.0)
        mean = shift + mean_d
        self._copy_running_stats(mean.detach(), var.detach(), count.detach())
        scale = torch.rsqrt(var + self.eps) * self.weight.float()
        y = (xf - mean[None, :, None]) * scale[None, :, None] + self.bias.float()[None, :, None]
        return y.reshape(x.shape).to(x.dtype)

    def _copy_running_stats(self, mean, var, count):
        """The running-statistics update of BatchNorm (unbiased variance), by copy_."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative average
            factor = 1.0 / self.num_batches_tracked.float()
        else:
            factor = self.momentum
        unbiased = var * count / (count - 1)
        for buffer, value in ((self.running_mean, mean), (self.running_var, unbiased)):
            buffer.copy_((buffer.float() * (1 - factor) + value * factor).to(buffer.dtype))


class AllReduceSum(torch.autograd.Function):
    """Sum over a process group; the gradient of a sum is the sum of the gradients.

    Written here because torch.distributed.nn.functional.all_reduce is deprecated in
    recent torch and its replacement has no autograd on torch 2.0.
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_moments(mean, var, count, group):
    """Combine each process's (mean, biased variance, count: an int) into the group's.

    Sums of x and x^2 travel in float64 so E[x^2] - E[x]^2 does not cancel; the
    all-reduce carries gradients, so each replica's input gets the gradient of every
    replica's loss through the shared statistics.
    """
    mean64, var64 = mean.double(), var.double()
    count64 = torch.full_like(mean64, count)
    sums = torch.stack([count64 * mean64, count64 * (var64 + mean64 * mean64), count64])
    sum_x, sum_x2, total = AllReduceSum.apply(sums, group).unbind(0)
    global_mean = sum_x / total
    global_var = sum_x2 / total - global_mean * global_mean
    return global_mean.to(mean.dtype), global_var.to(var.dtype), total.to(mean.dtype)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm + affine + activation over one sample.

    groups=1 is the LayerNorm of CNNs (statistics over C and all spatial positions of a
    sample, not nn.LayerNorm over the last dim); groups=C is InstanceNorm. bias=False
    gives the scale-only norm that Proxy Norm networks use where no activation follows.
    drop: None or a module applied between the affine and the activation (timm's order).
    The state_dict is an nn.GroupNorm's.
    """

    def __init__(self, num_channels, groups=DEFAULT_GROUPS, eps=DEFAULT_EPS, act="relu",
                 apply_act=True, bias=True, drop=None):
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        if num_channels % groups:
            raise ValueError(
                f"{type(self).__name__}: {num_channels} channels are not divisible by "
                f"{groups} groups")
        super().__init__(groups, num_channels, eps=eps)
        if not bias:
            self.register_parameter("bias", None)
        self.drop = drop  # None or a module, registered before `act` as in timm's tree
        self.act = get_act(act) if apply_act else nn.Identity()

    @property
    def groups(self):
        return self.num_groups

    def forward(self, x):
        check_input(self, x, self.num_channels)
        x = super().forward(x)
        return self.act(x if self.drop is None else self.drop(x))


class GroupNormProxyAct(GroupNormAct):
    """GroupNorm -> affine -> activation -> Proxy Norm, all within one sample.

    The maths lives in proxynorm/proxy.py. Parameters per channel: weight (gamma), bias
    (beta), proxy_weight and proxy_bias (the proxy's own affine, initialised to 0).
    There are no buffers: train and eval compute the same function.

    The layer runs the fused op (proxynorm.ops) when one is available for its input, which
    saves only the input for backward; `fused=False` (or PROXYNORM_FUSED=0) forces the
    eager PyTorch expression of the same maths, as does an activation the fused ops do not
    implement (FUSED_ACTS; e.g. relu6, hardswish).

    drop: None or a module applied to the output (after Proxy Norm), not between the
    affine and the activation as in timm's BatchNormAct2d: the proxy is pushed through
    exactly affine -> activation, so a mask in between would make its statistics those
    of another function.
    """

    def __init__(self, num_channels, groups=DEFAULT_GROUPS, eps=DEFAULT_EPS, act="relu",
                 proxy_eps=PROXY_EPS, num_proxy_samples=NUM_PROXY_SAMPLES, fused=True,
                 drop=None):
        super().__init__(num_channels, groups, eps, act, drop=drop)
        self.proxy_weight = nn.Parameter(torch.zeros(num_channels))
        self.proxy_bias = nn.Parameter(torch.zeros(num_channels))
        self.act_name = act
        self.proxy_eps = proxy_eps
        self.num_proxy_samples = num_proxy_samples
        self.fused = fused
        proxy_quantiles(num_proxy_samples)  # the host table, made here rather than in a trace

    def reset_parameters(self):
        super().reset_parameters()
        if hasattr(self, "proxy_weight"):  # nn.GroupNorm.__init__ calls this before they exist
            nn.init.zeros_(self.proxy_weight)
            nn.init.zeros_(self.proxy_bias)

    def forward(self, x):
        x = self._proxy_norm_act(x)
        return x if self.drop is None else self.drop(x)

    def _proxy_norm_act(self, x):
        check_input(self, x, self.num_channels)
        op = ops.fused_op(x) if self.fused and self.act_name in FUSED_ACTS else None
        if op is None:
            return proxy_norm_act(x, self.num_groups, self.weight, self.bias,
                                  self.proxy_weight, self.proxy_bias, self.act, self.eps,
                                  self.proxy_eps, self.num_proxy_samples)
        if x.numel() == self.num_groups:  # F.group_norm's check: both paths take the same inputs
            raise ValueError(
                f"{type(self).__name__} needs more than 1 value per group, got an input of "
                f"shape {tuple(x.shape)} with {self.num_groups} groups")
        dtype = statistics_dtype(x.dtype)
        # the ops take float32 vectors for a bfloat16 model; a no-op .to still costs a
        # call, which a small layer notices
        parameters = tuple(p if p.dtype == dtype else p.to(dtype) for p in (
            self.weight, self.bias, self.proxy_weight, self.proxy_bias))
        stats_op = ops.fused_proxy_stats(op)
        if stats_op is None:
            mean, var = proxy_stats(*parameters, self.act, self.num_proxy_samples)
            rstd = torch.rsqrt(var + self.proxy_eps)
        else:  # one op, and no (C, n) proxy kept for backward: it would outweigh a small batch
            mean, rstd = stats_op(*parameters,
                                  proxy_quantiles(self.num_proxy_samples, x.device, dtype),
                                  self.act_name, self.proxy_eps)
        return op(x, self.num_groups, *parameters[:2], mean, rstd, self.act_name, self.eps)

    def extra_repr(self):
        return f"{super().extra_repr()}, proxy_eps={self.proxy_eps}, fused={self.fused}"


def get_norm_act(name: str, num_channels: int, act: str = "relu", groups: Optional[int] = None,
                 eps: Optional[float] = None, apply_act: bool = True,
                 drop: Optional[nn.Module] = None, **kwargs) -> nn.Module:
    """One nn.Module doing the named normalisation, its affine and `act`.

        layer = get_norm_act("group_pn", 64, act="relu", groups=32)   # GN + Proxy Norm + ReLU
        y = layer(torch.randn(2, 64, 8, 8))                            # each sample on its own

    groups: GroupNorm groups for `group` and `group_pn` (default 32); the other names fix
    their own (layer: 1, instance: num_channels) or have none. eps defaults to 1e-5.
    apply_act=False: no activation follows; for the Proxy Norm names this is the
    scale-only group/layer norm (Proxy Norm needs an activation to act on).
    drop: None or a module (timm's drop_layer, e.g. DropBlock2d), the layer's `drop`:
    between the affine and the activation as in timm, after Proxy Norm in the Proxy Norm
    layers (whose activation must follow the affine directly); for `none`, drop then act.
    kwargs go to the layer: stats_chunks, bn_group_size, process_group, momentum for the
    BatchNorms (and ipu_group_size for sync_batch); proxy_eps, num_proxy_samples, fused for
    the Proxy Norms.
    """
    kind = norm_kind(name)
    check_act(act)
    eps = DEFAULT_EPS if eps is None else eps
    if name == "none":
        if kwargs:
            raise TypeError(f"norm 'none' takes no options, got {sorted(kwargs)}")
        act = get_act(act) if apply_act else nn.Identity()
        return act if drop is None else nn.Sequential(OrderedDict(drop=drop, act=act))
    if kind.batch_statistics:
        layer = SyncBatchNormAct if kind.synchronised else BatchNormAct
        return layer(num_channels, eps=eps, act=act, apply_act=apply_act, drop=drop, **kwargs)
    groups = {"any": DEFAULT_GROUPS if groups is None else groups, 1: 1,
              "channels": num_channels}[kind.groups]
    if kind.proxy:
        if not apply_act:  # the scale-only norm has no proxy: its options do not apply
            for option in ("proxy_eps", "num_proxy_samples", "fused"):
                kwargs.pop(option, None)
            return GroupNormAct(num_channels, groups, eps, apply_act=False, bias=False,
                                drop=drop, **kwargs)
        return GroupNormProxyAct(num_channels, groups, eps, act=act, drop=drop, **kwargs)
    return GroupNormAct(num_channels, groups, eps, act=act, apply_act=apply_act, drop=drop,
                        **kwargs)


def proxy_norm_path(model, device, dtype=torch.float32):
    """How the Proxy Norm layers of `model` compute for inputs of `dtype` on `device` (a CPU
    or CUDA device), in words a run records: "fused CPU op (53 layers)", "eager PyTorch (53
    layers)", or both counted where some layers cannot take the fused op (an activation
    without a fused kernel, fused=False); None when the model has no Proxy Norm layer. It
    depends on the environment (a built op, Triton, PROXYNORM_FUSED), not the config."""
    layers = [m for m in model.modules() if isinstance(m, GroupNormProxyAct)]
    if not layers:
        return None
    op = ops.fused_op(torch.empty(0, device=device, dtype=dtype))
    fused = {ops.cpu.group_norm_proxy_act: "fused CPU op",
             ops.gpu.group_norm_proxy_act: "fused GPU op (Triton)"}.get(op)
    counts = Counter(fused if fused and layer.fused and layer.act_name in FUSED_ACTS
                     else "eager PyTorch" for layer in layers)
    return ", ".join(f"{path} ({n} layer{'s' if n > 1 else ''})" for path, n in counts.items())
