"""The fused CPU op (proxynorm/ops/) against the eager layer and an independent formula."""
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from proxynorm import ops
from proxynorm.ops import cpu
from proxynorm.norms import get_norm_act, proxy_norm_path
from proxynorm.activations import get_act
from proxynorm.proxy import PROXY_EPS, proxy_quantiles, proxy_stats
from test_norms import ACT_FORMULAS, randomise, reference_proxy_norm

if not hasattr(torch.library, "register_fake"):  # torch 2.0 (IPU hosts): no CPU op
    pytest.skip("the fused CPU op needs torch >= 2.4", allow_module_level=True)

ACTS = ["relu", "silu", "gelu", "identity"]
SHAPES = [  # (shape, groups): N = 1, C not a multiple of the vector width, H x W = 1,
    ((1, 12, 5, 7), 3),  # G = 1, G = C, 1-D, 2-D and 3-D spatial inputs
    ((3, 10, 1, 1), 2),
    ((2, 8, 6, 5), 1),
    ((2, 6, 4, 3), 6),
    ((2, 8, 37), 4),
    ((2, 4, 3, 5, 2), 2),
    ((4, 40, 7, 7), 8),  # short rows of SiLU/GELU in several chunks, split inside groups
    ((2, 64, 17, 17), 32),  # rows long enough for SiLU/GELU to skip the chunk buffer
]


@pytest.fixture(scope="module", autouse=True)
def built_op():
    assert cpu.load(), "the fused CPU op is not built: run `make custom_ops`"


def layer_pair(act, channels, groups, dtype=torch.float32):
    """The same random layer twice: fused and eager."""
    fused = randomise(get_norm_act("group_pn", channels, act=act, groups=groups)).to(dtype)
    eager = get_norm_act("group_pn", channels, act=act, groups=groups, fused=False).to(dtype)
    eager.load_state_dict(fused.state_dict())
    return fused, eager


def run(layer, x, grad_out):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    params = [layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias]
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    return out, grads


def saved_tensor_sizes(fn, x):
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(x)
    return sizes


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_fused_equals_eager_float32(act, shape, groups):
    check_fused_equals_eager(act, shape, groups)


