"""timm's CNNs converted to our norms (BatchNormAct2d included), `--model timm:NAME`, and the
norm_layer factories (proxynorm/factories.py) in torchvision's and timm's models.

The BatchNorm -> activation pairs are counted here independently of the converter: timm's
BatchNormAct2d with an activation of its own, and a plain BatchNorm followed by an
activation module in an fx trace (through the nn.Identity that timm's ResNet blocks call
in between), checked against each model's known count. Inputs are tiny (batch 4 at
64x64); weights are random (pretrained=False: nothing is downloaded).
"""
import functools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from models import get_model
from proxynorm.convert import ConversionError, convert_norms
from proxynorm.factories import norm_act_layer, norm_layer
from proxynorm.norms import GroupNormAct, GroupNormProxyAct
from tests.test_convert import randomise
from tests.test_train import train

timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d, DropBlock2d  # noqa: E402 (timm is optional)
from timm.layers import activations as timm_acts  # noqa: E402
from timm.layers import activations_me as timm_acts_me  # noqa: E402

# name: (BatchNorm -> activation pairs, an indexable submodule path of the model's own)
TIMM = {"resnet50": (33, "layer1.0.conv1"), "efficientnet_b0": (33, "blocks.0.0.conv_dw"),
        "regnety_008": (29, "s1.b1.conv1.conv"),
        "mobilenetv3_large_100": (31, "blocks.0.0.conv_dw"),
        # DlaTree calls DlaBasic with and without its optional shortcut
        "dla34": (21, "level2.tree1.conv1"),
        "cspresnet50": (38, "stages.0.blocks.0.conv1")}  # LeakyReLU(0.01) in BatchNormAct2d
ACT_TYPES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.py)


def timm_model(name, **kw):
    return randomise(timm.create_model(name, pretrained=False, num_classes=5, **kw))


class NormLeaves(fx.Tracer):
    """fx's tracer with every norm a leaf (timm's BatchNormAct2d would be traced into)."""

    def is_leaf_module(self, module, name):
        return (isinstance(module, (_BatchNorm, nn.GroupNorm))
                or super().is_leaf_module(module, name))


def activation_after(node, modules):
    """The activation module node that `node` feeds alone (through nn.Identity), or None."""
    while len(node.users) == 1:
        node = next(iter(node.users))
        if node.op != "call_module":
            return None
        if type(modules[node.target]) is not nn.Identity:
            return node if isinstance(modules[node.target], ACT_TYPES) else None
    return None


def batch_norm_act_pairs(model):
    """Names of the BatchNorms that an activation follows."""
    graph = NormLeaves().trace(model)
    modules = dict(model.named_modules())
    pairs = {name for name, m in modules.items()
             if isinstance(m, BatchNormAct2d) and not isinstance(m.act, nn.Identity)}
    pairs |= {node.target for node in graph.nodes if node.op == "call_module"
              and type(modules[node.target]) is nn.BatchNorm2d
              and activation_after(node, modules) is not None}
    return pairs


def batch_norms(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def no_random_layers(model):
    for m in model.modules():
        if isinstance(m, (nn.Dropout, DropBlock2d, timm.layers.DropPath)):
            m.eval()
    return model


def assert_batch_independent(model, shape=(4, 3, 64, 64)):
    no_random_layers(model.train())
    x = torch.randn(shape)
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out).all()
        mates = x.clone()
        mates[1:] = torch.randn(shape[0] - 1, *shape[1:]) * 3 + 1
        assert torch.equal(model(mates)[0], out[0])  # same shapes: only the mates changed
        alone = model(x[:1])
        torch.testing.assert_close(alone, out[:1], rtol=0, atol=1e-4 * out.abs().max().item())


