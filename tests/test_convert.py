"""proxynorm/convert.py: torchvision CNNs converted to our norms, and `--model torchvision:NAME`.

The BatchNorm -> activation pairs are counted here independently of the converter (plain
torch.fx.symbolic_trace and a short list of activation types). Inputs are tiny (batch 4
at 64x64, so the last stage keeps 2x2 positions); weights are random (never downloaded).
"""
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from models import ConversionError, convert_norms, get_model
from proxynorm.convert import default_groups
from proxynorm.norms import BATCH_INDEPENDENT, GroupNormAct, GroupNormProxyAct
from tests.test_train import needs_compile, train

TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
               "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf",
               "densenet121", "shufflenet_v2_x1_0"]
ACT_TYPES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def torchvision_model(name, num_classes=5):
    return randomise(torchvision.models.get_model(name, weights=None, num_classes=num_classes))


def randomise(model):
    """BatchNorm affine and statistics away from their init, so copying them shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                for tensor, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.5, 0.5),
                                          (m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model


def batch_norm_act_pairs(model):
    """Names of the BatchNorms whose only user is an activation, from a plain fx trace."""
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())

    def is_act(node):
        return ((node.op == "call_module" and isinstance(modules[node.target], ACT_TYPES))
                or (node.op == "call_function" and node.target in (F.relu, torch.relu)))

    return {node.target for node in traced.graph.nodes
            if node.op == "call_module" and isinstance(modules[node.target], _BatchNorm)
            and len(node.users) == 1 and is_act(next(iter(node.users)))}


def batch_norms(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def no_random_layers(model):
    """Dropout and stochastic depth draw masks per batch; what is tested is the norms."""
    for m in model.modules():
        if isinstance(m, (nn.Dropout, torchvision.ops.StochasticDepth)):
            m.eval()
    return model


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_convert_to_group_pn(name):
    original = torchvision_model(name)
    pairs = batch_norm_act_pairs(original)
    bns = batch_norms(original)
    model, report = convert_norms(original, "group_pn", report=True)

    assert not batch_norms(model)
    assert set(report.norm_act) == pairs and len(pairs) > 0
    assert set(report.norm_only) == set(bns) - pairs and not report.left
    assert sum(isinstance(m, GroupNormProxyAct) for m in model.modules()) == len(pairs)
    for bn_name, bn in bns.items():  # BatchNorm's affine carried over; shift where it fits
        layer = model.get_submodule(bn_name)
        assert torch.equal(layer.weight, bn.weight)
        if bn_name in pairs:
            assert torch.equal(layer.bias, bn.bias)
        else:
            assert type(layer) is GroupNormAct and layer.bias is None
    assert set(report.dropped_bias) == set(bns) - pairs
    assert batch_norms(original) == bns  # the original is left alone

    no_random_layers(model.train())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (4, 5) and torch.isfinite(out).all()
        mates = x.clone()
        mates[1:] = torch.randn(3, 3, 64, 64) * 3 + 1
        # same shapes, so the same kernels: nothing but the batch mates changed
        assert torch.equal(model(mates)[0], out[0])
        alone = model(x[:1])
        torch.testing.assert_close(alone, out[:1], rtol=0, atol=1e-4 * out.abs().max().item())


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large"])
def test_batch_norm_conversion_keeps_the_function(name):
    """norm="batch": the same network, its BatchNorm state_dict included (eps 1e-3 and
    momentum 0.01 in MobileNetV3 are carried over)."""
    original = torchvision_model(name)
    model = convert_norms(original, "batch")
    assert model.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), original.eval()(x))
        assert torch.equal(no_random_layers(model.train())(x),
                           no_random_layers(original.train())(x))
    for bn_name, bn in batch_norms(original).items():  # one identical update
        assert torch.equal(model.get_submodule(bn_name).running_var, bn.running_var)


def test_report_counts_and_summary():
    model, report = convert_norms(torchvision_model("resnet18"), report=True)
    assert report.counts() == {"norm_act": 9, "norm_only": 11, "left": 0}
    assert report.norm_act["layer1.0.bn1"] == "relu" and "layer1.0.bn2" in report.norm_only
    assert "layer1.0.downsample.1" not in report.norm_only  # resnet18's layer1 keeps its width
    assert "layer2.0.downsample.1" in report.norm_only
    assert str(report).splitlines()[0] == (
        "convert_norms to group_pn: 9 BatchNorm+activation pairs -> norm-act modules "
        "(relu 9); 11 BatchNorms without activation -> norms without activation; "
        "0 left as they were")
    assert not report.groups  # 32 divides every width
    # a block's one relu module serves bn1 and the add: the block's forward loses the first
    # call and the module stays for the second; the stem's relu served bn1 alone
    assert type(model.layer1[0].relu) is nn.ReLU and type(model.relu) is nn.Identity
    assert report.forwards == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def test_the_converted_model_is_the_users_model(tmp_path):
    """Same class and submodule tree, indexing and head replacement, the original's
    state_dict keys less BatchNorm's buffers plus Proxy Norm's parameters, hooks on
    containers, and whole-model save and deepcopy of the regenerated forwards."""
    original = torchvision_model("resnet18")
    model = convert_norms(original, "group_pn")
    assert type(model) is torchvision.models.ResNet
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock
    names = {n for n, _ in original.named_modules()} | {f"{bn}.act" for bn in batch_norms(original)}
    assert {n for n, _ in model.named_modules()} == names  # every norm-act holds an `act`
    assert isinstance(model.layer1[0].bn1, GroupNormProxyAct)
    model.fc = nn.Linear(512, 3)
    keys = {k for k in original.state_dict() if k.rsplit(".", 1)[-1] not in (
        "running_mean", "running_var", "num_batches_tracked")}
    keys |= {f"{name}.{p}" for name in batch_norm_act_pairs(original)
             for p in ("proxy_weight", "proxy_bias")}
    keys -= {k for k in keys if k.endswith(".bias") and k.rsplit(".", 1)[0] in batch_norms(
        original) and k.rsplit(".", 1)[0] not in batch_norm_act_pairs(original)}  # scale-only
    assert set(model.state_dict()) == keys
    seen = []
    hook = model.layer2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 3) and seen == [(2, 128, 4, 4)]
        hook.remove()  # a lambda does not pickle
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        twin = copy.deepcopy(model)
        for other in (loaded, twin):
            assert torch.equal(other(x), out)
            assert other.layer1[0].forward.module is other.layer1[0]  # bound to the copy


def test_an_absorbed_activation_leaves_the_forward():
    """Each norm-act applies its activation once: no second ReLU after it, in any block.
    A ReLU after a Proxy Norm layer would zero its negative outputs."""
    model = convert_norms(torchvision_model("resnet18"), "group_pn").eval()
    relus = []
    for name, module in model.named_modules():
        if type(module) is nn.ReLU and not name.endswith(".act"):  # not a norm-act's own
            # before the call: torchvision's ReLU works in place
            module.register_forward_pre_hook(lambda m, i: relus.append(i[0].clone()))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    # each block's ReLU once, after its residual add (not also after its bn1)
    assert len(relus) == 8
    assert all((t < 0).any() for t in relus)  # sums, not Proxy Norm outputs re-activated


class OptionalShortcut(nn.Module):
    """timm's DlaBasic: an optional shortcut, one ReLU module after bn1 and after the add."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class CallsItTwoWays(nn.Module):
    """timm's DlaTree: its blocks called with a shortcut and without one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.project = nn.Conv2d(3, 8, 1)
        self.tree1 = OptionalShortcut()
        self.tree2 = OptionalShortcut()

    def forward(self, x):
        y = self.tree1(self.stem(x), self.project(x))
        y = self.tree2(y)  # its own input as the shortcut
        return self.tree1(y, shortcut=y * 0.5)  # tree1 again, the shortcut by keyword


def test_a_forward_called_with_and_without_an_optional_argument(tmp_path):
    """A regenerated forward follows each call's None arguments: traced alone with a
    tensor for `shortcut`, `if shortcut is None` would vanish and tree2(y) add None."""
    original = CallsItTwoWays()
    model, report = convert_norms(original, "batch", report=True)
    assert report.forwards == ["tree1", "tree2"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for training in (True, False):  # the same network, each call as the original's
            assert torch.equal(model.train(training)(x), original.train(training)(x))

    model = convert_norms(original, "group_pn").eval()
    relus = []
    hooks = [block.relu.register_forward_pre_hook(lambda m, i: relus.append(i[0].clone()))
             for block in (model.tree1, model.tree2)]
    with torch.no_grad():
        out = model(x)
        # one ReLU per block call, after the add; bn1's is the norm-act's own now
        assert len(relus) == 3 and all((t < 0).any() for t in relus)
        for hook in hooks:  # a lambda does not pickle
            hook.remove()
        torch.save(model, tmp_path / "model.pt")
        for other in (torch.load(tmp_path / "model.pt", weights_only=False),
                      copy.deepcopy(model)):
            assert torch.equal(other(x), out)
        y = torch.randn(2, 8, 8, 8)
        with pytest.raises(TypeError, match=r"^OptionalShortcut\.forward, as convert_norms "
                                            r"traced it, takes calls that leave None: "
                                            r"shortcut; this call leaves none$"):
            model.tree2(y, y)  # the model never calls tree2 so


class PassesItsMode(nn.Module):
    """F.dropout(x, p, training=self.training), as timm's GhostNet heads, in a forward that
    conversion regenerates (a functional ReLU after a BatchNorm)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(F.dropout(x, 0.5, training=self.training))


