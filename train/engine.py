"""Engines run the model for the loop: compile it with its optimiser, take one optimiser
step per global batch, evaluate batches, and hold the state a checkpoint saves.

The loop talks to an engine only through `train_step`, `eval_step`, `set_lr`,
`state_dict`/`load_state_dict`, `make_loader`, `model`, `device` and `steps_per_call`, so
the PopTorch engine (train/ipu_engine.py) and PyTorchEngine are interchangeable;
train/build.py chooses one and builds the model with the layer options it asks for
(`norm_kwargs`), after its `check` of the config.

Batch semantics, the same for every engine: per optimiser step the global batch is
micro_batch_size x gradient_accumulation x replicas samples and the loss is the mean over
all of them (PopTorch's Mean reduction over accumulation and replication). A host batch is
laid out [accumulation step, replica, micro-batch], as PopART lays out its input. BatchNorm
statistics cover one replica's micro-batch (or bn_group_size replicas for sync_batch).
"""
import contextlib
import inspect
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from datasets.pipeline import make_loader
from proxynorm.norms import norm_kind
from train.config import ConfigError, global_batch_size
from train.optim import build_optimizer
from train.steps import NonFiniteLoss, count_correct


def resolve_device(engine):
    """The torch device for a PyTorch engine name; `ipu` (no PopTorch here) runs as `auto`:
    on a GPU where there is one, else on the CPU."""
    if engine in ("ipu", "auto"):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if engine == "ipu":
            print(f"warning: engine ipu: PopTorch is not installed; running the PyTorch engine "
                  f"on the {'GPU' if device.type == 'cuda' else 'CPU'} (IPU-only settings are "
                  f"ignored)", file=sys.stderr)
        return device
    if engine == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine cuda: no CUDA device is available (use --engine cpu)")
    return torch.device(engine)


def no_buffer_sync():
    """DDP keeps each replica's buffers (BatchNorm running statistics) its own, as on an IPU
    pod; average_running_stats merges them after each step. The keyword changed in torch 2.14."""
    parameters = inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in parameters
            else "broadcast_buffers": False}