@pytest.mark.parametrize("name", TIMM)
def test_timm_models_convert_to_group_pn(name):
    count, path = TIMM[name]
    original = timm_model(name)
    pairs = batch_norm_act_pairs(original)
    bns = batch_norms(original)
    assert len(pairs) == count
    model, report = convert_norms(original, "group_pn", report=True)

    assert not batch_norms(model)  # BatchNormAct2d included: it is a BatchNorm2d
    assert set(report.norm_act) == pairs
    assert set(report.norm_only) == set(bns) - pairs and not report.left
    proxy = {n for n, m in model.named_modules() if isinstance(m, GroupNormProxyAct)}
    assert proxy == pairs  # every pair is one Proxy Norm module, under the BatchNorm's name
    for bn_name, bn in bns.items():
        layer = model.get_submodule(bn_name)
        assert torch.equal(layer.weight, bn.weight)
        if isinstance(bn, BatchNormAct2d) and bn_name in pairs:
            assert layer.act_name == report.norm_act[bn_name]
            assert type(layer.act) is type(bn.act)  # timm's relu/silu/hardswish: torch's classes
    # no activation is applied twice: none follows a Proxy Norm module in the converted forward
    graph, modules = NormLeaves().trace(model), dict(model.named_modules())
    assert not [node.target for node in graph.nodes if node.op == "call_module"
                and isinstance(modules[node.target], GroupNormProxyAct)
                and activation_after(node, modules) is not None]

    # the user's model: same class, tree and names (plus an `act` in converted plain BatchNorms)
    assert type(model) is type(original)
    assert model.get_submodule(path) is not None
    plain = {n for n, m in bns.items() if type(m) is nn.BatchNorm2d}
    assert {n for n, _ in model.named_modules()} == \
        {n for n, _ in original.named_modules()} | {f"{n}.act" for n in plain}
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    keys = {k for k in original.state_dict() if k.rsplit(".", 1)[-1] not in buffers}
    keys |= {f"{n}.{p}" for n in pairs for p in ("proxy_weight", "proxy_bias")}
    keys -= {f"{n}.bias" for n in set(bns) - pairs}  # the scale-only norm
    assert set(model.state_dict()) == keys

    assert_batch_independent(model)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_indexing_and_head_replacement():
    model = convert_norms(timm_model("efficientnet_b0"), "group_pn")
    assert type(model.conv_stem) is nn.Conv2d
    assert isinstance(model.blocks[0][0].bn1, GroupNormProxyAct)
    assert type(model.bn1.drop) is nn.Identity and type(model.bn1.act) is nn.SiLU
    model.reset_classifier(3)  # timm's own API on the converted model
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    model = convert_norms(timm_model("resnet50"), "layer_pn")
    assert type(model.layer1[0].act2) is nn.Identity  # applied by bn2 now (through drop_block)
    assert type(model.layer1[0].act3) is nn.ReLU  # after the residual add: stays
    assert type(model.layer1[0].drop_block) is nn.Identity


def test_drop_block_between_a_batch_norm_and_its_activation():
    """timm's ResNets with drop_block_rate: bn2 -> DropBlock2d -> act2 in layer3 and layer4.
    Proxy Norm takes the activation (the DropBlock then acts on its output); the other
    norms keep timm's order."""
    original = timm_model("resnet50", drop_block_rate=0.1)
    assert type(original.layer4[0].drop_block) is DropBlock2d
    model, report = convert_norms(original, "group_pn", report=True)
    assert report.counts()["norm_act"] == TIMM["resnet50"][0]
    layer = model.layer4[0]
    assert type(layer.bn2) is GroupNormProxyAct and type(layer.act2) is nn.Identity
    assert type(layer.drop_block) is DropBlock2d
    model, report = convert_norms(original, "group", report=True)
    assert "layer4.0.bn2" in report.norm_only and type(model.layer4[0].act2) is nn.ReLU
    assert report.norm_act["layer2.0.bn2"] == "relu"  # its drop_block is an nn.Identity


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_batch_conversion_keeps_the_function(name):
    """norm="batch": BatchNormAct2d's activations (silu; relu and hardswish) mapped exactly."""
    original = timm_model(name)
    model = convert_norms(original, "batch")
    assert model.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), original.eval()(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(no_random_layers(model.train())(x),
                                   no_random_layers(original.train())(x), rtol=0, atol=1e-6)


# ---- BatchNormAct2d, one module at a time ---------------------------------------------

class Block(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x))


