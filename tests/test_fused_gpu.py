"""The fused GPU op (proxynorm/ops/gpu.py, Triton kernels) against the eager expression, the CPU
op and an independent float64 formula.

On a GPU host the kernels run compiled on CUDA tensors. Elsewhere the tests that take
`device` run in a child pytest on CPU tensors in Triton's interpreter, which runs the same
kernel code program by program (slowly: shapes stay small).
"""
import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.dispatches import counting
from proxynorm import ops
from proxynorm.ops import cpu, gpu
from proxynorm.activations import get_act
from proxynorm.norms import get_norm_act
from proxynorm.proxy import PROXY_EPS, proxy_quantiles, proxy_stats
from test_norms import ACT_FORMULAS, randomise

pytest.importorskip("triton", minversion="3.0")

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE = os.path.relpath(os.path.abspath(__file__), ROOT)
ACTS = ["relu", "silu", "gelu", "identity"]
SHAPES = [  # (shape, groups)
    ((2, 8, 7, 7), 4),  # 7 x 7, groups a divisor of C
    ((1, 12, 5, 7), 3),  # N = 1, odd sizes
    ((3, 10, 1, 1), 2),  # 1 x 1
    ((2, 8, 6, 5), 1),  # G = 1: LayerNorm
    ((2, 6, 4, 3), 6),  # G = C: InstanceNorm
    ((2, 8, 37), 4),  # 1-D spatial
    ((2, 4, 3, 5, 2), 2),  # 3-D spatial
    ((1, 4, 45, 50), 1),  # several chunks per group, rows longer than a tile
]

if INTERPRETER or torch.cuda.is_available():  # kernels of the tests' own, where kernels run
    import triton
    import triton.language as tl

    from proxynorm.ops import gpu_kernels

    @triton.jit
    def chunk_start_kernel(out_ptr, chunk, chunks_per_group, BLOCK: tl.constexpr):
        ng, start = gpu_kernels.chunk_start(chunk, chunks_per_group, BLOCK)
        tl.store(out_ptr, ng)
        tl.store(out_ptr + 1, start)


@pytest.fixture
def device():
    """Where the kernels run in this process. Triton's interpreter must be chosen before
    Triton is first imported (its own tl.sum, tl.sigmoid are kernels decorated then), so
    without a GPU these tests run in a child process started with TRITON_INTERPRET=1
    (test_kernels_in_triton_interpreter); no other test ever sees the variable."""
    if INTERPRETER:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no GPU: runs in a child process under Triton's interpreter")


def random_vectors(channels, device):
    """weight, bias, proxy_mean, proxy_rstd as a trained layer has them."""
    return [(torch.randn(channels) * scale + offset).to(device).requires_grad_()
            for scale, offset in ((0.5, 1.0), (0.5, 0.0), (0.3, 0.0), (0.2, 1.0))]


def op_and_grads(op, x, groups, vectors, act, grad_out):
    x = x.detach().clone().requires_grad_()
    out = op(x, groups, *vectors, act, 1e-5)
    return out, torch.autograd.grad(out, [x, *vectors], grad_out)


def eager_op(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps):
    """The op from the eager path's building blocks (F.group_norm, torch.nn's activation)."""
    channel = (1, -1) + (1,) * (x.dim() - 2)
    z = get_act(act)(F.group_norm(x.float(), groups, weight, bias, eps))
    return ((z - proxy_mean.view(channel)) * proxy_rstd.view(channel)).to(x.dtype)


