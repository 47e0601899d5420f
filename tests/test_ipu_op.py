"""The IPU ops (proxynorm/ops/ipu): PopART GroupNormProxyAct against the CPU reference, and
ReplicaAllReduceSum with SyncBatchNormAct's IPU code path.

Tests marked ipu compile small PopTorch models on the IPU Model and compare the op's output
and the gradients of all five inputs (read from PopART's Gradient___<parameter> tensors)
with float64 autograd on CPU; conftest skips them where PopTorch is missing. Tests marked
ipu_hardware need two IPUs (the IPU Model does not replicate). The others run anywhere: the
Python side imports, reports its build and checks its arguments without poptorch, agrees
with the Makefile on where the library is, and SyncBatchNormAct's IPU code path runs on
CPU threads standing in for replicas, with an emulated all-reduce, against float64
BatchNorm over each group's concatenated batch.
"""
import copy
import os
import re
import shutil
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from proxynorm import ops
from proxynorm.ops import ipu
from proxynorm import proxy
from proxynorm.activations import ACTS, FUSED_ACTS, get_act
from proxynorm.norms import SyncBatchNormAct
from tests.test_ipu_engine import Recorder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP_DIR = os.path.join(REPO, "proxynorm", "ops", "ipu")
BUILT_LIBRARY = os.path.join(OP_DIR, "build", "libproxynorm_ipu.so")
INPUT_NAMES = ("x", "weight", "bias", "proxy_mean", "proxy_rstd")
ACT_FNS = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu, "identity": lambda t: t}


# --- anywhere: the Python side without poptorch -------------------------------------------