def block(act_layer=nn.ReLU, **kw):
    return randomise(Block(BatchNormAct2d(8, act_layer=act_layer, **kw)))


@pytest.mark.parametrize("act_layer, name", [
    (nn.ReLU, "relu"), (nn.SiLU, "silu"), (nn.GELU, "gelu"), (nn.Hardswish, "hardswish"),
    (nn.ReLU6, "relu6"), (timm_acts.Swish, "silu"), (timm_acts.GELU, "gelu"),
    (timm_acts.HardSwish, "hardswish"), (timm_acts_me.SwishMe, "silu"),
    (timm_acts_me.HardSwishMe, "hardswish"), ("swish", "silu"), ("hard_swish", "hardswish"),
    ("gelu", "gelu"), (nn.LeakyReLU, "leaky_relu"), ("leaky_relu", "leaky_relu"),
    (nn.Mish, "mish"), ("mish", "mish"), (timm_acts.Mish, "mish"), (timm_acts_me.MishMe, "mish")])
def test_batch_norm_act_activations(act_layer, name):
    original = block(act_layer)
    x = torch.randn(4, 3, 8, 8)
    model, report = convert_norms(original, "group_pn", report=True)
    assert report.norm_act == {"bn": name} and type(model.bn) is GroupNormProxyAct
    assert model.bn.act_name == name
    batch = convert_norms(original, "batch")  # the same function: the mapping is exact
    with torch.no_grad():
        torch.testing.assert_close(batch.train()(x), original.train()(x), rtol=0, atol=1e-6)


def test_batch_norm_act_without_activation():
    model, report = convert_norms(block(apply_act=False), "group_pn", report=True)
    assert report.norm_only == ["bn"] and not report.norm_act
    assert type(model.bn) is GroupNormAct and model.bn.bias is None  # the scale-only norm
    # its own act is Identity: an activation after it in the graph is its pair
    net = nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct2d(8, apply_act=False), nn.SiLU())
    model, report = convert_norms(net, "group_pn", report=True)
    assert report.norm_act == {"1": "silu"} and type(model[2]) is nn.Identity


def test_an_activation_after_a_batch_norm_act_stays():
    """Its own act is the one it holds: a second activation after it is the model's."""
    net = nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct2d(8, act_layer=nn.ReLU), nn.ReLU())
    model, report = convert_norms(net, "group_pn", report=True)
    assert report.norm_act == {"1": "relu"} and type(model[2]) is nn.ReLU


class Flip(nn.Module):
    """A deterministic stand-in for a drop layer: where it runs shows in the output."""

    def forward(self, x):
        return -x


def test_the_drop_layer_is_kept():
    x = torch.randn(4, 3, 8, 8)
    original = block(nn.ReLU, drop_layer=Flip)
    model = convert_norms(original, "group")
    bn = model.bn
    assert type(bn.drop) is Flip and [n for n, _ in bn.named_children()] == ["drop", "act"]
    with torch.no_grad():  # timm's order: norm, affine, drop, activation
        y = F.group_norm(model.conv(x), bn.num_groups, bn.weight, bn.bias, bn.eps)
        torch.testing.assert_close(model(x), torch.relu(-y))
    model = convert_norms(original, "group_pn")
    assert type(model.bn.drop) is Flip
    with torch.no_grad():  # Proxy Norm's activation follows its affine: the drop comes last
        out = model(x)
        model.bn.drop = None
        torch.testing.assert_close(out, -model(x))
    # timm's DropBlock, kept with its options
    model = convert_norms(block(nn.ReLU, drop_layer=functools.partial(
        DropBlock2d, drop_prob=0.3, block_size=3)), "group_pn")
    assert type(model.bn.drop) is DropBlock2d and model.bn.drop.drop_prob == 0.3
    with torch.no_grad():
        assert (model.train()(x) == 0).any() and not (model.eval()(x) == 0).any()