def formula64(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps):
    """The op written out in float64: population variance, eps inside the square root."""
    x, weight, bias, proxy_mean, proxy_rstd = (
        t.cpu().double() for t in (x, weight, bias, proxy_mean, proxy_rstd))
    channel = (1, -1) + (1,) * (x.dim() - 2)
    xs = x.reshape(x.shape[0], groups, -1)
    mu = xs.mean(-1, keepdim=True)
    y = ((xs - mu) / torch.sqrt(((xs - mu) ** 2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    z = ACT_FORMULAS[act](weight.view(channel) * y + bias.view(channel))
    return (z - proxy_mean.view(channel)) * proxy_rstd.view(channel)


def assert_grads_close(grads, expected, rtol, atol):
    """grad_x, then the four vectors' gradients relative to the largest of them (identity's
    bias gradient is 0 up to the rounding of sums over N x H x W terms)."""
    torch.testing.assert_close(grads[0].cpu().double(), expected[0].cpu().double(), rtol=rtol,
                               atol=atol)
    scale = max(g.abs().max() for g in expected[1:]).cpu().double()
    for name, g, g_ref in zip(["weight", "bias", "proxy_mean", "proxy_rstd"], grads[1:],
                              expected[1:]):
        torch.testing.assert_close(g.cpu().double() / scale, g_ref.cpu().double() / scale,
                                   rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def check_against_eager(act, shape, groups, device):
    vectors = random_vectors(shape[1], device)
    x = (torch.randn(shape) * 2 + 0.5).to(device)
    grad_out = torch.randn(shape).to(device)
    out, grads = op_and_grads(gpu.group_norm_proxy_act, x, groups, vectors, act, grad_out)
    expected, expected_grads = op_and_grads(eager_op, x, groups, vectors, act, grad_out)
    assert out.dtype == x.dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-5, atol=1e-5)
    return x, vectors, grad_out, out, grads


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_op_equals_eager_expression_and_cpu_op(act, shape, groups, device):
    x, vectors, grad_out, out, grads = check_against_eager(act, shape, groups, device)
    if cpu.load():
        on_cpu = [v.detach().cpu().requires_grad_() for v in vectors]
        cpu_out, cpu_grads = op_and_grads(cpu.group_norm_proxy_act, x.cpu(), groups, on_cpu,
                                          act, grad_out.cpu())
        torch.testing.assert_close(out.cpu(), cpu_out, rtol=1e-5, atol=1e-5)
        assert_grads_close(grads, cpu_grads, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,groups", [SHAPES[1], SHAPES[4], SHAPES[6]])
def test_op_equals_float64_formula(act, shape, groups, device):
    vectors = random_vectors(shape[1], device)
    x = (torch.randn(shape) * 2 + 0.5).to(device)
    grad_out = torch.randn(shape).to(device)
    out, grads = op_and_grads(gpu.group_norm_proxy_act, x, groups, vectors, act, grad_out)
    vectors64 = [v.detach().cpu().double().requires_grad_() for v in vectors]
    expected, expected_grads = op_and_grads(formula64, x.cpu().double(), groups, vectors64, act,
                                            grad_out.cpu().double())
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-4, atol=1e-5)


def test_small_blocks_take_the_loops_and_tiles(monkeypatch, device):
    """Tiny programs: many chunks per group, group statistics combined in several loop
    steps, rows split over tile columns; the paths large inputs take on a GPU."""
    monkeypatch.setattr(gpu, "MAX_BLOCK", 4)
    check_against_eager("silu", (2, 4, 3, 7), 2, device)


@pytest.mark.parametrize("act", ["relu", "identity"])
def test_large_mean_stays_accurate(act, device):
    """x = 1000 + noise: E[x^2] - E[x]^2 in float32 would lose the variance (1e6 * 1e-7);
    centring first keeps the error at float32's resolution of x itself (6e-5 at 1000)."""
    vectors = random_vectors(8, device)
    x = (1000 + torch.randn(2, 8, 6, 6)).to(device)
    grad_out = torch.randn(x.shape).to(device)
    out, grads = op_and_grads(gpu.group_norm_proxy_act, x, 4, vectors, act, grad_out)
    vectors64 = [v.detach().cpu().double().requires_grad_() for v in vectors]
    expected, expected_grads = op_and_grads(formula64, x.cpu().double(), 4, vectors64, act,
                                            grad_out.cpu().double())
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=1e-3)
    assert_grads_close(grads, expected_grads, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_accumulates_in_float32(dtype, device):
    vectors = random_vectors(16, device)
    x = (torch.randn(2, 16, 9, 9) * 3 + 2).to(device, dtype)
    grad_out = torch.randn(x.shape).to(device, dtype)
    out, grads = op_and_grads(gpu.group_norm_proxy_act, x, 4, vectors, "silu", grad_out)
    # the float32 op on the same half-precision values is the reference
    expected, expected_grads = op_and_grads(gpu.group_norm_proxy_act, x.float(), 4, vectors,
                                            "silu", grad_out.float())
    assert out.dtype == grads[0].dtype == dtype
    assert all(g.dtype == torch.float32 for g in grads[1:])
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[0].float(), expected_grads[0], rtol=2e-2, atol=2e-2)
    for g, g_ref in zip(grads[1:], expected_grads[1:]):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_any_memory_layout(layout, device):
    vectors = random_vectors(8, device)
    x = (torch.randn(3, 8, 6, 5).to(memory_format=torch.channels_last) if layout == "channels_last"
         else torch.randn(3, 8, 5, 6).transpose(2, 3)).to(device)
    assert not x.is_contiguous()
    grad_out = torch.randn(x.shape).to(device).to(memory_format=torch.channels_last)
    xg = x.detach().clone().requires_grad_()
    with counting() as counts:
        out = gpu.group_norm_proxy_act(xg, 4, *vectors, "gelu", 1e-5)
        grads = torch.autograd.grad(out, [xg, *vectors], grad_out)
    expected, expected_grads = op_and_grads(eager_op, x, 4, vectors, "gelu", grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-5, atol=1e-5)
    copies = {k: v for k, v in counts.items() if k.startswith("aten.")}
    if layout == "channels_last":  # read and written in place: no transposing copy
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)
        assert copies == {}
    else:  # x and the channels_last grad_out copied to NCHW
        assert out.is_contiguous() and grads[0].is_contiguous()
        assert copies == {"aten.clone": 2}


@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 6), 4), ((2, 6, 3, 4, 2), 1),
                                          ((1, 12, 7, 7), 12)])
