"""Engines run the model for the loop: compile it with its optimiser, take one optimiser
step per global batch, evaluate batches, and hold the state a checkpoint saves.

The loop talks to an engine only through `train_step`, `eval_step`, `set_lr`,
`state_dict`/`load_state_dict`, `model` and `device`, so a PopTorch engine and
DistributedDataParallel can slot in beside PyTorchEngine without touching the loop.

Batch semantics, the same for every engine: per optimiser step the global batch is
micro_batch_size x gradient_accumulation x replicas samples and the loss is the mean over
all of them (PopTorch's Mean reduction over accumulation and replication). BatchNorm
statistics cover one replica's micro-batch (or bn_group_size replicas for sync_batch).
"""
import math
import sys

import torch
import torch.nn.functional as F

from train.config import ConfigError, global_batch_size
from train.optim import build_optimizer


class NonFiniteLoss(Exception):
    """The loss of a step was NaN or infinite; the step was not applied."""

    def __init__(self, loss):
        super().__init__(f"loss is {loss}")
        self.loss = loss


def resolve_device(engine):
    """The torch device for an engine name; `ipu` without a PopTorch engine runs on the CPU."""
    if engine == "ipu":
        try:
            import poptorch  # noqa: F401
            reason = "the PopTorch engine is not part of this version yet"
        except ImportError:
            reason = "PopTorch is not installed"
        print(f"warning: engine ipu: {reason}; running the PyTorch engine on the CPU "
              f"(IPU-only settings are ignored)", file=sys.stderr)
        return torch.device("cpu")
    if engine == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if engine == "cuda" and not torch.cuda.is_available():
        raise ConfigError("engine cuda: no CUDA device is available (use --engine cpu)")
    return torch.device(engine)


def make_engine(config, model):
    return PyTorchEngine(model, config, resolve_device(config["engine"]))


def classification_loss(logits, targets, label_smoothing, reduction="sum"):
    """Cross-entropy in float32; targets are class indices or class probabilities (mixup)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing,
                           reduction=reduction)


def count_correct(logits, targets):
    labels = targets.argmax(dim=1) if targets.dim() == 2 else targets
    return (logits.argmax(dim=1) == labels).sum()


class PyTorchEngine:
    """One process on the CPU or one GPU.

    Replicas are emulated exactly: each accumulation step is one forward pass over
    replicas x micro_batch_size samples, and the model's BatchNorm layers were built with
    stats_chunks=replicas so each replica's micro-batch keeps its own statistics.
    Precision 16.x runs the forward pass under bfloat16 autocast with float32 weights.
    """

    def __init__(self, model, config, device):
        if config["cpu_threads"]:
            torch.set_num_threads(config["cpu_threads"])
        self.device = device
        self.model = model.to(device)
        self.optimizer = build_optimizer(config, self.model)
        self.accumulation = config["gradient_accumulation"]
        self.global_batch = global_batch_size(config)
        self.label_smoothing = config["label_smoothing"]
        self.grad_clip_norm = config["grad_clip_norm"]
        self.autocast = config["precision"] != "32.32"

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, model, images):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return model(images)

    def train_step(self, images, targets):
        """One optimiser step on one global batch: (mean loss, number correct).

        Raises NonFiniteLoss, without touching the weights, if the loss is NaN or infinite.
        """
        if len(images) != self.global_batch:
            raise ValueError(f"expected a global batch of {self.global_batch}, got {len(images)}")
        self.model.train()
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for chunk, chunk_targets in zip(images.chunk(self.accumulation),
                                        targets.chunk(self.accumulation)):
            logits = self.forward(self.model, chunk)
            loss = classification_loss(logits, chunk_targets, self.label_smoothing)
            (loss / self.global_batch).backward()  # gradients sum to the global-batch mean's
            loss_sum += loss.detach()
            correct += count_correct(logits.detach(), chunk_targets)
        mean_loss = loss_sum.item() / self.global_batch
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(mean_loss)
        if self.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss, int(correct)

    @torch.no_grad()
    def eval_step(self, images, targets, model=None):
        """(summed loss, number correct) of `model` (default: the trained one) on a batch."""
        model = self.model if model is None else model
        model.eval()
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        logits = self.forward(model, images)
        loss = classification_loss(logits, targets, 0.0)
        return loss.item(), int(count_correct(logits, targets))

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
