"""Export for deployment: eval-mode models of Proxy Norm layers through torch.onnx (run in
onnxruntime), torch.export and torch.jit.trace give PyTorch's outputs, with graphs of
standard ops only (no proxynorm op, which only this package can run)."""
import importlib
import importlib.util
import inspect
import warnings

import pytest
import torch
from torch import nn

import proxynorm
from models import get_model
from proxynorm import ops, proxy
from proxynorm.norms import GroupNormAct
from proxynorm.ops import cpu
from test_norms import randomise

OPSET = 18  # GroupNormalization's first opset (the exporters write InstanceNormalization)
# torch 2.0's TorchScript-based exporter takes opset 18 but has none of its reductions (its
# symbolic_opset18.py is col2im alone): it writes ReduceMean with opset 13's axes attribute,
# which onnx's checker refuses. It exports at opset 17 there (PopTorch's torch).
TORCHSCRIPT_OPSET = 17 if torch.__version__ < "2.1" else OPSET
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
ACTS = ["relu", "silu", "gelu"]


def randomise_norms(model):
    """Random norm and proxy parameters in every norm layer (the init's proxy_weight =
    proxy_bias = 0 and weight = 1 would hide a mix-up of the four)."""
    layers = [m for m in model.modules() if isinstance(m, GroupNormAct)]
    assert layers, "the model holds no group/layer norm"
    for seed, layer in enumerate(layers):
        randomise(layer, seed)
    return model.eval()


def small_model(act):
    return randomise_norms(nn.Sequential(
        nn.Conv2d(3, 16, 3), proxynorm.get_norm_act("group_pn", 16, act=act, groups=4)))


def preact_resnet20(norm):
    return randomise_norms(get_model("cifar_preact_resnet20", norm=norm, num_classes=10))


def expected(model, x):
    with torch.no_grad():
        return model(x)


# ---- ONNX ------------------------------------------------------------------------------

def onnx_run(model, x, tmp_path, dynamo=True):
    """Export model to ONNX (the dynamo-based or the TorchScript-based exporter), check the
    file and run it in onnxruntime on CPU: (output, the onnx ModelProto)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    has_dynamo_flag = "dynamo" in inspect.signature(torch.onnx.export).parameters
    if dynamo and not has_dynamo_flag:  # torch 2.0, PopTorch's pin
        pytest.skip("this torch has no dynamo-based torch.onnx exporter")
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation, TracerWarnings
        warnings.simplefilter("ignore")
        if dynamo:
            pytest.importorskip("onnxscript")
            torch.onnx.export(model, (x,), dynamo=True, opset_version=OPSET,
                              verbose=False).save(path)
        else:
            kwargs = {"dynamo": False} if has_dynamo_flag else {}
            torch.onnx.export(model, (x,), path, opset_version=TORCHSCRIPT_OPSET, **kwargs)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out), proto


def assert_standard_onnx(proto):
    """Only ONNX's own operators: no custom domain that onnxruntime could not run."""
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert any(node.op_type == "Conv" for node in proto.graph.node)


@pytest.mark.parametrize("norm", ["group_pn", "layer_pn"])
def test_preact_resnet_runs_in_onnxruntime_as_in_pytorch(norm, tmp_path):
    model = preact_resnet20(norm)
    x = torch.randn(2, 3, 32, 32)
    out, proto = onnx_run(model, x, tmp_path)
    assert_standard_onnx(proto)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
    torch.testing.assert_close(out, expected(model, x), **TOLERANCE)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("act", ACTS)
def test_activations_run_in_onnxruntime_as_in_pytorch(act, dynamo, tmp_path):
    model = small_model(act)
    x = torch.randn(2, 3, 8, 8)
    out, proto = onnx_run(model, x, tmp_path, dynamo=dynamo)
    assert_standard_onnx(proto)
    torch.testing.assert_close(out, expected(model, x), **TOLERANCE)


def test_converted_torchvision_resnet18_runs_in_onnxruntime_as_in_pytorch(tmp_path):
    """The library's acceptance criterion: a user's CNN, converted, deploys through ONNX."""
    torchvision = pytest.importorskip("torchvision")
    model = randomise_norms(proxynorm.convert_norms(
        torchvision.models.resnet18(weights=None, num_classes=10), "group_pn"))
    x = torch.randn(2, 3, 64, 64)
    out, proto = onnx_run(model, x, tmp_path)
    assert_standard_onnx(proto)
    torch.testing.assert_close(out, expected(model, x), **TOLERANCE)