def test_channels_last_equals_nchw_and_float64(shape, groups, device):
    """channels_last (and channels_last_3d) in and out, bit for bit the NCHW op's numbers
    up to rounding, against the float64 formula; a contiguous grad_out is taken too."""
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    vectors = random_vectors(shape[1], device)
    x = (torch.randn(shape) * 2 + 0.5).to(device)
    grad_out = torch.randn(shape).to(device)
    out, grads = op_and_grads(gpu.group_norm_proxy_act, x.to(memory_format=fmt), groups,
                              vectors, "silu", grad_out)
    assert out.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    nchw, nchw_grads = op_and_grads(gpu.group_norm_proxy_act, x, groups, vectors, "silu",
                                    grad_out)
    torch.testing.assert_close(out, nchw, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, nchw_grads, rtol=1e-5, atol=1e-5)
    vectors64 = [v.detach().cpu().double().requires_grad_() for v in vectors]
    expected, expected_grads = op_and_grads(formula64, x.cpu().double(), groups, vectors64,
                                            "silu", grad_out.cpu().double())
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-4, atol=1e-5)


def saved_tensor_sizes(fn):
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sizes


@pytest.mark.parametrize("contiguous", [True, False])
def test_saves_only_the_input_at_full_size(contiguous, device):
    vectors = random_vectors(16, device)
    x = torch.randn(2, 16, 6, 6, device=device)
    x = (x if contiguous else x.transpose(2, 3)).requires_grad_()
    sizes = saved_tensor_sizes(lambda: gpu.group_norm_proxy_act(x, 4, *vectors, "silu", 1e-5))
    assert [s for s in sizes if s >= x.numel()] == [x.numel()]  # x (a contiguous copy of it)
    assert sorted(s for s in sizes if s < x.numel()) == [2 * 4] * 2 + [16] * 4  # stats, vectors


