"""Data parallelism across processes: `torchrun` starts one process per replica.

Under torchrun (WORLD_SIZE > 1 in the environment) each process is one replica: it loads
its own slice of every global batch (datasets.pipeline.EpochOrder), DistributedDataParallel
averages the gradients, and `sync_batch` all-reduces its statistics inside process groups of
`bn_group_size` consecutive ranks. Rank 0 alone writes the run folder. Without torchrun the
context is a single process and every collective below is the identity.

gloo on the CPU, NCCL on GPUs (one per process, by LOCAL_RANK).

Under poprun (IPU pods) the PopTorch engine gives the instance's place, without host
collectives: each instance loads its own replicas' share and reports its own numbers.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from train.config import ConfigError


class Context:
    """Where this process stands among the replicas, and the collectives the loop needs."""

    def __init__(self, rank=0, world_size=1, bn_process_group=None, device=None,
                 host_collectives=True):
        self.rank, self.world_size = rank, world_size
        self.bn_process_group = bn_process_group
        self.device = device or torch.device("cpu")  # where collectives' tensors live (NCCL: GPU)
        # poprun instances share no host process group: each reports its own numbers
        self.host_collectives = host_collectives

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def collective(self):
        """Whether the processes can sum numbers on the host (torchrun; not poprun)."""
        return self.distributed and self.host_collectives

    @property
    def is_main(self):
        return self.rank == 0

    def sum(self, *values):
        """The sums over all processes of these numbers (as floats)."""
        if not self.collective:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return tuple(total.tolist())

    def any(self, flag):
        """Whether `flag` is true in any process: every process takes the same decision."""
        return bool(self.sum(float(flag))[0]) if self.collective else flag

    def from_main(self, value):
        """Rank 0's value of a picklable object, in every process."""
        if not self.collective:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.collective:
            dist.barrier()  # a rank tearing gloo down while a peer still talks aborts both
            dist.destroy_process_group()


def world_size_from_env():
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(config, device):
    """The process context: a single process, or this process's place under torchrun.

    Checks that torchrun started one process per configured replica, joins the process
    group and builds the sync_batch groups (every rank must create every group).
    """
    world_size = world_size_from_env()
    if world_size == 1:
        return Context()
    if config["replicas"] != world_size:
        raise ConfigError(
            f"torchrun started {world_size} processes, one replica each, but replicas is "
            f"{config['replicas']}: set --replicas {world_size} (keep the global batch with "
            f"--gradient-accumulation)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=10))
    rank = dist.get_rank()
    group = None
    size = config["bn_group_size"] or world_size
    if config["norm"] == "sync_batch" and size > 1:
        for first in range(0, world_size, size):
            ranks = list(range(first, first + size))
            created = dist.new_group(ranks)
            if rank in ranks:
                group = created
    return Context(rank, world_size, group, device if backend == "nccl" else None)


def local_device(device):
    """The device of this process: under torchrun, GPU LOCAL_RANK of the host."""
    if device.type != "cuda" or world_size_from_env() == 1:
        return device
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
