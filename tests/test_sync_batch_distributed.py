"""sync_batch across two real processes (gloo on 127.0.0.1) equals BatchNorm on the
concatenated batch: outputs, input gradients, parameter gradients, running statistics."""
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from proxynorm.norms import get_norm_act
from train.distributed import free_port

WORLD = 2


def worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # every rank builds the same global batch and parameters
        x = torch.randn(3 * WORLD, 5, 4, 4) + 50  # mean >> std: E[x^2] - E[x]^2 needs float64
        grad_out = torch.randn_like(x)
        weight, bias = torch.rand(5) + 0.5, torch.randn(5)

        ref = nn.BatchNorm2d(5)
        with torch.no_grad():
            ref.weight.copy_(weight), ref.bias.copy_(bias)
        x_ref = x.clone().requires_grad_()
        out_ref = F.relu(ref(x_ref))
        out_ref.backward(grad_out)

        layer = get_norm_act("sync_batch", 5, process_group=dist.group.WORLD)
        with torch.no_grad():
            layer.weight.copy_(weight), layer.bias.copy_(bias)
        mine = slice(3 * rank, 3 * rank + 3)
        x_mine = x[mine].clone().requires_grad_()
        out = layer(x_mine)
        out.backward(grad_out[mine])  # each rank's loss is its own slice's

        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, out_ref[mine], **close)
        torch.testing.assert_close(x_mine.grad, x_ref.grad[mine], **close)
        for name in ("weight", "bias"):
            grad = getattr(layer, name).grad.clone()
            dist.all_reduce(grad)  # what DDP does with parameter gradients (as a sum)
            torch.testing.assert_close(grad, getattr(ref, name).grad, **close)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, **close)
        torch.testing.assert_close(layer.running_var, ref.running_var, **close)
        dist.barrier()  # a rank tearing gloo down while its peer still talks aborts both
    finally:
        dist.destroy_process_group()


def test_sync_batch_over_two_gloo_processes_equals_batch_norm_on_the_whole_batch():
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)