def test_gradients_are_deterministic(device):
    """Sums over samples are torch reductions of per-(sample, channel) sums, not atomics."""
    vectors = random_vectors(8, device)
    x = torch.randn(4, 8, 9, 9, device=device)
    grad_out = torch.randn(x.shape, device=device)
    first = op_and_grads(gpu.group_norm_proxy_act, x, 2, vectors, "gelu", grad_out)[1]
    second = op_and_grads(gpu.group_norm_proxy_act, x, 2, vectors, "gelu", grad_out)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("name,groups", [("group_pn", 4), ("layer_pn", 1)])
def test_layer_through_the_gpu_op_equals_eager_layer(act, name, groups, monkeypatch, device):
    """A GroupNormProxyAct layer end to end on the GPU op: fused_op hands it this op for a
    CUDA input; here the test hands it over, so that it also runs on CPU tensors under the
    interpreter. The proxy statistics are gpu.proxy_stats, which fused_proxy_stats gives
    beside it."""
    calls = []

    def gpu_op(x):
        calls.append(tuple(x.shape))
        return gpu.group_norm_proxy_act

    fused = randomise(get_norm_act(name, 8, act=act, groups=groups)).to(device)
    eager = get_norm_act(name, 8, act=act, groups=groups, fused=False).to(device)
    eager.load_state_dict(fused.state_dict())
    monkeypatch.setattr(ops, "fused_op", gpu_op)
    x = (torch.randn(2, 8, 5, 6) * 2 + 0.5).to(device)
    grad_out = torch.randn(x.shape, device=device)
    results = []
    for layer in (fused, eager):
        xg = x.clone().requires_grad_()
        out = layer(xg)
        params = [layer.weight, layer.bias, layer.proxy_weight, layer.proxy_bias]
        results.append((out, torch.autograd.grad(out, [xg, *params], grad_out)))
    assert calls == [x.shape]
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-5, atol=1e-5)
    scale = max(g.abs().max() for g in expected_grads[1:])
    for g, g_ref in zip(grads[1:], expected_grads[1:]):
        assert g.abs().sum() > 0  # through the proxy statistics into all four parameters
        torch.testing.assert_close(g / scale, g_ref / scale, rtol=1e-5, atol=1e-6)


def test_fused_op_picks_the_gpu_op_for_cuda_inputs(monkeypatch):
    """The choice on a GPU host, minus the GPU: torch.cuda.is_available() is made True and
    the CUDA inputs are fake tensors (metadata only) on an H100 (compute capability 9.0);
    Triton is really imported."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(gpu, "_device_supported", {})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with FakeTensorMode():
        x = torch.empty(2, 8, 4, 4, device="cuda")
        half, bfloat16, double = (x.to(t) for t in (torch.float16, torch.bfloat16, torch.float64))
    for tensor in (x, half, bfloat16):
        assert ops.fused_op(tensor) is gpu.group_norm_proxy_act
    assert ops.fused_op(double) is None  # float64 stays on the eager path
    assert ops.fused_proxy_stats(gpu.group_norm_proxy_act) is gpu.proxy_stats
    assert ops.fused_op(torch.randn(2, 8, 4, 4)) is not gpu.group_norm_proxy_act
    monkeypatch.setattr(gpu, "compiling", lambda: True)  # Inductor fuses the eager maths
    assert ops.fused_op(x) is None
    monkeypatch.setattr(gpu, "compiling", lambda: False)
    monkeypatch.setenv("PROXYNORM_FUSED", "0")
    assert ops.fused_op(x) is None


@pytest.mark.skipif(INTERPRETER or torch.cuda.is_available(),
                    reason="the kernel tests run in this process")
def test_kernels_in_triton_interpreter():
    """Every test that takes `device`, in a child pytest on CPU tensors."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", FILE]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and " passed" in summary, (
        result.stdout + result.stderr)[-6000:]


