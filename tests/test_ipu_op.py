"""The IPU op (custom_ops/ipu): PopART GroupNormProxyAct against the CPU reference.

Tests marked ipu compile small PopTorch models on the IPU Model and compare the op's output
and the gradients of all five inputs (read from PopART's Gradient___<parameter> tensors)
with float64 autograd on CPU; conftest skips them where PopTorch is missing. The others run
anywhere: the Python side imports, reports its build and checks its arguments without
poptorch, and agrees with the Makefile on where the library is.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from custom_ops import ipu
from models import proxy
from models.activations import ACTS, get_act

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_DIR = os.path.join(REPO, "custom_ops", "ipu")
BUILT_LIBRARY = os.path.join(OP_DIR, "build", "libproxynorm_ipu.so")
INPUT_NAMES = ("x", "weight", "bias", "proxy_mean", "proxy_rstd")
ACT_FNS = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu, "identity": lambda t: t}


# --- anywhere: the Python side without poptorch -------------------------------------------

def test_imports_and_reports_its_build_without_poptorch():
    code = ("import sys; from custom_ops import ipu; "
            "assert 'poptorch' not in sys.modules, 'importing custom_ops.ipu imported poptorch'; "
            "print(ipu.is_built(), ipu.LIBRARY)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    built, library = result.stdout.split()
    assert library == ipu.LIBRARY == BUILT_LIBRARY
    assert built == str(os.path.isfile(BUILT_LIBRARY))


def test_missing_build_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(ipu, "LIBRARY", str(tmp_path / "libproxynorm_ipu.so"))
    monkeypatch.setattr(ipu, "_loaded", False)
    assert not ipu.is_built()
    with pytest.raises(RuntimeError) as info:
        ipu.load()
    message = str(info.value)
    assert "\n" not in message
    assert "make custom_ops" in message and "Poplar SDK" in message


def test_arguments_are_checked_before_poptorch_is_needed():
    x = torch.zeros(2, 6, 3)
    c = torch.zeros(6)
    with pytest.raises(ValueError, match="valid names: relu, silu, gelu, identity"):
        ipu.group_norm_proxy_act(x, 2, c, c, c, c, act="tanh")
    with pytest.raises(ValueError, match="groups=4 must divide the 6 channels"):
        ipu.group_norm_proxy_act(x, 4, c, c, c, c)
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        ipu.group_norm_proxy_act(torch.zeros(6), 1, c, c, c, c)


def test_op_knows_every_layer_activation():
    assert set(ipu.ACTS) == set(ACTS)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_writes_the_library_python_loads():
    env = {k: v for k, v in os.environ.items()
           if k not in ("CXX", "CXXFLAGS", "LDLIBS", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(["make", "-n", "-B", "-C", OP_DIR],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ipu.LIBRARY == BUILT_LIBRARY  # build/ under the Makefile's directory
    assert "-o build/libproxynorm_ipu.so" in result.stdout
    for flag in ("-std=c++14", "-fPIC", "-shared", "-DONNX_NAMESPACE=onnx", "-lpopart",
                 "-lpoplar", "-lpopops"):
        assert flag in result.stdout, flag


def test_layers_pick_the_ipu_op_while_poptorch_traces(monkeypatch, caplog):
    import types

    import custom_ops

    tracing = types.SimpleNamespace(isRunningOnIpu=lambda: True)
    monkeypatch.setitem(sys.modules, "poptorch", tracing)
    monkeypatch.setattr(custom_ops, "_warned_ipu", False)
    x = torch.zeros(2, 4, 3)
    monkeypatch.setattr(ipu, "is_built", lambda: False)
    with caplog.at_level("WARNING", logger="custom_ops"):
        assert custom_ops.fused_op(x) is None and custom_ops.fused_op(x) is None
    assert len(caplog.records) == 1 and "make custom_ops" in caplog.records[0].getMessage()
    monkeypatch.setattr(ipu, "is_built", lambda: True)
    assert custom_ops.fused_op(x) is ipu.group_norm_proxy_act
    monkeypatch.setenv("PROXYNORM_FUSED", "0")
    assert custom_ops.fused_op(x) is None
    tracing.isRunningOnIpu = lambda: False  # PopTorch imported, running on the CPU
    monkeypatch.setenv("PROXYNORM_FUSED", "1")
    assert custom_ops.fused_op(x) is not ipu.group_norm_proxy_act


# --- the reference ------------------------------------------------------------------------

def eager(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps):
    """The op's definition, written independently of models.proxy."""
    channel = (1, -1) + (1,) * (x.dim() - 2)
    xg = x.reshape(x.shape[0], groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    z = ACT_FNS[act](weight.view(channel) * y + bias.view(channel))
    return (z - proxy_mean.view(channel)) * proxy_rstd.view(channel)


def reference(inputs, probe, fn):
    """fn(*inputs) and the gradients of (fn * probe).sum() for each input, in float64."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * probe.double()).sum(), leaves)
    return out.detach(), grads


def make_inputs(shape):
    c = shape[1]
    return [1.5 * torch.randn(shape) + 0.5,     # x
            1.0 + 0.3 * torch.randn(c),         # weight
            0.2 * torch.randn(c),               # bias
            0.3 * torch.randn(c),               # proxy_mean
            1.0 + 0.2 * torch.rand(c)]          # proxy_rstd


def assert_close(actual, expected, name, rtol=1e-4):
    """Relative tolerance, with the tensor's largest magnitude as the scale near zero."""
    expected = expected.to(torch.float32)
    scale = max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.to(torch.float32), expected, rtol=rtol,
                               atol=rtol * scale, msg=lambda m: f"{name}: {m}")


