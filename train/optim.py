"""Optimisers, the learning-rate schedule and weight averaging, built from the config.

Weight decay skips biases and the weights of normalisation layers (their per-channel
scale), as is usual. Proxy Norm's `proxy_weight` and `proxy_bias` take the ordinary decay,
as the authors' reference does: it pulls them towards 0, their initial value, where the
proxy is a standard Gaussian.
"""
import copy
import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model, weight_decay):
    """[decayed parameters, parameters without decay] as optimiser parameter groups."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if name == "bias" or (name == "weight" and isinstance(module, NORM_TYPES)):
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(config, model):
    groups = param_groups(model, config["weight_decay"])
    name, lr = config["optimizer"], config["lr"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config["momentum"],
                               nesterov=config["nesterov"] and config["momentum"] > 0)
    if name == "rmsprop":
        return RMSpropTF(groups, lr=lr, decay=config["rmsprop_decay"],
                         momentum=config["momentum"], eps=config["optimizer_eps"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(config["adam_betas"]),
                             eps=config["optimizer_eps"])


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop as TensorFlow computes it (the EfficientNet reference's optimiser).

        ms  <- decay * ms + (1 - decay) * g^2          ms starts at 1, as in TensorFlow
        mom <- momentum * mom + lr * g / sqrt(ms + eps)
        p   <- p - mom

    Unlike torch.optim.RMSprop, eps is inside the square root (with eps = 1e-3 that
    bounds the step size early on) and the learning rate enters the momentum, so a change
    of learning rate affects new updates only. Weight decay is added to the gradient (L2),
    as TensorFlow's regulariser added to the loss.
    """

    def __init__(self, params, lr, decay=0.9, momentum=0.9, eps=1e-3, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                if not state:
                    state["square_avg"] = torch.ones_like(param)
                    state["momentum_buffer"] = torch.zeros_like(param)
                square_avg, buffer = state["square_avg"], state["momentum_buffer"]
                square_avg.mul_(group["decay"]).addcmul_(grad, grad, value=1 - group["decay"])
                buffer.mul_(group["momentum"]).addcdiv_(
                    grad, (square_avg + group["eps"]).sqrt_(), value=group["lr"])
                param.sub_(buffer)
        return loss


class LRSchedule:
    """The learning rate of each optimiser step: a function of the step number only, so a
    resumed run needs no scheduler state.

    Linear warm-up over `warmup_epochs` (step i gets lr * (i + 1) / warmup steps), then:
    constant; step (x lr_decay at each epoch in lr_milestones); cosine (from lr at the end
    of warm-up to 0 at the last epoch); exponential (x lr_decay every lr_decay_epochs,
    staircase, counted from the start of training as TensorFlow's schedule).
    """

    def __init__(self, config, steps_per_epoch):
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.warmup_steps = round(config["warmup_epochs"] * steps_per_epoch)
        self.total_steps = config["epochs"] * steps_per_epoch

    def __call__(self, step):
        config, lr = self.config, self.config["lr"]
        if step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        epoch = step / self.steps_per_epoch
        kind = config["lr_schedule"]
        if kind == "step":
            return lr * config["lr_decay"] ** sum(epoch >= m for m in config["lr_milestones"])
        if kind == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "exponential":
            return lr * config["lr_decay"] ** math.floor(epoch / config["lr_decay_epochs"])
        return lr


class WeightAverage:
    """An exponential moving average of a model's weights, updated once per epoch.

    avg <- decay * avg + (1 - decay) * weights; the first update copies the weights. Per
    epoch, as the EfficientNet recipe's 0.97 is meant (an average over epoch-end
    checkpoints). Floating-point buffers (BatchNorm's running statistics) are averaged
    too; integer ones are copied.
    """

    def __init__(self, model, decay):
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model):
        current = model.state_dict()
        for name, average in self.model.state_dict().items():
            if self.updates == 0 or not average.is_floating_point():
                average.copy_(current[name])
            else:
                average.lerp_(current[name].to(average.dtype), 1.0 - self.decay)
        self.updates += 1

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