def test_without_triton_the_gpu_op_is_unavailable_with_one_warning(monkeypatch, caplog):
    """A GPU host without Triton: the module imports afresh, says so in one line, once,
    and fused_op leaves the layer on the eager path."""
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now fails
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delitem(sys.modules, "proxynorm.ops.gpu")
    monkeypatch.setattr(ops, "gpu", ops.gpu)  # restored after the test
    fresh = importlib.import_module("proxynorm.ops.gpu")
    assert fresh is not gpu and ops.gpu is fresh
    with FakeTensorMode():
        x = torch.empty(2, 8, 4, 4, device="cuda")
    with caplog.at_level(logging.WARNING, logger="proxynorm.ops.gpu"):
        assert not fresh.available() and not fresh.available()
        assert ops.fused_op(x) is None
    assert [r.getMessage() for r in caplog.records] == [
        "the fused Proxy Norm GPU op is not available (Triton is not installed); using the "
        "eager path"]


def test_op_rejects_bad_input_with_one_line(device):
    x = torch.randn(2, 6, 3, 3, device=device)
    vectors = [torch.ones(6, device=device)] * 4
    with pytest.raises(ValueError, match="unknown activation 'tanh'; valid names"):
        gpu.group_norm_proxy_act(x, 3, *vectors, "tanh", 1e-5)
    with pytest.raises(ValueError, match="6 channels are not divisible by 4 groups"):
        gpu.group_norm_proxy_act(x, 4, *vectors, "relu", 1e-5)
    with pytest.raises(ValueError, match=r"bias must be a \(6,\) float32 tensor"):
        gpu.group_norm_proxy_act(x, 3, vectors[0], vectors[1].double(), *vectors[2:], "relu",
                                 1e-5)
    with pytest.raises(ValueError, match="x must be a float32, bfloat16 or float16"):
        gpu.group_norm_proxy_act(x.double(), 3, *vectors, "relu", 1e-5)


def test_empty_batch(device):
    vectors = random_vectors(6, device)
    x = torch.randn(0, 6, 3, 3, device=device, requires_grad=True)
    out = gpu.group_norm_proxy_act(x, 3, *vectors, "relu", 1e-5)
    assert out.shape == x.shape
    grads = torch.autograd.grad(out, [x, *vectors], torch.ones_like(out))
    assert grads[0].shape == x.shape
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


def test_strided_vectors_are_read_by_their_strides(device):
    """Every other value of a longer vector (a view with stride 2): read as contiguous it
    would take its neighbours' values."""
    bases = [torch.cat([v.detach(), -v.detach() + 3]).view(2, -1).t().reshape(-1)
             .requires_grad_() for v in random_vectors(8, device)]
    vectors = [b[::2] for b in bases]
    assert not vectors[0].is_contiguous()
    x = (torch.randn(2, 8, 5, 6) * 2 + 0.5).to(device)
    grad_out = torch.randn(x.shape, device=device)
    results = []
    for op in (gpu.group_norm_proxy_act, eager_op):
        xg = x.clone().requires_grad_()
        out = op(xg, 4, *vectors, "silu", 1e-5)
        results.append((out, torch.autograd.grad(out, [xg, *bases], grad_out)))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, expected_grads, rtol=1e-5, atol=1e-5)
    assert all(torch.all(g[1::2] == 0) for g in grads[1:])  # the values between: untouched