# --- on the IPU Model ---------------------------------------------------------------------

class FiveInputs(torch.nn.Module):
    """The op with its five inputs as parameters, so PopART computes a gradient for each."""

    def __init__(self, inputs, groups, act, eps):
        super().__init__()
        for name, t in zip(INPUT_NAMES, inputs):
            setattr(self, name, torch.nn.Parameter(t.clone()))
        self.groups, self.act, self.eps = groups, act, eps

    def forward(self, probe):
        import poptorch

        out = ipu.group_norm_proxy_act(self.x, self.groups, self.weight, self.bias,
                                       self.proxy_mean, self.proxy_rstd, self.act, self.eps)
        return out, poptorch.identity_loss((out * probe).sum(), reduction="none")


class ProxyNormLayer(torch.nn.Module):
    """The intended use: proxy statistics traced in PyTorch, the rest in the op."""

    def __init__(self, x, groups, act, eps):
        super().__init__()
        c = x.shape[1]
        self.x = torch.nn.Parameter(x.clone())
        self.weight = torch.nn.Parameter(1.0 + 0.3 * torch.randn(c))
        self.bias = torch.nn.Parameter(0.2 * torch.randn(c))
        self.proxy_weight = torch.nn.Parameter(0.2 * torch.randn(c))
        self.proxy_bias = torch.nn.Parameter(0.2 * torch.randn(c))
        self.groups, self.act, self.eps = groups, act, eps

    def forward(self, probe):
        import poptorch

        mean, var = proxy.proxy_stats(self.weight, self.bias, self.proxy_weight,
                                      self.proxy_bias, get_act(self.act))
        out = ipu.group_norm_proxy_act(self.x, self.groups, self.weight, self.bias, mean,
                                       torch.rsqrt(var + proxy.PROXY_EPS), self.act, self.eps)
        return out, poptorch.identity_loss((out * probe).sum(), reduction="none")


def ipu_model_options(poptorch):
    opts = poptorch.Options()
    opts.useIpuModel(True)
    return opts