def test_a_forward_that_passes_its_mode_on_converts_and_still_follows_the_mode():
    """Its train and eval traces differ only in dropout's `training`, which follows the
    mode: no reason to refuse it, and the regenerated forward must read self.training
    rather than the True of the trace (eval would then drop half its features)."""
    original = PassesItsMode()
    model, report = convert_norms(original, "batch", report=True)
    assert report.forwards == [""] and report.norm_act == {"bn": "relu"}
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for training in (True, False, True):
            torch.manual_seed(0)
            expected = original.train(training)(x)
            torch.manual_seed(0)
            assert torch.equal(model.train(training)(x), expected)


@pytest.mark.skipif(importlib.util.find_spec("torch.export") is None,
                    reason="torch.export needs torch >= 2.1")  # torch 2.0: PopTorch's pin
@needs_compile
def test_export_trace_and_compile_of_a_converted_model():
    model = convert_norms(torchvision_model("resnet18"), "group_pn").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), expected)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)


def test_default_groups_divide_the_channels():
    assert [default_groups(c) for c in (64, 512, 96, 32, 24, 58, 240, 3, 2, 1)] == \
        [32, 32, 32, 16, 12, 29, 30, 1, 1, 1]
    model, report = convert_norms(torchvision_model("mobilenet_v2"), report=True)
    assert report.groups["features.2.conv.3"] == (24, 12)
    assert model.get_submodule("features.2.conv.3").groups == 12
    assert model.get_submodule("features.18.1").groups == 32  # 1280 channels
    with pytest.raises(ConversionError, match=r"^features\.0\.1: GroupNormProxyAct: 32 channels "
                                              r"are not divisible by 24 groups$"):
        convert_norms(torchvision_model("mobilenet_v2"), groups=24)
    model = convert_norms(torchvision_model("mobilenet_v2"), groups=lambda c: c // 8)
    assert model.get_submodule("features.2.conv.3").groups == 3


@pytest.mark.parametrize("norm", BATCH_INDEPENDENT)
def test_every_batch_independent_norm_converts(norm):
    model = no_random_layers(convert_norms(torchvision_model("mobilenet_v3_large"), norm).train())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(model(x[:1]), out[:1], rtol=0,
                                   atol=1e-4 * out.abs().max().item())


@needs_compile
def test_state_dict_round_trip_and_torch_compile(tmp_path):
    model = convert_norms(torchvision_model("resnet18"), "group_pn")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    fresh = convert_norms(torchvision.models.resnet18(num_classes=5), "group_pn")
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(fresh(x), expected)
        compiled = torch.compile(fresh, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)


# ---- what it cannot convert -----------------------------------------------------------

class Block(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Net(nn.Module):
    """Stem BN + functional SiLU, a block per activation, a residual BN and a tensor method."""

    def __init__(self, act=None, inner=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.block = Block(act or nn.GELU())
        self.inner = inner or nn.Identity()
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = F.silu(self.bn0(self.stem(x)))
        x = self.inner(self.block(x)) + x
        return self.bn2(self.bn1(x).relu())


def test_activation_kinds_functions_and_methods():
    model, report = convert_norms(Net(), report=True)
    assert report.norm_act == {"bn0": "silu", "block.bn": "gelu", "bn1": "relu"}
    assert report.norm_only == ["bn2"]


class LeakyFunction(nn.Module):
    def __init__(self, **slope):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.slope = slope

    def forward(self, x):
        return F.leaky_relu(self.bn(self.conv(x)), **self.slope)


def test_leaky_relu_at_torchs_slope_and_mish_convert_and_another_slope_is_refused():
    """The registry's leaky_relu is nn.LeakyReLU() (slope 0.01, timm's CSPNets and
    DarkNets); Proxy Norm must hold the exact activation, so another slope is refused."""
    x = torch.randn(3, 3, 8, 8)
    for act, name in ((nn.LeakyReLU(), "leaky_relu"), (nn.LeakyReLU(0.01, inplace=True),
                                                       "leaky_relu"), (nn.Mish(), "mish")):
        model, report = convert_norms(Net(act), report=True)
        assert report.norm_act["block.bn"] == name
        assert type(model.block.bn.act) is type(act) and type(model.block.act) is nn.Identity
        with torch.no_grad():
            torch.testing.assert_close(model(x)[:1], model(x[:1]))  # batch mates don't matter
    model, report = convert_norms(LeakyFunction(), report=True)
    assert report.norm_act == {"bn": "leaky_relu"}
    assert convert_norms(LeakyFunction(negative_slope=0.01)).bn.act.negative_slope == 0.01
    with pytest.raises(ConversionError, match=r"^block\.bn: followed by block\.act "
                                              r"\(LeakyReLU\(negative_slope=0\.2\)\), an "
                                              r"activation that Proxy Norm cannot hold"):
        convert_norms(Net(nn.LeakyReLU(0.2)))
    with pytest.raises(ConversionError, match=r"^bn: followed by leaky_relu\(negative_slope="
                                              r"0\.2\), an activation"):
        convert_norms(LeakyFunction(negative_slope=0.2))


class FunctionalBatchNorms(nn.Module):
    """A weight standardised by F.batch_norm (timm's ScaledStdConv2d, in NFNets), then a
    BatchNorm module, then F.batch_norm over the activations."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, 8, -1), None, None, training=True)
        x = F.relu(self.bn(F.conv2d(x, weight.reshape_as(self.weight), padding=1)))
        return F.batch_norm(x, None, None, training=True)


def test_functional_batch_norm_over_activations_is_refused_over_a_weight_left_alone():
    with pytest.raises(ConversionError, match=r"^the model \(FunctionalBatchNorms\) calls "
                                              r"torch\.nn\.functional\.batch_norm, which is "
                                              r"not a module; pass strict=False to leave it "
                                              r"as it is$"):
        convert_norms(FunctionalBatchNorms())
    model, report = convert_norms(FunctionalBatchNorms(), strict=False, report=True)
    assert report.norm_act == {"bn": "relu"}
    assert list(report.left) == ["<model>:batch_norm_1"]  # the activations' only


def test_unsupported_activation_is_one_error_naming_the_module():
    with pytest.raises(ConversionError) as info:
        convert_norms(Net(nn.Tanh()))
    assert str(info.value) == (
        "block.bn: followed by block.act (Tanh), an activation that Proxy Norm cannot hold; "
        "supported: relu, silu, gelu, relu6, hardswish, leaky_relu, mish; pass strict=False "
        "to leave it as it is")
    with pytest.raises(ConversionError, match=r"^block\.bn: followed by block\.act "
                                              r"\(GELU\(approximate='tanh'\)\)"):
        convert_norms(Net(nn.GELU(approximate="tanh")), "layer_pn")
    model, report = convert_norms(Net(nn.Tanh()), strict=False, report=True)
    assert list(report.left) == ["block.bn"] and "Tanh" in report.left["block.bn"]
    assert "block.bn: followed by block.act (Tanh)" in str(report)
    assert type(model.block.bn) is nn.BatchNorm2d and len(report.norm_act) == 2
    # a norm without Proxy Norm can stand before any activation: the activation stays
    model, report = convert_norms(Net(nn.Tanh()), "group", report=True)
    assert "block.bn" in report.norm_only and isinstance(model.block.act, nn.Tanh)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 8, 8, 8)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(x) if x.sum() > 0 else x


class TrainingOnly(nn.Module):
    """Halves its input in training: a graph traced in one mode would keep that mode."""

    def forward(self, x):
        return x * 0.5 if self.training else x


def test_untraceable_module_is_one_error_or_left_whole():
    with pytest.raises(ConversionError) as info:
        convert_norms(Net(inner=DataDependent()))
    message = str(info.value)
    assert message.startswith("inner (DataDependent): torch.fx cannot trace its forward "
                              "(TraceError: symbolically traced variables cannot be used as "
                              "inputs to control flow)")
    assert message.endswith("pass strict=False to leave them as they are") and "\n" not in message
    model, report = convert_norms(Net(inner=DataDependent()), strict=False, report=True)
    assert list(report.left) == ["inner.bn"] and len(report.norm_act) == 3
    assert type(model.inner.bn) is nn.BatchNorm2d
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 8, 8, 8)


def test_modules_without_batch_norm_are_kept_whole_when_tracing_fails():
    class Gate(nn.Module):  # data-dependent, but nothing inside to convert
        def forward(self, x):
            return x if x.sum() > 0 else -x

    model, report = convert_norms(Net(inner=Gate()), report=True)
    assert report.counts() == {"norm_act": 3, "norm_only": 1, "left": 0}
    model = convert_norms(Net(inner=TrainingOnly()), "group")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model.eval()(x))  # the mode is live


def test_mode_dependent_forward_around_batch_norms_is_refused():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x):
            x = self.net(x)
            return x * 0.5 if self.training else x

    with pytest.raises(ConversionError, match=r"^the model \(Wrapper\): its forward traces "
                                              r"differently in train and eval mode"):
        convert_norms(Wrapper())
    model, report = convert_norms(Wrapper(), strict=False, report=True)
    assert type(model) is Wrapper and len(report.left) == 4 and not report.norm_act

    class AuxHead(nn.Module):  # Inception's pattern: a head called in training only
        def __init__(self):
            super().__init__()
            self.net, self.aux = Net(), Block(nn.ReLU())

        def forward(self, x):
            x = self.net(x)
            return (x, self.aux(x)) if self.training else x

    with pytest.raises(ConversionError, match=r"^the model \(AuxHead\): its forward"):
        convert_norms(AuxHead())  # the caller, not the head it calls


def test_batch_norm_1d_and_subclasses_are_refused():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()
            self.fc = nn.Linear(8, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(self.net(x).mean((2, 3))))

    with pytest.raises(ConversionError, match=r"^bn: BatchNorm1d: its input may be \(N, C\)"):
        convert_norms(Head())
    model, report = convert_norms(Head(), strict=False, report=True)
    assert list(report.left) == ["bn"] and model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


# ---- the training application ---------------------------------------------------------

def test_get_model_torchvision():
    model = get_model("torchvision:resnet18", norm="layer_pn", num_classes=3, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"^unknown torchvision model 'resnet1' \(close names: "
                                         r"resnet18, "):
        get_model("torchvision:resnet1")
    with pytest.raises(TypeError, match="has no option group_dim"):
        get_model("torchvision:resnet18", group_dim=16)
    with pytest.raises(ValueError, match="keeps torchvision's activations"):
        get_model("torchvision:resnet18", act="silu")


def test_train_a_torchvision_model(tmp_path, capsys):
    """digits has one input channel: the stem conv is rebuilt for it."""
    assert train(tmp_path / "run", "--model", "torchvision:resnet18", "--max-steps", 2) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("digits_resnet_group_pn: torchvision:resnet18 with group_pn on ")
    assert lines[1] == (  # the conversion report, in the start-up lines
        "torchvision:resnet18: convert_norms to group_pn: 9 BatchNorm+activation pairs -> "
        "norm-act modules (relu 9); 11 BatchNorms without activation -> norms without "
        "activation; 0 left as they were")
    assert lines[-1].startswith("digits_resnet_group_pn: stopped at step 2 (max_steps), ")
    assert train(tmp_path / "bad", "--model", "torchvision:resnet1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: unknown torchvision model 'resnet1' (close names: resnet18,")
    assert not (tmp_path / "bad").exists()
    assert train(tmp_path / "bad", "--model", "torchvision:resnet18", "--act", "silu") == 2
    assert capsys.readouterr().err == (
        "error: act does not apply to torchvision:resnet18 (torchvision models keep their "
        "own); unset it (--act null)\n")