@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_grad_x_only_when_x_needs_it(x_needs_grad, device):
    """A network's first layer: its input needs no gradient, so no grad_x kernel runs,
    and the vectors' gradients are the same as with it."""
    vectors = random_vectors(8, device)
    x = (torch.randn(2, 8, 5, 6) * 2 + 0.5).to(device).requires_grad_(x_needs_grad)
    grad_out = torch.randn(x.shape, device=device)
    inputs = ([x] if x_needs_grad else []) + vectors
    with counting() as counts:
        grads = torch.autograd.grad(gpu.group_norm_proxy_act(x, 4, *vectors, "gelu", 1e-5),
                                    inputs, grad_out)
    expected = torch.autograd.grad(eager_op(x, 4, *vectors, "gelu", 1e-5), inputs, grad_out)
    launched = {name for name, _ in counts.grids}
    assert ("grad_x_kernel" in launched) == x_needs_grad
    assert "row_sums_kernel" in launched
    for g, g_ref in zip(grads, expected):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_in_group_offsets_are_64_bit(device):
    """A chunk's first value within its group, past 2^31 (a group of 2^32 values, as
    LayerNorm of a large 3-D input has): in 32 bits it would wrap to a negative offset."""
    out = torch.zeros(2, dtype=torch.int64, device=device)
    chunks_per_group, block = 2 ** 22, 1024
    chunk = 3 * chunks_per_group + 2 ** 21 + 5  # sample-group 3, value 2^31 + 5120 in it
    chunk_start_kernel[(1,)](out, chunk, chunks_per_group, BLOCK=block)
    assert out.tolist() == [3, (2 ** 21 + 5) * block]


def test_every_launch_puts_its_programs_on_grid_axis_0(monkeypatch, device):
    """CUDA allows 2^31 - 1 programs on axis 0 but 65,535 on axes 1 and 2 (the interpreter
    enforces neither): a long row's tiles on axis 1 would stop launching past 67M
    positions per channel. Small blocks make many tiles per row here."""
    monkeypatch.setattr(gpu, "MAX_BLOCK", 4)
    with counting() as counts:
        check_against_eager("relu", (2, 4, 3, 7), 2, device)
    assert {name for name, _ in counts.grids} >= {"row_sums_kernel", "grad_x_kernel"}
    assert all(len(grid) == 1 for _, grid in counts.grids), counts.grids


@pytest.mark.parametrize("capability,supported", [((7, 0), False), ((8, 0), True)])
def test_gpu_triton_cannot_target_takes_the_eager_path_with_one_warning(
        capability, supported, monkeypatch, caplog):
    """A Volta GPU: Triton would fail in the first compile, inside a training step; the
    layer takes the eager path instead and says why in one line, once."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(gpu, "_device_supported", {})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with FakeTensorMode():
        x = torch.empty(2, 8, 4, 4, device="cuda")
    with caplog.at_level(logging.WARNING, logger="proxynorm.ops.gpu"):
        picked = [ops.fused_op(x), ops.fused_op(x)]
    assert picked == [gpu.group_norm_proxy_act if supported else None] * 2
    assert [r.getMessage() for r in caplog.records] == ([] if supported else [
        "the fused Proxy Norm GPU op is not available (cuda:0 has compute capability 7.0, "
        "Triton needs 8.0 or newer); using the eager path"])


def eager_proxy_stats(weight, bias, proxy_weight, proxy_bias, act, dtype):
    """proxynorm.proxy.proxy_stats (the eager path's), in dtype, as (mean, rstd)."""
    params = [p.cpu().to(dtype) for p in (weight, bias, proxy_weight, proxy_bias)]
    mean, var = proxy_stats(*params, get_act(act))
    return mean, torch.rsqrt(var + PROXY_EPS)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels", [1, 12])
def test_proxy_stats_equal_the_eager_ones_in_float32_and_float64(act, channels, device):
    """gpu.proxy_stats against proxynorm/proxy.py's expression, forward and backward, in
    float32 (the eager path) and float64 (the reference)."""
    params = [(torch.randn(channels) * scale + offset).to(device).requires_grad_()
              for scale, offset in ((0.5, 1.0), (0.5, 0.0), (0.3, 0.0), (0.3, 0.0))]
    grads_out = [torch.randn(channels, device=device) for _ in range(2)]
    quantiles = proxy_quantiles(200, device, torch.float32)
    stats = gpu.proxy_stats(*params, quantiles, act, PROXY_EPS)
    grads = torch.autograd.grad(stats, params, grads_out)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-5)):
        leaves = [p.detach().cpu().to(dtype).requires_grad_() for p in params]
        expected = eager_proxy_stats(*leaves, act, dtype)
        expected_grads = torch.autograd.grad(expected, leaves,
                                             [g.cpu().to(dtype) for g in grads_out])
        for got, want in zip(stats, expected):
            torch.testing.assert_close(got.cpu().to(dtype), want, rtol=tol, atol=tol)
        scale = max(g.abs().max() for g in expected_grads)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got.cpu().to(dtype) / scale, want / scale, rtol=tol,
                                       atol=tol)