# ---- torch.export and torch.jit.trace ----------------------------------------------------

def call_targets(exported):
    return {node.target for node in exported.graph.nodes if node.op == "call_function"}


def is_proxynorm_op(target):
    return getattr(target, "namespace", None) == "proxynorm" or "proxynorm" in str(target)


@pytest.mark.parametrize("norm", ["group_pn", "layer_pn"])
def test_torch_export_gives_pytorch_outputs_from_standard_ops(norm):
    export = pytest.importorskip("torch.export")  # torch >= 2.1
    model = preact_resnet20(norm)
    x = torch.randn(2, 3, 32, 32)
    exported = export.export(model, (x,))
    targets = call_targets(exported)
    assert torch.ops.aten.group_norm.default in targets
    assert not [t for t in targets if is_proxynorm_op(t)]
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected(model, x), **TOLERANCE)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_torch_export_before_any_forward_leaves_the_layers_working(strict, monkeypatch):
    """A model loaded and exported at once, before any forward: the quantile table made
    while export traces is a fake tensor, which the layers must not keep for later calls,
    and Dynamo (strict export) cannot make it at all (NormalDist is a C builtin)."""
    export = pytest.importorskip("torch.export")
    monkeypatch.setattr(proxy, "_quantile_cache", {})
    model = small_model("silu")
    x = torch.randn(2, 3, 8, 8)
    exported = export.export(model, (x,), strict=strict)
    assert not [t for t in call_targets(exported) if is_proxynorm_op(t)]
    with torch.no_grad():
        out = model(x)
        assert type(out) is torch.Tensor
        torch.testing.assert_close(exported.module()(x), out, **TOLERANCE)


def test_jit_trace_gives_pytorch_outputs_from_standard_ops():
    model = preact_resnet20("group_pn")
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():  # TracerWarnings of the shape checks
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)  # compared below instead
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::group_norm" in kinds
    assert not [k for k in kinds if k.startswith("proxynorm::")]
    other = torch.randn(3, 3, 32, 32)  # another batch size runs the same graph
    with torch.no_grad():
        for inputs in (x, other):
            torch.testing.assert_close(traced(inputs), expected(model, inputs), **TOLERANCE)


# ---- the switch between the fused op and the eager expression -----------------------------

PICKED = []  # fused_op's picks; global, as exporters copy the module or restore its state


class FusedOpProbe(nn.Module):
    """Records in PICKED which op fused_op picks for its input at each call."""

    def forward(self, x):
        PICKED.append(ops.fused_op(x))
        return x * 2


def exporters(tmp_path):
    """Each exporter that runs the module's Python forward on this torch, by name."""
    found = {"torch.jit.trace": lambda m, x: torch.jit.trace(m, (x,), check_trace=False)}
    if importlib.util.find_spec("torch.export"):  # torch >= 2.1
        export = importlib.import_module("torch.export").export
        found["torch.export"] = lambda m, x: export(m, (x,))
    onnx_kwargs = {"opset_version": OPSET}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        onnx_kwargs["dynamo"] = False
    if "dynamo" in onnx_kwargs and importlib.util.find_spec("onnxscript"):
        found["torch.onnx dynamo"] = lambda m, x: torch.onnx.export(
            m, (x,), dynamo=True, verbose=False, opset_version=OPSET)
    found["torch.onnx torchscript"] = lambda m, x: torch.onnx.export(
        m, (x,), str(tmp_path / "probe.onnx"), **onnx_kwargs)
    return found


@pytest.mark.skipif(not cpu.load(), reason="needs the fused CPU op (torch >= 2.4)")
def test_exporters_get_the_eager_expression_instead_of_the_fused_op(tmp_path):
    picked = PICKED
    picked.clear()
    probe = FusedOpProbe()
    x = torch.randn(2, 8, 4, 4)
    probe(x)
    assert picked == [cpu.group_norm_proxy_act]  # eager PyTorch: the fused CPU op
    for name, export in exporters(tmp_path).items():
        picked.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export(probe, x)
        assert picked and all(op is None for op in picked), (name, picked)
    picked.clear()
    probe(x)  # and back to the fused op once the export is over
    assert picked == [cpu.group_norm_proxy_act]
