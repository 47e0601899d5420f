"""Data parallelism across processes: `torchrun` starts one process per replica.

Under torchrun (WORLD_SIZE > 1 in the environment) each process is one replica: it loads
its own slice of every global batch (datasets.pipeline.EpochOrder), DistributedDataParallel
averages the gradients, and `sync_batch` all-reduces its statistics inside process groups of
`bn_group_size` consecutive ranks. Rank 0 alone writes the run folder. Without torchrun the
context is a single process and every collective below is the identity.

gloo on the CPU, NCCL on GPUs (one per process, by LOCAL_RANK). A process waits at most
`collective_timeout` seconds for its peers in a collective; a worker whose torchrun
launcher dies gets SIGTERM, which the loop turns into a checkpoint and a stop.

Under poprun (IPU pods) the PopTorch engine gives the instance's place, without host
collectives: each instance loads its own replicas' share and reports its own numbers.
"""
import contextlib
import ctypes
import os
import re
import signal
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from datasets import error_line
from proxynorm.norms import norm_kind
from train.config import ConfigError


# what gloo's and NCCL's failures say (gloo names its source file: third_party/gloo/...)
TRANSPORT_ERROR = re.compile(r"gloo|nccl|timed out|connection (closed|reset)", re.IGNORECASE)


class CollectiveError(Exception):
    """A collective that failed: another process stopped, hung or died, or was slower than
    collective_timeout. One line, like a user error."""


class Context:
    """Where this process stands among the replicas, and the collectives the loop needs."""

    def __init__(self, rank=0, world_size=1, bn_process_group=None, device=None,
                 host_collectives=True, timeout=None):
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
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

    @contextlib.contextmanager
    def collective_failures(self, only_transport=False):
        """Turns a collective's RuntimeError (gloo: 'Timed out waiting 5000ms for recv
        operation to complete', 'Connection closed by peer') into a one-line
        CollectiveError that says what to suspect. only_transport: around code that does
        more than collectives (a training step, where DDP all-reduces the gradients), only
        errors that come from gloo or NCCL."""
        try:
            yield
        except RuntimeError as error:
            if only_transport and not TRANSPORT_ERROR.search(str(error)):
                raise
            reason = re.sub(r"^\[[^\]]*\]\s*", "", error_line(error))  # gloo's [source.cc:line]
            raise CollectiveError(
                f"rank {self.rank}: a collective across the {self.world_size} processes failed "
                f"({reason}): another process stopped, hung or died, or took longer than "
                f"collective_timeout ({self.timeout} s)") from None

    def sum(self, *values):
        """The sums over all processes of these numbers (as floats)."""
        if not self.collective:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        with self.collective_failures():
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
        with self.collective_failures():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.collective:
            try:
                with self.collective_failures():
                    dist.barrier()  # a rank tearing gloo down while a peer talks aborts both
            finally:
                dist.destroy_process_group()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_with_launcher(signum=signal.SIGTERM, parent=None):
    """Asks Linux to send this process `signum` (SIGTERM) when its parent, the torchrun
    agent, dies. `parent`: the launcher's pid where the caller was given it (a process
    pool's worker may start after its parent died), else this process's parent now.

    torchrun starts workers in their own session, so a `kill -9` of the launcher reaches
    none of them: without this they would train on, orphaned. The signal follows the death
    of the parent *thread* that forked the worker; the elastic agent forks every worker
    (subprocess.Popen in SubprocessContext._start, torch/distributed/elastic/multiprocessing)
    from its main thread, under agent.run(), so it comes when the launcher process exits.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        return  # (a seccomp sandbox may refuse it): the worker then outlives its launcher
    if os.getppid() != parent:  # the launcher died before the request: as if it had come
        os.kill(os.getpid(), signum)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now, for a gloo rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env():
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(config, device):
    """The process context: a single process, or this process's place under torchrun.

    Checks that torchrun started one process per configured replica, asks for SIGTERM
    when the launcher dies, joins the process group and builds the sync_batch groups
    (every rank must create every group), all with `collective_timeout`.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker, even a single one
        stop_with_launcher()
    world_size = world_size_from_env()
    if world_size == 1:
        return Context()
    if config["replicas"] != world_size:
        raise ConfigError(
            f"torchrun started {world_size} processes, one replica each, but replicas is "
            f"{config['replicas']}: set --replicas {world_size} (keep the global batch with "
            f"--gradient-accumulation)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=config["collective_timeout"])
    dist.init_process_group(backend, timeout=timeout)
    rank = dist.get_rank()
    group = None
    size = config["bn_group_size"] or world_size
    if norm_kind(config["norm"]).synchronised and size > 1:
        for first in range(0, world_size, size):
            ranks = list(range(first, first + size))
            created = dist.new_group(ranks, timeout=timeout)  # else torch's 30 min
            if rank in ranks:
                group = created
    return Context(rank, world_size, group, device if backend == "nccl" else None,
                   timeout=config["collective_timeout"])


def local_device(device):
    """The device of this process: under torchrun, GPU LOCAL_RANK of the host."""
    if device.type != "cuda" or world_size_from_env() == 1:
        return device
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
