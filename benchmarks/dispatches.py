"""Dispatch count of one norm-act layer's training step: what a small micro-batch pays for
in launches, whatever the kernels' speed.

    python -m benchmarks.dispatches [--device cuda|cpu] [--shape 2 64 14 14] [--groups 32]

A dispatch is an aten op that is neither a view nor an allocation (each such op is at
least one kernel launch on a GPU), plus one per Triton kernel launch of the fused GPU op
(proxynorm/ops/gpu.py). A step is the layer's forward and `out.backward(grad_out)` with
the parameters' .grad unset. These are counts, not timings. On a host without a GPU,
TRITON_INTERPRET=1 in the environment runs the GPU op's kernels in Triton's interpreter
on CPU tensors (`--device cpu`), which counts what a GPU would launch; without it a CPU
input takes the CPU op or the eager path.
"""
import argparse
import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from proxynorm import ops
from proxynorm.ops import gpu
from proxynorm.norms import norm_kind

# allocations: memory, no kernel (a zeros or full launches a fill and is counted)
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


class _Counting(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # an op that returns no tensor (promote_types) runs on the host
        if (not self.paused and not func.is_view and name not in ALLOCATIONS
                and any(isinstance(t, torch.Tensor) for t in _flat(result))):
            self.counts[f"{func.namespace}.{name}"] += 1
        return result


def _flat(result):
    return result if isinstance(result, (tuple, list)) else (result,)


class _CountingKernels:
    """gpu_kernels seen through a counter: `kernel[grid](...)` counts one launch and pauses
    the aten count while it runs (the interpreter moves tensors with aten ops of its own)."""

    def __init__(self, kernels, mode):
        self._kernels, self._mode = kernels, mode

    def __getattr__(self, name):
        kernel = getattr(self._kernels, name)
        mode = self._mode

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    mode.counts[f"triton.{name}"] += 1
                    mode.counts.grids.append((name, tuple(grid)))
                    mode.paused = True
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        mode.paused = False
                return launch
        return Launcher()


@contextlib.contextmanager
def counting():
    """Yields a Counter of the dispatches made inside the block; its `grids` attribute
    lists (kernel name, grid) of each Triton launch."""
    counts = Counter()
    counts.grids = []
    mode = _Counting(counts)
    kernels = gpu._kernels
    gpu._kernels = lambda: _CountingKernels(kernels(), mode)
    try:
        with mode:
            yield counts
    finally:
        gpu._kernels = kernels


def step_dispatches(layer, x, grad_out):
    """Counter of one training step's dispatches: forward, then backward."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    with counting() as counts:
        layer(x).backward(grad_out)
    return counts


def forward_backward_dispatches(layer, x, grad_out):
    """(forward Counter, backward Counter) of one training step."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    with counting() as forward:
        out = layer(x)
    with counting() as backward:
        out.backward(grad_out)
    return forward, backward


def main(argv=None):
    from proxynorm.norms import get_norm_act

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 64, 14, 14])
    parser.add_argument("--groups", type=int, default=32)
    args = parser.parse_args(argv)
    if args.device == "cpu" and gpu.interpreting():  # the GPU op on CPU tensors
        ops.fused_op = lambda x: gpu.group_norm_proxy_act
    x = torch.randn(args.shape, device=args.device)
    grad_out = torch.randn_like(x)
    channels = args.shape[1]
    for name, norm, act in [("batch_relu", "batch", "relu"), ("group_relu", "group", "relu"),
                            ("group_pn_relu", "group_pn", "relu"),
                            ("group_pn_silu", "group_pn", "silu"),
                            ("layer_pn_relu", "layer_pn", "relu")]:
        layer = get_norm_act(norm, channels, act=act, groups=args.groups).to(args.device)
        path = ""
        if norm_kind(norm).proxy:
            op = ops.fused_op(x)
            path = {None: " (eager)", gpu.group_norm_proxy_act: " (GPU op)"}.get(op, " (CPU op)")
        layer(x)  # first use: builds, compiles, caches the quantile table
        forward, backward = forward_backward_dispatches(layer, x, grad_out)
        print(f"{name}{path}: {sum(forward.values()) + sum(backward.values())} dispatches "
              f"(forward {sum(forward.values())}, backward {sum(backward.values())})")
        for counts, label in ((forward, "forward"), (backward, "backward")):
            print(f"  {label}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
