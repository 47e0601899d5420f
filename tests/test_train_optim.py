"""train/optim.py: parameter groups, TensorFlow-style RMSprop, schedules, weight averaging."""
import math

import pytest
import torch
from torch import nn

from models import get_model
from train.build import resolve_config
from train.optim import LRSchedule, RMSpropTF, WeightAverage, param_groups


def test_no_decay_on_biases_and_norm_weights_but_on_proxy_parameters():
    model = get_model("digits_resnet", norm="group_pn", num_classes=10, in_channels=1)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "conv1.weight" in decayed and "fc.weight" in decayed and "fc.bias" not in decayed
    assert "layer1.0.bn1.proxy_weight" in decayed and "layer1.0.bn1.proxy_bias" in decayed
    assert "layer1.0.bn1.weight" not in decayed and "bn1.bias" not in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_rmsprop_is_tensorflows():
    """ms starts at 1, eps inside the square root, lr inside the momentum."""
    param = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = RMSpropTF([param], lr=0.1, decay=0.9, momentum=0.5, eps=1e-3, weight_decay=0.01)
    ms, mom, p = torch.ones(2), torch.zeros(2), param.detach().clone()
    for lr, grad in ((0.1, torch.tensor([0.5, 0.25])), (0.05, torch.tensor([-1.0, 2.0]))):
        for group in optimizer.param_groups:
            group["lr"] = lr
        param.grad = grad.clone()
        optimizer.step()
        g = grad + 0.01 * p
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.5 * mom + lr * g / torch.sqrt(ms + 1e-3)
        p = p - mom
        assert torch.allclose(param.detach(), p)


def schedule(steps_per_epoch=10, **options):
    config = resolve_config("digits_resnet_group_pn", overrides=options)
    return LRSchedule(config, steps_per_epoch)


def test_warmup_then_cosine_to_zero():
    lr = schedule(epochs=10, lr=1.0, warmup_epochs=1, lr_schedule="cosine")
    assert [lr(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr(10) == pytest.approx(1.0) and lr(55) == pytest.approx(0.5)
    assert lr(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_exponential_and_step_schedules():
    lr = schedule(epochs=10, lr=1.0, warmup_epochs=0, lr_schedule="exponential", lr_decay=0.97,
                  lr_decay_epochs=2.4)
    assert [lr(s) for s in (0, 23, 24, 48)] == pytest.approx([1, 1, 0.97, 0.97 ** 2])
    lr = schedule(epochs=10, lr=1.0, lr_schedule="step", lr_milestones="3,6", lr_decay=0.1)
    assert [lr(s) for s in (29, 30, 60)] == pytest.approx([1, 0.1, 0.01])


def test_weight_average_per_update():
    model = nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(4.0)
    average.update(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(8.0)
    average.update(model)
    assert torch.allclose(average.model.weight, torch.full((1, 2), 0.75 * 4 + 0.25 * 8))
    assert not average.model.weight.requires_grad