def train_once(model, probe, names):
    """One training step on the IPU Model: the output and PopART's gradient of each name."""
    import poptorch

    ipu.load()  # a missing build fails here, with the one-line reason
    opts = ipu_model_options(poptorch)
    for name in names:
        opts.anchorTensor("grad_" + name, "Gradient___" + name)
    training = poptorch.trainingModel(model, options=opts)
    try:
        out, _ = training(probe)
        grads = []
        for name in names:
            try:
                grads.append(training.getAnchoredTensor("grad_" + name))
            except AssertionError as error:
                known = [t for t in training.getTensorNames() if t.startswith("Gradient___")]
                raise AssertionError(f"no gradient anchored for {name}; PopART has {known}") \
                    from error
    finally:
        training.destroy()
    return out, grads


@pytest.mark.ipu
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("act", list(ipu.ACTS))
def test_forward_and_five_gradients_match_cpu(act, groups):
    shape, eps = (2, 8, 5, 3), 1e-5
    inputs, probe = make_inputs(shape), torch.randn(shape)
    out, grads = train_once(FiveInputs(inputs, groups, act, eps), probe, INPUT_NAMES)
    expected, expected_grads = reference(
        inputs, probe, lambda *t: eager(t[0], groups, *t[1:], act, eps))
    assert_close(out, expected, "out")
    for name, grad, expected_grad in zip(INPUT_NAMES, grads, expected_grads):
        assert_close(grad, expected_grad, "grad_" + name)


@pytest.mark.ipu
@pytest.mark.parametrize("shape, groups, act", [
    ((3, 6, 7), 2, "silu"),          # 1-D spatial
    ((1, 4, 2, 3, 3), 2, "gelu"),    # 3-D spatial, one sample
    ((4, 12), 2, "relu"),            # no spatial dimensions (groups of 2 would leave
                                     # grad_x pure float32 cancellation noise)
])
def test_other_ranks_match_cpu(shape, groups, act):
    eps = 1e-3
    inputs, probe = make_inputs(shape), torch.randn(shape)
    out, grads = train_once(FiveInputs(inputs, groups, act, eps), probe, INPUT_NAMES)
    expected, expected_grads = reference(
        inputs, probe, lambda *t: eager(t[0], groups, *t[1:], act, eps))
    assert_close(out, expected, "out")
    for name, grad, expected_grad in zip(INPUT_NAMES, grads, expected_grads):
        assert_close(grad, expected_grad, "grad_" + name)


@pytest.mark.ipu
@pytest.mark.parametrize("act", list(ipu.ACTS))
def test_with_proxy_stats_matches_proxy_norm_act(act):
    shape, groups, eps = (2, 8, 4, 4), 4, 1e-5
    x, probe = 1.5 * torch.randn(shape) + 0.5, torch.randn(shape)
    layer = ProxyNormLayer(x, groups, act, eps)
    names = ("x", "weight", "bias", "proxy_weight", "proxy_bias")
    params = [getattr(layer, name).detach().clone() for name in names]
    out, grads = train_once(layer, probe, names)
    expected, expected_grads = reference(
        params, probe,
        lambda x, w, b, pw, pb: proxy.proxy_norm_act(x, groups, w, b, pw, pb, get_act(act), eps))
    assert_close(out, expected, "out")
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert_close(grad, expected_grad, "grad_" + name)


@pytest.mark.ipu
def test_float16_forward_matches_cpu():
    import poptorch

    ipu.load()
    shape, groups, act, eps = (2, 8, 5, 3), 4, "silu", 1e-5
    inputs = make_inputs(shape)
    x = inputs[0].half()

    class Forward(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in zip(INPUT_NAMES[1:], inputs[1:]):
                self.register_buffer(name, t.clone())

        def forward(self, x):
            return ipu.group_norm_proxy_act(x, groups, self.weight, self.bias,
                                            self.proxy_mean, self.proxy_rstd, act, eps)

    model = poptorch.inferenceModel(Forward(), options=ipu_model_options(poptorch))
    try:
        out = model(x)
    finally:
        model.destroy()
    assert out.dtype == torch.float16
    expected = eager(x.double(), groups, *(t.double() for t in inputs[1:]), act, eps)
    assert_close(out, expected, "out", rtol=1e-2)