def test_ghostnet_whose_head_passes_its_mode_to_dropout():
    """GhostNet's head calls F.dropout(x, p, training=self.training): its train and eval
    traces differ there only, so it converts, and the dropout still follows the mode."""
    model, report = convert_norms(timm_model("ghostnet_100"), "group_pn", report=True)
    assert not batch_norms(model) and not report.left and report.counts()["norm_act"] == 34
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))  # no dropout
        model.train()
        torch.manual_seed(0)
        first = model(x)
        torch.manual_seed(1)
        assert not torch.equal(model(x), first)  # dropout's masks


def test_unsupported_activation_is_one_error_naming_the_module():
    with pytest.raises(ConversionError) as info:
        convert_norms(block(nn.ELU))
    assert str(info.value) == (
        "bn: its activation bn.act (ELU) is one that Proxy Norm cannot hold; supported: "
        "relu, silu, gelu, relu6, hardswish, leaky_relu, mish; pass strict=False to leave it "
        "as it is")
    with pytest.raises(ConversionError, match=r"^bn: its activation bn\.act \(timm's GELUTanh\)"):
        convert_norms(block(timm_acts.GELUTanh), "layer_pn")
    with pytest.raises(ConversionError, match=r"^bn: its activation bn\.act \(LeakyReLU\("
                                              r"negative_slope=0\.001\)\)"):
        convert_norms(block(functools.partial(nn.LeakyReLU, 1e-3)))  # TResNet's
    model, report = convert_norms(block(nn.ELU), strict=False, report=True)
    assert list(report.left) == ["bn"] and type(model.bn) is BatchNormAct2d
    # a norm without Proxy Norm holds any activation: timm's module is kept as it is
    model, report = convert_norms(block(nn.ELU), "group", report=True)
    assert report.norm_act == {"bn": "ELU"} and type(model.bn.act) is nn.ELU
    assert type(model.bn) is GroupNormAct and model(torch.randn(2, 3, 8, 8)).shape == (2, 8, 8, 8)


def test_timm_activation_modules_after_a_plain_batch_norm():
    def net(act):
        return nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), act)

    for act, name in ((timm_acts.Swish(), "silu"), (timm_acts.GELU(), "gelu"),
                      (timm_acts.HardSwish(), "hardswish"), (timm_acts_me.SwishMe(), "silu")):
        model, report = convert_norms(net(act), "group_pn", report=True)
        assert report.norm_act == {"1": name} and type(model[2]) is nn.Identity
    with pytest.raises(ConversionError, match=r"^1: followed by 2 \(timm's Tanh\), an activation "
                                              r"that Proxy Norm cannot hold"):
        convert_norms(net(timm_acts.Tanh()))


def test_sync_batch_norm_act_and_subclasses():
    original = block(nn.SiLU)
    synced = timm.layers.convert_sync_batchnorm(original)
    assert type(synced.bn) is timm.layers.norm_act.SyncBatchNormAct
    model, report = convert_norms(synced, "group_pn", report=True)
    assert report.norm_act == {"bn": "silu"} and type(model.bn) is GroupNormProxyAct

    class MyNormAct(BatchNormAct2d):  # what its forward adds is unknown
        pass

    with pytest.raises(ConversionError, match=r"^bn: MyNormAct is a BatchNorm subclass"):
        convert_norms(Block(MyNormAct(8)))