def test_imports_and_reports_its_build_without_poptorch():
    code = ("import sys; from proxynorm.ops import ipu; "
            "assert 'poptorch' not in sys.modules, 'importing ops.ipu imported poptorch'; "
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


@pytest.mark.parametrize("group_size", [-1, 1.5, True, "2", None])
def test_all_reduce_group_size_is_checked_before_poptorch_is_needed(group_size):
    with pytest.raises(ValueError) as error:
        ipu.replica_all_reduce_sum(torch.zeros(3, 4), group_size)
    assert str(error.value) == (f"group_size must be an int >= 0 (0 = all replicas), got "
                                f"{group_size!r}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int32])
def test_all_reduce_dtype_is_checked_before_poptorch_is_needed(dtype):
    with pytest.raises(ValueError) as error:
        ipu.replica_all_reduce_sum(torch.zeros(3, 4, dtype=dtype), 2)
    assert str(error.value) == f"replica_all_reduce_sum takes float32 or float16, got {dtype}"


def custom_op_stand_in(monkeypatch):
    """poptorch as the ops see it while PopTorch traces: the API-checked stand-in of
    tests/test_ipu_engine.py (a call must bind to poptorch.custom_op's parameters)."""
    stand_in = Recorder(fakes={"custom_op": lambda *args, **kwargs: ["out"]})
    monkeypatch.setitem(sys.modules, "poptorch", stand_in)
    monkeypatch.setattr(ipu, "load", lambda: ipu.LIBRARY)
    return stand_in


def test_all_reduce_is_a_custom_op_of_the_library(monkeypatch):
    stand_in = custom_op_stand_in(monkeypatch)
    t = torch.zeros(3, 4)
    assert ipu.replica_all_reduce_sum(t, 2) == "out"
    (path, args, kwargs), = stand_in.log
    assert path == "custom_op" and args == ([t], "ReplicaAllReduceSum", "ai.graphcore.proxynorm", 1)
    assert kwargs == {"example_outputs": [t], "attributes": {"group_size": 2}}
    assert args[0][0] is t and type(kwargs["attributes"]["group_size"]) is int


def test_fused_op_is_a_custom_op_of_the_library(monkeypatch):
    stand_in = custom_op_stand_in(monkeypatch)
    x, c = torch.zeros(2, 4, 3), torch.zeros(4)
    assert ipu.group_norm_proxy_act(x, 2, c, c, c, c, "silu", 1e-3) == "out"
    (path, args, kwargs), = stand_in.log
    assert path == "custom_op" and args[1:] == ("GroupNormProxyAct", "ai.graphcore.proxynorm", 1)
    assert [len(args[0]), kwargs["example_outputs"]] == [5, [x]]
    assert kwargs["attributes"] == {"groups": 2, "act": "silu", "epsilon": 1e-3}


def test_all_reduce_ops_declare_their_outputs_replica_equal():
    """Read, not compiled (no Poplar SDK here): both IR ops of replica_all_reduce.cpp override
    PopART's Op::fwdPropagateIsReplicaEqual with the base's parameter types at SDK 3.3
    (willow/include/popart/op.hpp:1062-1065), as PopART's ReplicatedAllReduceOp does, and
    include the proxy's header, whose method the override calls."""
    with open(os.path.join(OP_DIR, "replica_all_reduce.cpp")) as f:
        source = f.read()
    code = "\n".join(line.split("//")[0] for line in source.splitlines())
    declaration = re.compile(
        r"std::tuple<popart::ReplEqOutputMap,\s*popart::ReplEqModifiedInputMap>\s*"
        r"fwdPropagateIsReplicaEqual\(\s*const popart::AliasModel &\w+,\s*"
        r"const popart::ReplEqInputMap &\w+,\s*popart::ReplicaEqualAnalysisProxy &\w+\)"
        r"\s*const final")
    classes = re.split(r"\nclass ", code)
    for name in ("ReplicaAllReduceSumOp", "ReplicaAllReduceSumGradOp"):
        body, = [c for c in classes if c.startswith(f"{name} : public popart::Op")]
        assert len(declaration.findall(body)) == 1, name
    assert "#include <popart/analysis/replicaequal/replicaequalanalysisproxy.hpp>" in code
    assert "getModifiedInputMapFromAliases(" in code


def test_op_knows_every_fused_activation():
    """The layers run the fused ops for FUSED_ACTS only (the rest, eagerly)."""
    assert set(ipu.ACTS) == set(FUSED_ACTS) <= set(ACTS)


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
                 "-lpoplar", "-lpopops", "-lgcl", "proxynorm_ipu.cpp", "replica_all_reduce.cpp"):
        assert flag in result.stdout, flag


def test_layers_pick_the_ipu_op_while_poptorch_traces(monkeypatch, caplog):
    import types

    from proxynorm import ops

    tracing = types.SimpleNamespace(isRunningOnIpu=lambda: True)
    monkeypatch.setitem(sys.modules, "poptorch", tracing)
    monkeypatch.setattr(ops, "_warned_ipu", False)
    x = torch.zeros(2, 4, 3)
    monkeypatch.setattr(ipu, "is_built", lambda: False)
    with caplog.at_level("WARNING", logger="proxynorm.ops"):
        assert ops.fused_op(x) is None and ops.fused_op(x) is None
    assert len(caplog.records) == 1 and "make custom_ops" in caplog.records[0].getMessage()
    monkeypatch.setattr(ipu, "is_built", lambda: True)
    assert ops.fused_op(x) is ipu.group_norm_proxy_act
    monkeypatch.setenv("PROXYNORM_FUSED", "0")
    assert ops.fused_op(x) is None
    tracing.isRunningOnIpu = lambda: False  # PopTorch imported, running on the CPU
    monkeypatch.setenv("PROXYNORM_FUSED", "1")
    assert ops.fused_op(x) is not ipu.group_norm_proxy_act


# --- the reference ------------------------------------------------------------------------

def eager(x, groups, weight, bias, proxy_mean, proxy_rstd, act, eps):
    """The op's definition, written independently of proxynorm.proxy."""
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


# --- SyncBatchNormAct's IPU code path, replicas emulated on CPU threads -------------------

class EmulatedReplicas:
    """`replicas` IPU replicas as threads, each running its own copy of a layer.

    all_reduce stands in for ops.ipu.replica_all_reduce_sum: every replica hands in
    its tensor and gets the sum over its group of consecutive replicas, summed in replica
    order (so every member gets the same values, as from GCL). Its backward is the same
    exchange of the incoming gradient, as the PopART grad op does: each replica runs the
    backward pass of its own loss only, and the gradient reaches the other replicas through
    that exchange alone (the forward hands on detached copies).
    """

    def __init__(self, replicas):
        self.replicas = replicas
        self.barrier = threading.Barrier(replicas, timeout=60)
        self.lock = threading.Lock()
        self.slots = {}  # (replica, exchange index) -> tensor
        self.exchanges = [0] * replicas
        self.where = threading.local()
        self.calls = []  # (replica, shape, dtype, group_size) of each all_reduce

    def exchange(self, replica, tensor, group_size):
        with self.lock:
            index = self.exchanges[replica]
            self.exchanges[replica] += 1
            self.slots[replica, index] = tensor.detach().clone()
        self.barrier.wait()
        size = group_size or self.replicas
        first = replica // size * size
        total = self.slots[first, index].clone()
        for other in range(first + 1, first + size):
            total += self.slots[other, index]
        return total

    def all_reduce(self, t, group_size):
        replica = self.where.replica
        self.calls.append((replica, tuple(t.shape), t.dtype, group_size))
        return _EmulatedAllReduce.apply(t, self, replica, group_size)

    def run(self, step):
        """[step(r) for each replica r], each in its own thread."""
        results, errors = [None] * self.replicas, []

        def target(replica):
            self.where.replica = replica
            try:
                results[replica] = step(replica)
            except BaseException as error:  # noqa: B902 - re-raised below
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.replicas)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def probed_step(layers, xs, probes):
    """replica r's step: its layer on xs[r], backward from (out * probes[r]).sum(); returns
    (output, input gradient)."""
    def step(r):
        x = xs[r].clone().requires_grad_()
        out = layers[r](x)
        (out * probes[r]).sum().backward()
        return out.detach(), x.grad
    return step


