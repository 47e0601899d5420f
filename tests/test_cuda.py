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


def gpu_op_or_skip():
    from proxynorm.ops import gpu

    if not gpu.available():
        pytest.skip("the fused GPU op is not available here (Triton, or the GPU's capability)")
    return gpu


def test_gpu_op_row_longer_than_grid_axis_1_allows():
    """67,200,000 positions per channel: more tiles of a row than the 65,535 CUDA allows on
    grid axes 1 and 2. Identity with unit vectors makes out GroupNorm's y and, with a unit
    output gradient, grad_x 0 and the bias gradient the count of values."""
    gpu = gpu_op_or_skip()
    x = torch.randn(1, 2, 67_200_000, device="cuda").requires_grad_()
    vectors = [torch.tensor([1.0, 1.0], device="cuda", requires_grad=True),
               torch.zeros(2, device="cuda", requires_grad=True),
               torch.zeros(2, device="cuda", requires_grad=True),
               torch.ones(2, device="cuda", requires_grad=True)]
    out = gpu.group_norm_proxy_act(x, 2, *vectors, "identity", 1e-5)
    var, mean = torch.var_mean(x.detach().double(), dim=2, correction=0)
    expected = (x.detach().double() - mean[..., None]) / torch.sqrt(var[..., None] + 1e-5)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)
    grad_x, _, grad_bias, *_ = torch.autograd.grad(out, [x, *vectors], torch.ones_like(out))
    assert grad_x.abs().max() < 1e-6
    torch.testing.assert_close(grad_bias.cpu(), torch.full((2,), 67_200_000.0), rtol=1e-6, atol=0)


def test_gpu_op_group_of_more_than_2_to_the_31_values():
    """LayerNorm over 2^31 + 4,096 bfloat16 values of one sample: in-group offsets past 2^31
    (32-bit ones would wrap to negative addresses). Checked at both ends against torch's
    own statistics."""
    gpu = gpu_op_or_skip()
    size = 2 ** 30 + 2048
    x = torch.randn(1, 2, size, device="cuda", dtype=torch.bfloat16)
    vectors = [torch.ones(2, device="cuda"), torch.zeros(2, device="cuda"),
               torch.zeros(2, device="cuda"), torch.ones(2, device="cuda")]
    x.requires_grad_()
    out = gpu.group_norm_proxy_act(x, 1, *vectors, "identity", 1e-5)
    var, mean = torch.var_mean(x.detach().float(), correction=0)
    rstd = torch.rsqrt(var.double() + 1e-5)
    (grad_x,) = torch.autograd.grad(out, [x], torch.ones_like(out))
    for part in (slice(0, 4096), slice(size - 4096, size)):
        expected = ((x[:, :, part].detach().double() - mean.double()) * rstd).float()
        torch.testing.assert_close(out[:, :, part].float(), expected, rtol=1e-2, atol=1e-2)
        # a unit output gradient through GroupNorm alone: rstd (1 - 1 - y mean(y)) = 0
        assert grad_x[:, :, part].float().abs().max() < 1e-2