def check_fused_equals_eager(act, shape, groups):
    fused, eager = layer_pair(act, shape[1], groups)
    x = torch.randn(shape) * 2 + 0.5
    grad_out = torch.randn(shape)
    out, grads = run(fused, x, grad_out)
    out_eager, grads_eager = run(eager, x, grad_out)
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads_eager[0], rtol=1e-5, atol=1e-5)
    # identity's bias gradient is 0 up to the rounding of sums over N x H x W terms, so
    # parameter gradients are compared relative to the largest of them
    scale = max(g.abs().max() for g in grads_eager[1:])
    for name, g, g_eager in zip(["weight", "bias", "proxy_weight", "proxy_bias"],
                                grads[1:], grads_eager[1:]):
        torch.testing.assert_close(g / scale, g_eager / scale, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,groups", [SHAPES[0], SHAPES[3], SHAPES[5]])
def test_fused_float64_equals_independent_formula(act, shape, groups):
    fused, _ = layer_pair(act, shape[1], groups, torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    grad_out = torch.randn(shape, dtype=torch.float64)
    out, grads = run(fused, x, grad_out)
    x_ref = x.clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in
              (fused.weight, fused.bias, fused.proxy_weight, fused.proxy_bias)]
    expected = reference_proxy_norm(x_ref, groups, *params, ACT_FORMULAS[act])
    expected_grads = torch.autograd.grad(expected, [x_ref, *params], grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, expected_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("act", ACTS)
def test_op_gradcheck_float64(act):
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    vectors = [(torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_() for _ in range(4)]
    assert torch.autograd.gradcheck(
        lambda x, w, b, m, s: cpu.group_norm_proxy_act(x, 3, w, b, m, s, act, 1e-5),
        (x, *vectors))


def test_opcheck_registration_autograd_and_fake_kernel():
    x = torch.randn(2, 6, 4, 3, requires_grad=True)
    vectors = [torch.rand(6, requires_grad=True) + 0.5 for _ in range(4)]
    torch.library.opcheck(torch.ops.proxynorm.group_norm_proxy_act.default,
                          (x, 3, *vectors, "silu", 1e-5))


def random_proxy_parameters(channels, dtype, requires_grad=True):
    """weight near 1, the rest near 0, as trained layers have them."""
    return [((1.0 if i == 0 else 0.0) + 0.5 * torch.randn(channels, dtype=dtype))
            .requires_grad_(requires_grad) for i in range(4)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels,samples", [(13, 200), (1, 37), (70, 16)])
def test_proxy_stats_op_equals_pytorch_expression(act, channels, samples):
    """The C++ statistics against proxynorm/proxy.py and the layer's rsqrt(var + proxy_eps),
    values and all four gradients; proxy_eps is not the default, so the op must use it."""
    params = random_proxy_parameters(channels, torch.float32)
    u = proxy_quantiles(samples, "cpu", torch.float32)
    mean, rstd = cpu.proxy_stats(*params, u, act, 0.1)
    ref_mean, ref_var = proxy_stats(*params, get_act(act), samples)
    ref_rstd = torch.rsqrt(ref_var + 0.1)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-5, atol=1e-6)
    grads = [torch.randn(channels), torch.randn(channels)]
    for g, g_ref in zip(torch.autograd.grad((mean, rstd), params, grads),
                        torch.autograd.grad((ref_mean, ref_rstd), params, grads)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_proxy_stats_op_gradcheck_float64(act):
    params = random_proxy_parameters(5, torch.float64)
    u = proxy_quantiles(37, "cpu", torch.float64)
    assert torch.autograd.gradcheck(lambda *p: cpu.proxy_stats(*p, u, act, 0.1), params)


def test_proxy_stats_opcheck_and_bad_input():
    params = random_proxy_parameters(6, torch.float32)
    u = proxy_quantiles(200, "cpu", torch.float32)
    torch.library.opcheck(torch.ops.proxynorm.proxy_stats.default,
                          (*params, u, "gelu", PROXY_EPS))
    with pytest.raises(RuntimeError, match="quantiles must be a non-empty"):
        cpu.proxy_stats(*params, u.double(), "relu", PROXY_EPS)
    with pytest.raises(RuntimeError, match=r"proxy_bias must be a \(6,\) Float tensor"):
        cpu.proxy_stats(*params[:3], torch.zeros(5), u, "relu", PROXY_EPS)


def test_backward_is_not_differentiable():
    """Both backward ops have no derivative: a second backward raises rather than drop
    their terms."""
    x = torch.randn(2, 6, 3, 2, requires_grad=True)
    vectors = [(torch.rand(6) + 0.5).requires_grad_() for _ in range(4)]
    out = cpu.group_norm_proxy_act(x, 3, *vectors, "silu", 1e-5)
    grad_x, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="group_norm_proxy_act is differentiable only once"):
        grad_x.sum().backward()
    u = proxy_quantiles(200, "cpu", torch.float32)
    mean, rstd = cpu.proxy_stats(*vectors, u, "silu", PROXY_EPS)
    grad_weight, = torch.autograd.grad((mean * rstd).sum(), vectors[0], create_graph=True)
    with pytest.raises(RuntimeError, match="proxy_stats is differentiable only once"):
        grad_weight.sum().backward()


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_any_memory_layout(layout):
    fused, eager = layer_pair("relu", 8, 4)
    base = torch.randn(3, 8, 6, 5)
    x = (base.to(memory_format=torch.channels_last) if layout == "channels_last"
         else torch.randn(3, 8, 5, 6).transpose(2, 3))
    assert not x.is_contiguous()
    grad_out = torch.randn(x.shape).to(memory_format=torch.channels_last)
    out, grads = run(fused, x, grad_out)
    out_eager, grads_eager = run(eager, x, grad_out)
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_bfloat16_input_accumulates_in_float32(act):
    fused, eager = layer_pair(act, 16, 4)
    x = (torch.randn(2, 16, 9, 9) * 3 + 2).bfloat16()
    grad_out = torch.randn(x.shape).bfloat16()
    out, grads = run(fused, x, grad_out)
    # the eager layer's float32 chain on the same bfloat16 values is the reference
    out_ref, grads_ref = run(eager, x.float(), grad_out.float())
    assert out.dtype == grads[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads[1:])
    torch.testing.assert_close(out.float(), out_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[0].float(), grads_ref[0], rtol=2e-2, atol=2e-2)
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-3)


def test_saves_only_the_input_at_full_size():
    fused, eager = layer_pair("silu", 16, 4)
    x = torch.randn(4, 16, 10, 10, requires_grad=True)
    fused_sizes = saved_tensor_sizes(fused, x)
    eager_sizes = saved_tensor_sizes(eager, x)
    assert [s for s in fused_sizes if s >= x.numel()] == [x.numel()]  # x itself
    # the rest: (C,) vectors, (N, G) statistics and the shared (n,) quantile table; never
    # the (C, n) proxy, which at a small micro-batch would outweigh x itself
    assert max(s for s in fused_sizes if s < x.numel()) <= 200
    assert len([s for s in eager_sizes if s >= x.numel()]) >= 3  # what the op removes


def test_environment_switch_forces_the_eager_path(monkeypatch):
    layer, _ = layer_pair("relu", 8, 2)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    monkeypatch.setenv("PROXYNORM_FUSED", "0")
    assert ops.fused_op(x) is None
    assert len([s for s in saved_tensor_sizes(layer, x) if s >= x.numel()]) > 1
    monkeypatch.setenv("PROXYNORM_FUSED", "1")
    assert ops.fused_op(x) is cpu.group_norm_proxy_act
    assert ops.fused_op(x.half()) is None  # float16 is not a CPU op dtype


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path, caplog):
    """Not built and not buildable (an empty cache, no compiler): one line, the eager path."""
    monkeypatch.setenv("PROXYNORM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(cpu, "_loaded", None)
    layer, eager = layer_pair("gelu", 8, 2)
    x = torch.randn(2, 8, 4, 4)
    with caplog.at_level(logging.WARNING, logger="proxynorm.ops.cpu"):
        out = layer(x)
        layer(x)
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]  # one line, once
    assert "no C++ compiler 'no-such-compiler'" in caplog.records[0].getMessage()
    torch.testing.assert_close(out, eager(x))


def test_torch_compile_traces_through_the_fake_kernel():
    fused, eager = layer_pair("gelu", 8, 2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), fused)
    x = torch.randn(2, 3, 9, 9)
    # eager first: it fills the quantile cache, whose Python-float fill fullgraph cannot
    # trace, so the test does not depend on other tests having run before it
    expected = model(x)
    expected.sum().backward()
    grad = fused.proxy_weight.grad.clone()
    fused.proxy_weight.grad = None
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(fused.proxy_weight.grad, grad)