class _EmulatedAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, replicas, replica, group_size):
        ctx.replicas, ctx.replica, ctx.group_size = replicas, replica, group_size
        return replicas.exchange(replica, t, group_size)

    @staticmethod
    def backward(ctx, grad):
        return ctx.replicas.exchange(ctx.replica, grad, ctx.group_size), None, None, None


@pytest.fixture
def ipu_tracing(monkeypatch):
    """poptorch as SyncBatchNormAct sees it while PopTorch traces for the IPU; returns the
    list of tensors given to recomputationCheckpoint."""
    checkpoints = []

    def checkpoint(t):
        checkpoints.append(t)
        return t

    monkeypatch.setitem(sys.modules, "poptorch", Recorder(fakes={
        "isRunningOnIpu": lambda: True, "recomputationCheckpoint": checkpoint}))
    return checkpoints


def batch_norm_layer(channels, momentum, ipu_group_size=1):
    torch.manual_seed(1)
    layer = SyncBatchNormAct(channels, momentum=momentum, act="relu",
                             ipu_group_size=ipu_group_size)
    with torch.no_grad():
        layer.weight.copy_(1.0 + 0.3 * torch.randn(channels))
        layer.bias.copy_(0.5 * torch.randn(channels))
        layer.running_mean.copy_(3.0 * torch.randn(channels))
        layer.running_var.copy_(1.0 + torch.rand(channels))
    return layer