def classification_loss(logits, targets, label_smoothing, reduction="sum"):
    """Cross-entropy in float32; targets are class indices or class probabilities (mixup)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing,
                           reduction=reduction)


class PyTorchEngine:
    """One process on the CPU or one GPU, alone or as one replica under torchrun.

    Replicas in one process are emulated exactly: each accumulation step is one forward
    pass over replicas x micro_batch_size samples, and the model's BatchNorm layers were
    built with stats_chunks=replicas so each replica's micro-batch keeps its own statistics.
    Under torchrun each process is one replica of a DistributedDataParallel model and gets
    its own slice of the global batch. Precision 16.x runs the forward pass under bfloat16
    autocast with float32 weights.
    """

    steps_per_call = 1  # device_iterations is an IPU setting

    @staticmethod
    def check(config):
        """ConfigError for a config this engine cannot run, from the config alone."""
        if config["compile_only"]:
            raise ConfigError("compile_only compiles IPU executables: it needs engine ipu and "
                              "PopTorch (a Poplar SDK host)")
        if config["compile_mode"] != "default" and not config["compile"]:
            raise ConfigError(f"compile_mode {config['compile_mode']} is torch.compile's mode: "
                              f"add --compile true")

    @staticmethod
    def norm_kwargs(config, context=None):
        """The options of the model's norm layers (None: none): only BatchNorms take them,
        the batch-independent norms have no statistics to split. In one process BatchNorm
        emulates the replicas (stats_chunks); under torchrun each process is one replica and
        sync_batch all-reduces within the context's process group."""
        kind = norm_kind(config["norm"])
        distributed = context is not None and context.distributed
        chunks = 1 if distributed else config["replicas"]
        if kind.synchronised:
            return {"stats_chunks": chunks, "bn_group_size": config["bn_group_size"],
                    "process_group": context.bn_process_group if distributed else None}
        if kind.batch_statistics:
            return {"stats_chunks": chunks}
        return None

    def __init__(self, model, config, device, context):
        if config["cpu_threads"]:
            torch.set_num_threads(config["cpu_threads"])
        self.device, self.context = device, context
        # the weights once here, the images at every step: the layers keep the layout
        self.memory_format = torch.channels_last if config["channels_last"] \
            else torch.preserve_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.network = self.model
        if context.distributed:
            self.network = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                **no_buffer_sync())
        if config["compile"]:  # wraps DDP, whose buckets torch.compile's DDPOptimizer follows
            self.network = torch.compile(self.network, mode=config["compile_mode"])
        self.optimizer = build_optimizer(config, self.model)
        self.accumulation = config["gradient_accumulation"]
        self.global_batch = global_batch_size(config)
        self.local_batch = self.global_batch // context.world_size
        self.eval_batch = config["micro_batch_size"] * config["replicas"] // context.world_size
        self.label_smoothing = config["label_smoothing"]
        self.grad_clip_norm = config["grad_clip_norm"]
        self.autocast = config["precision"] != "32.32"
        self.running_stats = [buffer for name, buffer in self.model.named_buffers()
                              if name.endswith(("running_mean", "running_var"))]

    def make_loader(self, view, batch_size, sampler, num_workers=0, pin_memory=False, seed=0):
        return make_loader(view, batch_size, sampler, num_workers,
                           pin_memory and self.device.type == "cuda", seed)

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, model, images):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return model(images)

    def train_step(self, images, targets):
        """One optimiser step on one global batch (this process's slice of it under torchrun):
        (mean loss over the global batch, number correct in it).

        Raises NonFiniteLoss, without touching the weights, if the loss is NaN or infinite.
        """
        if len(images) != self.local_batch:
            raise ValueError(f"expected {self.local_batch} samples of the global batch of "
                             f"{self.global_batch}, got {len(images)}")
        self.model.train()
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        chunks = list(zip(images.chunk(self.accumulation), targets.chunk(self.accumulation)))
        for i, (chunk, chunk_targets) in enumerate(chunks):
            # DDP averages gradients over processes once, after the last micro-batch
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last or not self.context.distributed \
                    else self.network.no_sync():
                logits = self.forward(self.network, chunk)
                loss = classification_loss(logits, chunk_targets, self.label_smoothing)
                # gradients add up (over chunks, averaged over processes) to the global mean's
                (loss / self.local_batch).backward()
            loss_sum += loss.detach()
            correct += count_correct(logits.detach(), chunk_targets)
        loss_sum, correct = self.context.sum(loss_sum.item(), correct.item())
        mean_loss = loss_sum / self.global_batch
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(mean_loss)
        if self.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.average_running_stats()
        return mean_loss, int(correct)

    @torch.no_grad()
    def average_running_stats(self):
        """BatchNorm running statistics: the mean over replicas, as one process emulating
        them keeps (the update is linear, so averaging after it is the same)."""
        if self.context.distributed and self.running_stats:
            flat = torch.cat([buffer.flatten() for buffer in self.running_stats])
            torch.distributed.all_reduce(flat)
            flat /= self.context.world_size
            for buffer, value in zip(self.running_stats, flat.split(
                    [buffer.numel() for buffer in self.running_stats])):
                buffer.copy_(value.view_as(buffer))

    @torch.no_grad()
    def eval_step(self, images, targets, model=None):
        """(summed loss, number correct) of `model` (default: the trained one) on a batch."""
        model = self.model if model is None else model
        model.eval()
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        logits = self.forward(model, images)
        loss = classification_loss(logits, targets, 0.0)
        return loss.item(), int(count_correct(logits, targets))

    def close(self):
        """Nothing to release (the PopTorch engine releases its IPUs here)."""

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