def test_timm_stays_optional():
    """proxynorm imports, converts and builds factories without timm."""
    code = ("import sys; sys.modules['timm'] = None\n"
            "import torch, torchvision, proxynorm, proxynorm.convert, proxynorm.factories\n"
            "m = proxynorm.convert.convert_norms(torchvision.models.resnet18(num_classes=2))\n"
            "assert m(torch.randn(1, 3, 32, 32)).shape == (1, 2)\n"
            "proxynorm.factories.norm_act_layer('group_pn', 'relu')(8)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---- norm_layer factories -------------------------------------------------------------

def test_norm_act_layer_builds_timm_models_with_proxy_norm():
    original = timm_model("efficientnet_b0")
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=5,
                              norm_layer=norm_act_layer("group_pn", act="silu"))
    assert not batch_norms(model)
    proxy = {n for n, m in model.named_modules() if isinstance(m, GroupNormProxyAct)}
    assert proxy == batch_norm_act_pairs(original)  # where BatchNorm had its activation
    assert all(model.get_submodule(n).act_name == "silu" for n in proxy)
    assert model.blocks[1][0].bn3.bias is None  # timm's apply_act=False: the scale-only norm
    assert model.bn1.groups == 16  # 32 channels: 2 per group, as convert_norms' default
    assert_batch_independent(model)


def test_norm_layer_builds_torchvision_and_timm_resnets():
    model = torchvision.models.resnet18(num_classes=5, norm_layer=norm_layer("group"))
    assert not batch_norms(model) and type(model.bn1) is GroupNormAct
    assert model.bn1.groups == 32 and type(model.bn1.act) is nn.Identity
    assert_batch_independent(model)
    model = timm.create_model("resnet50", pretrained=False, num_classes=5,
                              norm_layer=norm_layer("layer", eps=1e-3))  # timm passes device, dtype
    assert not batch_norms(model) and model.layer1[0].bn1.groups == 1
    assert model.layer1[0].bn1.eps == 1e-3


def test_factory_options_and_refusals():
    layer = norm_act_layer("group_pn", "relu", groups=4)(16, drop_layer=Flip, inplace=True,
                                                        dtype=torch.float64)
    assert type(layer) is GroupNormProxyAct and layer.groups == 4 and type(layer.drop) is Flip
    assert layer.weight.dtype == torch.float64
    assert norm_act_layer("group", "silu", groups=lambda c: c // 4)(16, eps=1e-3).groups == 4
    assert norm_act_layer("group", "silu")(16, eps=1e-3).eps == 1e-3  # the model's eps
    assert norm_act_layer("group", "silu", eps=1e-4)(16, eps=1e-3).eps == 1e-4  # the factory's
    assert type(norm_act_layer("batch", "relu")(16, momentum=0.01).act) is nn.ReLU
    assert norm_act_layer("batch", "relu")(16, momentum=0.01).momentum == 0.01
    no_act = norm_act_layer("layer_pn", "relu")(16, apply_act=False)
    assert type(no_act) is GroupNormAct and no_act.bias is None
    with pytest.raises(ValueError, match=r"^norm_layer\('group_pn'\): the model applies its own "
                                         r"activation after a norm_layer"):
        norm_layer("group_pn")
    with pytest.raises(TypeError, match=r"^norm_layer\('group'\) makes norms without activation, "
                                        r"but the model calls it as a norm-act layer \(with "
                                        r"inplace\): use proxynorm\.norm_act_layer"):
        timm.create_model("efficientnet_b0", norm_layer=norm_layer("group"))
    with pytest.raises(ValueError, match=r"^unknown norm 'gruop'"):
        norm_layer("gruop")
    with pytest.raises(ValueError, match=r"^unknown activation 'swish'"):
        norm_act_layer("group_pn", "swish")
    with pytest.raises(TypeError, match="takes no act_kwargs"):
        norm_act_layer("group", "relu")(16, act_kwargs={"negative_slope": 0.1})
    with pytest.raises(TypeError, match="takes no argument affine"):
        norm_layer("group")(16, affine=False)


# ---- the training application ---------------------------------------------------------

def test_get_model_timm():
    model, report = get_model("timm:test_efficientnet", norm="layer_pn", num_classes=3,
                              in_channels=1, report=True)
    assert model.conv_stem.in_channels == 1 and report.counts()["norm_act"] > 0
    assert not report.left and not batch_norms(model)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"^unknown timm model 'test_efficientnt' \(close names: "
                                         r"test_efficientnet"):
        get_model("timm:test_efficientnt")
    with pytest.raises(TypeError, match=r"has no option drop_rate; timm models take none"):
        get_model("timm:test_efficientnet", drop_rate=0.1)
    with pytest.raises(ValueError, match="keeps timm's activations"):
        get_model("timm:test_efficientnet", act="silu")
    with pytest.raises(ValueError, match=r"^model 'timm:test_convnext' has no BatchNorm, so norm "
                                         r"'group_pn' would not apply to it"):
        get_model("timm:test_convnext")
    with pytest.raises(ValueError, match=r"^model 'timm:test_vit' has no BatchNorm"):
        get_model("timm:test_vit")  # and fx cannot trace it: nothing to convert either way