def reference_group_step(layer, xs, probes):
    """float64 BatchNorm + ReLU over the concatenated batch of one group with `layer`'s
    parameters and running statistics (updated in place): outputs, input gradients and
    parameter gradients of the group's summed loss."""
    leaves = [x.detach().double().requires_grad_() for x in xs]
    weight = layer.weight.detach().double().requires_grad_()
    bias = layer.bias.detach().double().requires_grad_()
    out = torch.relu(F.batch_norm(torch.cat(leaves), layer.ref_mean, layer.ref_var, weight,
                                  bias, training=True,
                                  momentum=0.0 if layer.momentum is None else layer.momentum,
                                  eps=layer.eps))
    loss = (out * torch.cat(probes).double()).sum()
    grads = torch.autograd.grad(loss, [*leaves, weight, bias])
    return out.detach().split([len(x) for x in xs]), grads[:len(xs)], grads[len(xs):]


@pytest.mark.parametrize("group_size", [2, 0])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (2, 5, 7)])
def test_ipu_sync_batch_matches_batch_norm_over_the_group(ipu_tracing, monkeypatch,
                                                          group_size, momentum, shape):
    """Four replicas in groups of group_size (0 = all): each replica's output, input
    gradient, summed parameter gradients and running statistics after two steps equal
    float64 BatchNorm over its group's concatenated micro-batches (batch mean far from the
    initial running mean, as the float32 shifted sums must survive)."""
    replicas, channels = 4, shape[1]
    emulated = EmulatedReplicas(replicas)
    monkeypatch.setattr(ops.ipu, "replica_all_reduce_sum", emulated.all_reduce)
    base = batch_norm_layer(channels, momentum, group_size)
    layers = [copy.deepcopy(base).train() for _ in range(replicas)]
    size = group_size or replicas
    groups = [list(range(first, first + size)) for first in range(0, replicas, size)]
    references = []
    for group in groups:  # float64 running statistics, one pair per group
        reference = SimpleNamespace(ref_mean=base.running_mean.double().clone(),
                                    ref_var=base.running_var.double().clone(),
                                    weight=base.weight, bias=base.bias, eps=base.eps,
                                    momentum=momentum)
        references.append(reference)

    offset = 12.0 * torch.randn(1, channels, *([1] * (len(shape) - 2)))
    for step in range(2):
        xs = [2.0 * torch.randn(shape) + offset for _ in range(replicas)]
        probes = [torch.randn(shape) for _ in range(replicas)]
        for layer in layers:
            layer.weight.grad = layer.bias.grad = None

        results = emulated.run(probed_step(layers, xs, probes))
        for group, reference in zip(groups, references):
            if momentum is None:  # cumulative average: BatchNorm's factor 1 / batches seen
                reference.momentum = 1.0 / (step + 1)
            outs, x_grads, (weight_grad, bias_grad) = reference_group_step(
                reference, [xs[r] for r in group], [probes[r] for r in group])
            for r, out, x_grad in zip(group, outs, x_grads):
                assert_close(results[r][0], out, f"step {step} replica {r} out")
                assert_close(results[r][1], x_grad, f"step {step} replica {r} grad_x")
                layer = layers[r]
                assert_close(layer.running_mean, reference.ref_mean, f"replica {r} running_mean")
                assert_close(layer.running_var, reference.ref_var, f"replica {r} running_var")
                assert int(layer.num_batches_tracked) == step + 1
            assert_close(sum(layers[r].weight.grad for r in group), weight_grad, "grad_weight")
            assert_close(sum(layers[r].bias.grad for r in group), bias_grad, "grad_bias")
            for r in group[1:]:  # the replicas of a group hold identical running statistics
                assert torch.equal(layers[r].running_mean, layers[group[0]].running_mean)
                assert torch.equal(layers[r].running_var, layers[group[0]].running_var)

    # one all-reduce of (count, sum, sum of squares) per layer per forward, kept by
    # recomputation; none in the backward pass beyond the gradient exchange
    assert sorted(emulated.calls) == sorted(
        (r, (3, channels), torch.float32, group_size) for r in range(replicas) for _ in range(2))
    assert len(ipu_tracing) == 2 * replicas
    assert all(t.shape == (3, channels) for t in ipu_tracing)