def test_op_rejects_bad_input_with_one_line():
    x = torch.randn(2, 6, 3, 3)
    vectors = [torch.ones(6)] * 4
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'; valid names"):
        cpu.group_norm_proxy_act(x, 3, *vectors, "tanh", 1e-5)
    with pytest.raises(RuntimeError, match="6 channels are not divisible by 4 groups"):
        cpu.group_norm_proxy_act(x, 4, *vectors, "relu", 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must be a \(6,\) Float tensor"):
        cpu.group_norm_proxy_act(x, 3, torch.ones(5), *vectors[1:], "relu", 1e-5)


def test_one_value_per_group_is_rejected_like_group_norm():
    layer, eager = layer_pair("relu", 4, 4)
    x = torch.randn(1, 4, 1, 1)
    for module in (layer, eager):
        with pytest.raises(ValueError, match="more than 1 value"):
            module(x)


def test_proxy_statistics_gradient_reaches_all_parameters():
    """The op takes proxy mean/rstd as inputs: their gradients must flow into the params."""
    layer, _ = layer_pair("silu", 8, 4)
    x = torch.randn(2, 8, 4, 4)
    layer(x).square().sum().backward()
    for p in (layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    mean, var = proxy_stats(layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias,
                            layer.act)
    assert mean.shape == var.shape == (8,)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_every_kernel_copy_matches_the_eager_layer(capability):
    """The library holds one kernel copy per instruction set and runs the one ATen picked
    (ATEN_CPU_CAPABILITY, read at start-up): check the copies this process does not run."""
    if capability.upper() == torch.backends.cpu.get_cpu_capability():
        pytest.skip("the other tests run this copy")
    script = """
import sys, torch
from test_fused_op import ACTS, SHAPES, check_fused_equals_eager
if torch.backends.cpu.get_cpu_capability() != {capability!r}.upper():
    sys.exit(77)  # this CPU lacks the instruction set
torch.manual_seed(0)
for act in ACTS:
    for shape, groups in SHAPES:
        check_fused_equals_eager(act, shape, groups)
""".format(capability=capability)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability,
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.path.dirname(__file__)]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    if result.returncode == 77:
        pytest.skip(f"this CPU cannot run the {capability} copy")
    assert result.returncode == 0, result.stderr[-3000:]


def test_proxy_norm_path_counts_the_layers_each_way():
    """What a run records: the layers the fused op takes, and those it cannot (an
    activation without a fused kernel, fused=False, a dtype the op lacks) on the eager path."""
    model = nn.Sequential(get_norm_act("group_pn", 8, act="relu", groups=2),
                          get_norm_act("group_pn", 8, act="hardswish", groups=2),
                          get_norm_act("layer_pn", 8, act="silu", fused=False),
                          get_norm_act("batch", 8))
    assert proxy_norm_path(model, "cpu") == "fused CPU op (1 layer), eager PyTorch (2 layers)"
    assert proxy_norm_path(model, "cpu", torch.float16) == "eager PyTorch (3 layers)"
    assert proxy_norm_path(nn.Sequential(get_norm_act("group", 8, groups=2)), "cpu") is None
