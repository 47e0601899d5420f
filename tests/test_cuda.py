"""The CUDA path against the CPU: same layers, same models, same numbers.

On CUDA the Proxy Norm layers run the fused Triton op (proxynorm/ops/gpu.py) where Triton is
installed, else the eager PyTorch expression; BatchNorm runs cuDNN or the replica-chunked
path. Skipped without a GPU.
"""
import pytest
import torch

from models import get_model
from proxynorm.norms import get_norm_act
from test_norms import randomise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 convolutions would differ from the CPU by 1e-3; compare true float32."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def forward_backward(module, x, grad_out):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    grads = torch.autograd.grad(out, [x, *module.parameters()], grad_out)
    return out, grads


def assert_same_on_cuda(module, x, rtol=1e-4, atol=1e-4):
    grad_out = torch.randn_like(module(x))
    out, grads = forward_backward(module, x, grad_out)
    gpu = module.cuda()
    out_gpu, grads_gpu = forward_backward(gpu, x.cuda(), grad_out.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out, rtol=rtol, atol=atol)
    for g_gpu, g in zip(grads_gpu, grads):
        scale = g.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(g_gpu.cpu() / scale, g / scale, rtol=rtol, atol=atol)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("name", ["group_pn", "layer_pn"])
def test_proxy_norm_layer_on_cuda_equals_cpu(name, act):
    layer = randomise(get_norm_act(name, 16, act=act, groups=4))
    assert_same_on_cuda(layer, torch.randn(3, 16, 9, 7) * 2 + 0.5)


def test_replica_chunked_batch_norm_on_cuda_equals_cpu():
    layer = randomise(get_norm_act("batch", 8, stats_chunks=4)).train()
    assert_same_on_cuda(layer, torch.randn(8, 8, 5, 5))


@pytest.mark.parametrize("name,norm", [("digits_resnet", "group_pn"), ("resnet18", "layer_pn"),
                                       ("efficientnet_b0", "group_pn"),
                                       ("cifar_resnet20", "batch")])
def test_model_on_cuda_equals_cpu(name, norm):
    model = get_model(name, norm=norm, num_classes=10)
    # EfficientNet in eval: dropout and stochastic depth draw other numbers on each device
    model.train(not name.startswith("efficientnet"))
    size = 32 if name in ("digits_resnet", "cifar_resnet20") else 64
    assert_same_on_cuda(model, torch.randn(2, 3, size, size), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("norm", ["group_pn", "layer_pn"])
def test_execution_plans_train_the_same_weights_on_cuda(norm):
    """(micro 2, accumulation 4, replicas 2) == (16, 1, 1) on the GPU, and both == the CPU."""
    from test_execution_plans import PLANS, assert_same_weights, one_step

    before, cpu = one_step(norm, PLANS["16x1x1"])
    _, whole = one_step(norm, PLANS["16x1x1"], initial=before, device="cuda")
    _, split = one_step(norm, PLANS["2x4x2"], initial=before, device="cuda")
    assert_same_weights(split, whole)
    assert_same_weights(whole, cpu)