def test_ipu_sync_batch_statistics_survive_a_large_mean(ipu_tracing, monkeypatch):
    """Inputs 1000 standard deviations from zero, a running mean near theirs (a trained
    layer): the float32 sums about the running mean keep the variance, which float32
    E[x^2] - E[x]^2 would lose to rounding (a relative error of about 2^-24 * 1000^2)."""
    replicas, shape = 2, (4, 3, 5, 5)
    emulated = EmulatedReplicas(replicas)
    monkeypatch.setattr(ops.ipu, "replica_all_reduce_sum", emulated.all_reduce)
    offset = torch.tensor([1000.0, -1500.0, 800.0]).view(1, 3, 1, 1)
    base = batch_norm_layer(shape[1], 0.1, ipu_group_size=0)
    with torch.no_grad():
        base.running_mean.copy_(offset.flatten() + 0.3 * torch.randn(3))
    layers = [copy.deepcopy(base).train() for _ in range(replicas)]
    xs = [torch.randn(shape) + offset for _ in range(replicas)]
    probes = [torch.randn(shape) for _ in range(replicas)]

    results = emulated.run(probed_step(layers, xs, probes))
    reference = SimpleNamespace(ref_mean=base.running_mean.double().clone(),
                                ref_var=base.running_var.double().clone(), weight=base.weight,
                                bias=base.bias, eps=base.eps, momentum=0.1)
    outs, x_grads, _ = reference_group_step(reference, xs, probes)
    for r in range(replicas):
        assert_close(results[r][0], outs[r], "out")
        assert_close(results[r][1], x_grads[r], "grad_x")
        assert_close(layers[r].running_var, reference.ref_var, "running_var")


def cpu_has_float16_relu():
    """torch 2.0 (PopTorch's pin) has no float16 CPU kernel for ReLU (clamp_min); on an IPU
    PopART runs it, so only this CPU emulation of the IPU path lacks it."""
    try:
        torch.relu(torch.zeros(1, dtype=torch.float16))
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not cpu_has_float16_relu(), reason="this torch has no float16 CPU ReLU")
def test_ipu_sync_batch_float16(ipu_tracing, monkeypatch):
    """16.16 precision: float16 activations and parameters, float32 statistics."""
    replicas, shape = 2, (4, 3, 5, 5)
    emulated = EmulatedReplicas(replicas)
    monkeypatch.setattr(ops.ipu, "replica_all_reduce_sum", emulated.all_reduce)
    base = batch_norm_layer(shape[1], 0.1, ipu_group_size=0)
    layers = [copy.deepcopy(base).half().train() for _ in range(replicas)]
    xs = [(2.0 * torch.randn(shape) + 1.0).half() for _ in range(replicas)]
    probes = [torch.randn(shape).half() for _ in range(replicas)]

    def replica_step(r):
        x = xs[r].clone().requires_grad_()
        out = layers[r](x)
        (out.float() * probes[r].float()).sum().backward()
        return out.detach(), x.grad

    results = emulated.run(replica_step)
    reference = SimpleNamespace(ref_mean=base.running_mean.double().clone(),
                                ref_var=base.running_var.double().clone(),
                                weight=layers[0].weight, bias=layers[0].bias, eps=base.eps,
                                momentum=0.1)
    outs, x_grads, _ = reference_group_step(reference, xs, probes)
    for r in range(replicas):
        assert results[r][0].dtype == results[r][1].dtype == torch.float16
        assert_close(results[r][0], outs[r], "out", rtol=1e-2)
        assert_close(results[r][1], x_grads[r], "grad_x", rtol=1e-2)
        assert layers[r].running_mean.dtype == torch.float16
        assert_close(layers[r].running_mean, reference.ref_mean, "running_mean", rtol=1e-2)