def test_proxy_stats_gradient_of_one_output_alone(device):
    """Only the mean used: autograd hands the backward no rstd gradient."""
    params = [(torch.randn(6) * 0.5 + 1).to(device).requires_grad_() for _ in range(4)]
    quantiles = proxy_quantiles(200, device, torch.float32)
    mean, _ = gpu.proxy_stats(*params, quantiles, "gelu", PROXY_EPS)
    grads = torch.autograd.grad(mean.sum(), params)
    leaves = [p.detach().cpu().requires_grad_() for p in params]
    expected = torch.autograd.grad(eager_proxy_stats(*leaves, "gelu", torch.float32)[0].sum(),
                                   leaves)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


MAX_STEP_DISPATCHES = 16  # the goal for a layer's training step on the GPU path
BEFORE_STEP_DISPATCHES = 65  # the count of the op this replaced (eager proxy statistics,
# torch glue between the kernels): 15 forward, 50 backward


@pytest.mark.parametrize("name,groups,act", [("group_pn", 4, "relu"), ("layer_pn", 1, "silu")])
def test_layer_step_dispatches(name, groups, act, monkeypatch, device):
    """One training step of a layer on the GPU path (forward, backward of the output into
    x and the four parameters), counted as benchmarks.dispatches counts it: aten ops that
    are neither views nor allocations, plus Triton launches. Each is a launch on a GPU,
    which is what a small micro-batch waits for. BatchNorm + ReLU makes 5."""
    monkeypatch.setattr(ops, "fused_op", lambda x: gpu.group_norm_proxy_act)
    layer = randomise(get_norm_act(name, 8, act=act, groups=groups)).to(device)
    x = torch.randn(2, 8, 5, 6, device=device)
    grad_out = torch.randn(x.shape, device=device)
    layer(x)  # the quantile table is made and cached on first use
    from benchmarks.dispatches import forward_backward_dispatches
    forward, backward = forward_backward_dispatches(layer, x, grad_out)
    assert dict(forward) == {"triton.proxy_stats_kernel": 1, "triton.chunk_moments_kernel": 1,
                             "triton.group_moments_kernel": 1, "triton.forward_kernel": 1}
    # autograd adds the two gradients of weight and of bias: the op's and the statistics'
    assert dict(backward) == {"triton.row_sums_kernel": 1, "triton.backward_sums_kernel": 1,
                              "triton.grad_x_kernel": 1,
                              "triton.proxy_stats_backward_kernel": 1, "aten.add": 2}
    total = sum(forward.values()) + sum(backward.values())
    assert total <= MAX_STEP_DISPATCHES < BEFORE_STEP_DISPATCHES
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_dispatch_counter_counts_what_runs(device):
    """The counter itself: BatchNorm + ReLU's step is its 5 aten ops (the running-stat
    update included), views and allocations are not counted, kernels are."""
    from benchmarks.dispatches import counting, forward_backward_dispatches
    layer = get_norm_act("batch", 8).to(device).train()
    x = torch.randn(2, 8, 5, 6, device=device)
    forward, backward = forward_backward_dispatches(layer, x, torch.randn(x.shape, device=device))
    assert sum(forward.values()) + sum(backward.values()) == 5
    with counting() as counts:
        x.view(-1).t()
        torch.empty(3, device=device)
        x.transpose(2, 3).contiguous()
    assert dict(counts) == {"aten.clone": 1}