def test_train_a_timm_model(tmp_path, capsys):
    """digits has one input channel: timm builds the stem for it (in_chans)."""
    assert train(tmp_path / "run", "--model", "timm:test_efficientnet", "--max-steps", 2) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (
        "timm:test_efficientnet: convert_norms to group_pn: 9 BatchNorm+activation pairs -> "
        "norm-act modules (silu 9); 4 BatchNorms without activation -> norms without "
        "activation; 0 left as they were")
    assert lines[0].startswith("digits_resnet_group_pn: timm:test_efficientnet with group_pn")
    assert lines[-1].startswith("digits_resnet_group_pn: stopped at step 2 (max_steps), ")
    assert train(tmp_path / "bad", "--model", "timm:test_efficientnt") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: unknown timm model 'test_efficientnt' (close names: test_efficientnet")
    assert train(tmp_path / "bad", "--model", "timm:test_efficientnet", "--drop-rate", 0.1) == 2
    assert capsys.readouterr().err == (
        "error: drop_rate does not apply to timm:test_efficientnet (timm models keep their "
        "own); unset it (--drop-rate null)\n")
    assert not (tmp_path / "bad").exists()


def test_coverage_records_each_outcome_and_its_check_can_fail(tmp_path, capsys):
    """benchmarks.convert_coverage: a converted model passes (nothing left, batch
    independent in float64), a refusal carries the converter's line, and a model whose
    norm does use its batch (norm="batch") is a failure, not a pass."""
    from benchmarks import convert_coverage

    converted = convert_coverage.check("resnet10t")
    assert converted["outcome"] == "converted" and converted["family"] == "resnet"
    assert converted["batch_norms_left"] == 0 and converted["batch_dependence"] < 1e-9
    assert (converted["norm_act"], converted["norm_only"]) == (7, 7)
    refused = convert_coverage.check("levit_128s")
    assert refused["outcome"] == "refused"
    assert refused["reason"].startswith("stages.0.blocks.0.attn (Attention): its forward "
                                        "traces differently in train and eval mode")
    batch = convert_coverage.check("resnet10t", norm="batch")
    assert batch["outcome"] == "failed" and batch["batch_dependence"] > 1e-3
    text = convert_coverage.table([converted, refused, batch], "group_pn")
    assert "| `resnet10t` | resnet | converted: 7 norm-act, 7 norm-only |" in text
    assert "| `levit_128s` | levit | refused: stages.0.blocks.0.attn" in text
    assert "1 of 3 convert to `group_pn` and pass the checks, 1 are refused in one line, " \
           "1 fail." in text
    assert "pass strict=False" not in text  # said once, on the page
    # --report-only checks nothing: the same table from the JSON
    path = tmp_path / "coverage.json"
    path.write_text(json.dumps({"norm": "group_pn", "models": [converted, refused, batch]}))
    capsys.readouterr()
    convert_coverage.main(["--report-only", "--output", str(path), "--no-readme"])
    assert capsys.readouterr().out.strip() == text