def test_ipu_sync_batch_path_only_while_training_across_replicas(ipu_tracing, monkeypatch):
    """No all-reduce in evaluation, with ipu_group_size 1 or outside PopTorch's tracing: the
    layer is then the CPU BatchNormAct."""
    def no_all_reduce(t, group_size):
        raise AssertionError("all-reduce called")

    monkeypatch.setattr(ops.ipu, "replica_all_reduce_sum", no_all_reduce)
    layer = batch_norm_layer(4, 0.1)
    x = torch.randn(6, 4, 3, 3) + 2.0
    expected = torch.relu(F.batch_norm(x, layer.running_mean.clone(), layer.running_var.clone(),
                                       layer.weight, layer.bias, training=True))
    torch.testing.assert_close(layer.train()(x), expected)  # ipu_group_size 1: PopART's BN
    layer = batch_norm_layer(4, 0.1, ipu_group_size=0)
    layer.eval()(x)
    sys.modules["poptorch"].fakes["isRunningOnIpu"] = lambda: False
    layer.train()(x)
    assert not ipu_tracing


# --- on the IPU Model and on IPU hardware -----------------------------------------------

class AllReduceOfParameter(torch.nn.Module):
    """y = replica_all_reduce_sum(w * x); the loss sum(y * probe) of each replica trains w,
    whose PopART gradient then shows the op's gradient (a dropped or replica-local one
    gives another w after a step)."""

    def __init__(self, channels, group_size):
        super().__init__()
        self.w = torch.nn.Parameter(1.0 + torch.rand(channels))
        self.group_size = group_size

    def forward(self, x, probe):
        import poptorch

        y = ipu.replica_all_reduce_sum(self.w * x, self.group_size)
        return y, poptorch.identity_loss((y * probe).sum(), reduction="none")


def all_reduce_step(replicas, group_size, x, probe):
    """(y, w after one SGD step with lr 1) of AllReduceOfParameter on `replicas` replicas
    (the IPU Model for one), and the w it started from."""
    import poptorch

    ipu.load()
    torch.manual_seed(0)
    model = AllReduceOfParameter(x.shape[1], group_size)
    w0 = model.w.detach().clone()
    opts = poptorch.Options()
    if replicas == 1:
        opts.useIpuModel(True)
    opts.replicationFactor(replicas)
    opts.Training.accumulationAndReplicationReductionType(poptorch.ReductionType.Mean)
    training = poptorch.trainingModel(model, options=opts,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    try:
        y, _ = training(x, probe)
        training.copyWeightsToHost()
        return y, model.w.detach().clone(), w0
    finally:
        training.destroy()


def expected_all_reduce(w0, xs, probes, size):
    """y per replica and w after the step, with every replica's loss in the mean."""
    groups = [range(first, first + size) for first in range(0, len(xs), size)]
    ys, grad = [None] * len(xs), torch.zeros_like(w0)
    for group in groups:
        total = sum(w0 * xs[r] for r in group)
        probe_sum = sum(probes[r] for r in group)
        for r in group:
            ys[r] = total
            grad += (probe_sum * xs[r]).sum(0)
    return torch.cat(ys), w0 - grad / len(xs)


@pytest.mark.ipu
def test_all_reduce_without_replication_is_identity():
    x, probe = torch.randn(3, 4), torch.randn(3, 4)
    y, w, w0 = all_reduce_step(1, 0, x, probe)
    expected_y, expected_w = expected_all_reduce(w0, [x], [probe], 1)
    assert_close(y, expected_y, "y")
    assert_close(w, expected_w, "w")


@pytest.mark.ipu_hardware
@pytest.mark.parametrize("group_size", [0, 1, 2])
def test_all_reduce_sums_values_and_gradients_over_two_replicas(group_size):
    xs, probes = [torch.randn(3, 4) for _ in range(2)], [torch.randn(3, 4) for _ in range(2)]
    y, w, w0 = all_reduce_step(2, group_size, torch.cat(xs), torch.cat(probes))
    expected_y, expected_w = expected_all_reduce(w0, xs, probes, group_size or 2)
    assert_close(y, expected_y, "y")
    assert_close(w, expected_w, "w")
